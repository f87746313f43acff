"""Conversation data: reading, validation and normalisation to one canonical record.

Two input formats are accepted, detected per sample (JSON Schemas in ``data_schemas/``):

- **MiniCPM-V**: ``{"id", "image": path | {"<image_00>": path, ...}, "conversations":
  [{"role": "user"|"assistant"|"system", "content": str}]}``. One image is marked
  ``<image>``; several are marked by their dict keys ``<image_00>``, ``<image_01>``, ...
- **LLaVA / ShareGPT**: ``{"id", "image": path | [path, ...], "conversations":
  [{"from": "human"|"gpt"|"system", "value": str}]}``; each ``<image>`` takes the next image
  of the list.

Files are ``.json`` (a list of samples) or ``.jsonl`` (one sample per line); several files may
be mixed, in either format. Every sample becomes one **canonical record**::

    {"id": str,
     "images": [{"key": str, "field": str, "path": str}, ...],   # in text order
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "source": {"file": str, "index": int}}

- Image k (in text order) is written ``<image_NN>`` with NN = k (:func:`image_marker`) where
  its placeholder was. Numbering follows the text, not the input dict, so pixel order and token
  order cannot disagree (the reference orders pixels by dict and bounds by text, spec §3.3).
  ``key`` is the image's name in the input (``<image>`` or the dict key), ``field`` where it was
  (``image``, ``image["<image_01>"]``, ``image[1]``) for later error messages; ``path`` is
  absolute.
- A single image without a placeholder goes in front of the first user turn as
  ``<image_00>\\n`` (the reference's rule). No other whitespace is added around markers.
- Relative image paths are resolved against ``image_root`` when given, else against the
  directory of the data file.
- A sample without an id (or with ``null``/``""``) gets ``"<file name>:<index>"``, unique
  across mixed files; an integer id becomes its decimal string.

Rules (each violation is one :class:`DataError`; a sample with any error is left out of the
dataset, never silently):

- a sample is an object with a non-empty ``conversations`` list (a ``conversation`` or
  ``messages`` key is named as the likely typo); each turn is an object with a known role and
  string content (multi-part or null content is rejected);
- an optional system turn comes first; then user and assistant alternate, starting with the
  user and ending with a non-empty assistant answer (a sample with nothing to train on is an
  error, and so is a trailing unanswered question);
- placeholders may appear in any **user** turn (the reference breaks beyond the first, issue
  #587), never in assistant or system turns; each placeholder names exactly one image and each
  image is named exactly once, except for the single-image shorthand above;
- every image passes ``check_image(path)``: by default it is an existing file; the pixel
  module can plug in a decoding check.

Loading goes through ``datasets``. A first pass over the files collects every error; then the
good samples are written to a memory-mapped Arrow table, cached under a fingerprint of the
files' bytes, the options, this module's code and the set of bad samples (so downstream
``.map`` caches keep working), or with ``streaming=True`` parsed lazily. Samples are parsed
with :mod:`json` rather than ``datasets``' JSON loader, whose schema inference fails or coerces
on mixed types (a str image next to a dict image, keys missing in some rows) and loses each
record's position. ``.json`` files are parsed whole; use ``.jsonl`` for sets larger than memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

from .errors import DataError, DataErrors

# Canonical content marks image k (text order) as `<image_NN>`, NN = k.
IMAGE_MARKER_RE = re.compile(r"<image_(\d+)>")
# Every placeholder the inputs use.
_PLACEHOLDER_RE = re.compile(r"<image(?:_\d+)?>")
_SINGLE = "<image>"

CANONICAL_FEATURES = Features(
    {
        "id": Value("string"),
        "images": List({"key": Value("string"), "field": Value("string"), "path": Value("string")}),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "source": {"file": Value("string"), "index": Value("int64")},
    }
)

# check_image(absolute_path) -> None if the image is usable, else the reason.
ImageCheck = Callable[[str], "str | None"]


def image_marker(position: int) -> str:
    """The canonical marker of the image at ``position`` in text order: ``<image_00>``, ..."""
    return f"<image_{position:02d}>"


def image_file_exists(path: str) -> str | None:
    """The default image check: ``path`` is an existing regular file.

    Args:
        path: Absolute image path.

    Returns:
        None if usable, else the reason (naming the path).
    """
    if os.path.isfile(path):
        return None
    if os.path.exists(path):
        return f"{path} is not a file (point to an image file)"
    return f"image file not found: {path}"


# ----------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class _Format:
    name: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # role name in the input -> canonical role
    other_names: dict[str, str]  # the other format's role names -> ours, for hints

    def name_of(self, canonical_role: str) -> str:
        return next(name for name, role in self.roles.items() if role == canonical_role)


_MINICPMV = _Format(
    name="MiniCPM-V",
    role_key="role",
    content_key="content",
    roles={"user": "user", "assistant": "assistant", "system": "system"},
    other_names={"human": "user", "gpt": "assistant"},
)
_LLAVA = _Format(
    name="LLaVA",
    role_key="from",
    content_key="value",
    roles={"human": "user", "gpt": "assistant", "system": "system"},
    other_names={"user": "human", "assistant": "gpt"},
)


def _detect_format(record: dict, turns: list) -> _Format:
    """The format of the first turn that shows one; else LLaVA for an image list, else MiniCPM-V."""
    for turn in turns:
        if isinstance(turn, dict):
            if "from" in turn or "value" in turn:
                return _LLAVA
            if "role" in turn or "content" in turn:
                return _MINICPMV
    return _LLAVA if isinstance(record.get("image"), list) else _MINICPMV


# -------------------------------------------------------------------------------------- one sample


@dataclass
class _Image:
    key: str  # the image's name in the input: "<image>" or a dict key
    field: str  # where it is in the input: image, image["<image_01>"], image[1]
    path: str  # absolute
    relative: bool  # written as a relative path (for the fix hint)


@dataclass
class _Parsed:
    sample_id: str | None  # as written; None if absent or unusable
    canonical: dict | None  # None if the sample has errors
    images: list[_Image]  # the well-formed images, in input order (for file checks)
    errors: list[DataError]


class _Reporter:
    """Collects the DataErrors of one sample."""

    def __init__(self, file: str, index: int, sample_id: str | None, line: int | None):
        self.file, self.index, self.sample_id, self.line = file, index, sample_id, line
        self.errors: list[DataError] = []

    def __call__(self, field_path: str | None, reason: str, fix: str) -> None:
        error = DataError(self.file, self.index, self.sample_id, field_path, reason, fix, line=self.line)
        self.errors.append(error)


_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _read_id(record: dict) -> tuple[str | None, str | None]:
    """(the id as a string or None, the reason it is unusable or None)."""
    raw = record.get("id")
    if raw is None or raw == "":
        return None, None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return None, f"id is {_type_name(raw)}"
    return str(raw), None


Turns = list[tuple["str | None", "str | None"]]  # (canonical role, content) per turn; None where bad


def _read_conversations(record: dict, report: _Reporter) -> tuple[Turns, _Format] | None:
    """The turns, checked one by one and as a sequence; None if there are none to check."""
    if "conversations" not in record:
        typo = next((key for key in ("conversation", "messages") if key in record), None)
        if typo:
            report(
                "conversations",
                f'missing "conversations" (found "{typo}")',
                f'rename "{typo}" to "conversations"',
            )
        else:
            report("conversations", 'missing "conversations"', "add the list of turns")
        return None
    raw_turns = record["conversations"]
    if not isinstance(raw_turns, list) or not raw_turns:
        what = "an empty list" if raw_turns == [] else _type_name(raw_turns)
        report("conversations", f"conversations is {what}", "give a list of turns")
        return None
    fmt = _detect_format(record, raw_turns)
    turns = [_read_turn(turn, f"conversations[{i}]", fmt, report) for i, turn in enumerate(raw_turns)]
    _check_order(turns, raw_turns, fmt, report)
    return turns, fmt


def _read_turn(turn: Any, where: str, fmt: _Format, report: _Reporter) -> tuple[str | None, str | None]:
    keys = f'"{fmt.role_key}" and "{fmt.content_key}"'
    if not isinstance(turn, dict):
        report(where, f"turn is {_type_name(turn)}", f"make it an object with {keys}")
        return None, None
    if fmt.role_key not in turn and fmt.content_key not in turn:
        other = _LLAVA if fmt is _MINICPMV else _MINICPMV
        if other.role_key in turn or other.content_key in turn:
            report(
                where,
                f'turn uses "{other.role_key}"/"{other.content_key}" ({other.name}) but the sample\'s '
                f'first turn uses "{fmt.role_key}"/"{fmt.content_key}" ({fmt.name})',
                "use one format per sample",
            )
        else:
            report(where, f'turn has neither "{fmt.role_key}" nor "{fmt.content_key}"', f"give it {keys}")
        return None, None
    role = _read_role(turn, f"{where}.{fmt.role_key}", fmt, report)
    return role, _read_content(turn, role, f"{where}.{fmt.content_key}", fmt, report)


def _read_role(turn: dict, where: str, fmt: _Format, report: _Reporter) -> str | None:
    choices = f"use one of {', '.join(fmt.roles)}"
    role = turn.get(fmt.role_key)
    if isinstance(role, str) and role in fmt.roles:
        return fmt.roles[role]
    if fmt.role_key not in turn:
        report(where, f'missing "{fmt.role_key}"', choices)
    elif not isinstance(role, str):
        report(where, f"role is {_type_name(role)}", choices)
    elif role in fmt.other_names:  # e.g. "human" in a MiniCPM-V sample
        other = "LLaVA" if fmt is _MINICPMV else "MiniCPM-V"
        report(
            where, f'unknown role "{role}"', f'{choices} ("{role}" is {other}\'s "{fmt.other_names[role]}")'
        )
    else:
        report(where, f'unknown role "{role}"', choices)
    return None


def _read_content(turn: dict, role: str | None, where: str, fmt: _Format, report: _Reporter) -> str | None:
    content = turn.get(fmt.content_key)
    if isinstance(content, str):
        if role == "assistant" and not content.strip():
            report(where, "empty assistant answer", "write the answer, or drop it and the question before it")
        return content
    if fmt.content_key not in turn:
        report(where, f'missing "{fmt.content_key}"', "add the turn's text")
    elif isinstance(content, (list, dict)):  # e.g. OpenAI-style [{"type": "text", ...}, ...]
        report(
            where,
            f"content is {_type_name(content)}, not text",
            "write the text as one string, with <image> placeholders for the images",
        )
    else:
        report(where, f"content is {_type_name(content)}, not text", "write the turn's text as a string")
    return None


def _check_order(turns: Turns, raw_turns: list, fmt: _Format, report: _Reporter) -> None:
    """An optional system turn first, then user and assistant alternating, ending with the assistant.

    Reports only the first problem: later ones usually follow from it.
    """
    roles = [role for role, _ in turns]
    if None in roles:
        return  # a turn without a usable role was reported; the order cannot be judged
    user, assistant = fmt.name_of("user"), fmt.name_of("assistant")

    def report_at(i: int, reason: str, fix: str) -> None:
        report(f"conversations[{i}].{fmt.role_key}", reason, fix)

    late_system = next((i for i, role in enumerate(roles) if role == "system" and i > 0), None)
    if late_system is not None:
        report_at(
            late_system,
            "system turn after the first turn",
            "move it to the front (only conversations[0] may be a system prompt), or merge them",
        )
        return
    body = [i for i, role in enumerate(roles) if role != "system"]
    if not body:
        report(
            "conversations", "no user or assistant turn", f'add a "{user}" turn and an "{assistant}" answer'
        )
        return
    for position, i in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if roles[i] == expected:
            continue
        name = raw_turns[i][fmt.role_key]
        if position == 0:
            report_at(
                i,
                f'conversation starts with "{name}"',
                f'start with a "{user}" turn (after an optional system turn)',
            )
        else:
            report_at(
                i,
                f'two "{name}" turns in a row (conversations[{body[position - 1]}] and [{i}])',
                f'"{user}" and "{assistant}" turns alternate; merge the two or add the missing turn',
            )
        return
    if roles[body[-1]] == "user":
        # Nothing after the last answer is trained: a trailing question is a truncated sample
        # or dead weight, and a sample without an answer trains nothing.
        reason = (
            f'ends with a "{user}" turn, which has no answer'
            if len(body) > 1
            else f'no "{assistant}" answer to train on'
        )
        report_at(body[-1], reason, f'end the sample with an "{assistant}" answer')


def _resolve_path(path: str, file: str, image_root: str | None) -> tuple[str, bool]:
    """(absolute path, whether it was relative)."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path), False
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))
    return os.path.normpath(os.path.join(os.path.abspath(base), path)), True


def _read_images(
    record: dict, fmt: _Format, file: str, image_root: str | None, report: _Reporter
) -> list[_Image] | None:
    """The images in input order (dict or list order); None if ``image`` is malformed."""
    value = record.get("image")
    naming = "name the images <image_00>, <image_01>, ... and use those names in the text"
    if value is None:
        return []
    if isinstance(value, str):
        entries = [(_SINGLE, "image", value)]
    elif isinstance(value, dict) and fmt is _MINICPMV:
        entries = []
        for key, path in value.items():
            where = f"image[{json.dumps(key, ensure_ascii=False)}]"
            if key == _SINGLE and len(value) > 1:
                report(where, f'"{_SINGLE}" names one image but "image" holds {len(value)}', naming)
                return None
            if key != _SINGLE and not IMAGE_MARKER_RE.fullmatch(key):
                report(where, f'key "{key}" is not an image placeholder', naming)
                return None
            entries.append((key, where, path))
    elif isinstance(value, list) and fmt is _LLAVA:
        entries = [(_SINGLE, f"image[{j}]", path) for j, path in enumerate(value)]
    elif isinstance(value, list):
        report(
            "image",
            "image is a list; MiniCPM-V samples give one path or a dict",
            'use {"<image_00>": path, "<image_01>": path, ...}, or LLaVA turns ("from"/"value")',
        )
        return None
    elif isinstance(value, dict):
        report(
            "image",
            "image is an object; LLaVA samples give one path or a list of paths",
            'use a list (one <image> per entry, in order), or MiniCPM-V turns ("role"/"content")',
        )
        return None
    else:
        report("image", f"image is {_type_name(value)}", "give the image's path as a string")
        return None
    images = []
    for key, where, path in entries:
        if not isinstance(path, str) or not path.strip():
            what = "empty" if isinstance(path, str) else _type_name(path)
            report(where, f"image path is {what}", "give the image's path as a string")
            return None
        images.append(_Image(key, where, *_resolve_path(path, file, image_root)))
    return images


class _ImagePlacer:
    """Rewrites a sample's placeholders to ``<image_NN>``, numbering the images in text order."""

    def __init__(self, images: list[_Image], fmt: _Format, report: _Reporter):
        self.images, self.fmt, self.report = images, fmt, report
        self.by_key = {image.key: image for image in images}  # MiniCPM-V names an image by its key
        self.unused = list(images)  # LLaVA: each <image> takes the next image
        self.placed: list[_Image] = []  # text order
        self.named_at: dict[int, str] = {}  # id(image) -> field where it was first named
        self.bad_placeholders = 0

    def rewrite(self, turns: Turns) -> list[str | None]:
        """The turns' contents with markers (meaningful only if nothing was reported)."""
        contents = []
        for i, (role, content) in enumerate(turns):
            where = f"conversations[{i}].{self.fmt.content_key}"
            if content is not None:
                content = _PLACEHOLDER_RE.sub(
                    functools.partial(self._marker, role=role, where=where), content
                )
            contents.append(content)
        self._place_unnamed(turns, contents)
        return contents

    def _marker(self, match: re.Match, role: str | None, where: str) -> str:
        name = match.group(0)
        image, problem = self._lookup(name)
        if problem:
            self.bad_placeholders += 1
            self.report(where, *problem)
            return name
        if role in ("assistant", "system"):
            # Counted as placed all the same, so this mistake gives one error, not two.
            self.bad_placeholders += 1
            self.report(
                where,
                f"image placeholder {name} in {'an' if role == 'assistant' else 'a'} {role} turn",
                "images are inputs: put the placeholder in a user turn",
            )
        self.named_at[id(image)] = where
        self.placed.append(image)
        return image_marker(len(self.placed) - 1)

    def _lookup(self, name: str) -> tuple[_Image | None, tuple[str, str] | None]:
        """The image ``name`` stands for, or (reason, fix) why it stands for none."""
        count = len(self.images)
        if count == 0:
            return None, (
                f"placeholder {name} but the sample has no image",
                'add "image", or remove the placeholder',
            )
        if self.fmt is _LLAVA:
            if name != _SINGLE:
                return None, (
                    f"{name} is a MiniCPM-V placeholder",
                    "LLaVA samples mark each image with <image>, in list order",
                )
            if not self.unused:
                return None, (
                    f"more <image> placeholders than images ({count})",
                    "write one <image> per image, or add the missing images to the list",
                )
            return self.unused.pop(0), None
        image = self.by_key.get(name)
        if image is not None and id(image) in self.named_at:
            return None, (
                f"placeholder {name} used again (first in {self.named_at[id(image)]})",
                "name each image once; to show an image twice, list it twice under two names",
            )
        if image is not None:
            return image, None
        if count == 1:
            [only] = self.by_key
            fix = f"write {only}" + (
                f', or make "image" a dict {{"{name}": path}}' if only == _SINGLE else ""
            )
            return None, (f"placeholder {name} names no image; the sample's one image is {only}", fix)
        names = ", ".join(self.by_key)
        if name == _SINGLE:
            return None, (
                f"<image> is ambiguous: the sample has {count} images ({names})",
                "write the name of the image you mean",
            )
        return None, (f"placeholder {name} names no image (the sample has {names})", "use one of those names")

    def _place_unnamed(self, turns: Turns, contents: list[str | None]) -> None:
        unnamed = [image for image in self.images if id(image) not in self.named_at]
        if not unnamed or self.bad_placeholders:
            return  # a bad placeholder was most likely meant for the unnamed image: one error, not two
        if len(self.images) == 1:
            # The reference's shorthand: one image without placeholder opens the first user turn.
            first_user = next(
                (i for i, (role, text) in enumerate(turns) if role == "user" and text is not None), None
            )
            if first_user is not None:  # (else the turns' own errors were reported)
                contents[first_user] = image_marker(0) + "\n" + contents[first_user]
                self.placed.append(self.images[0])
        elif self.fmt is _MINICPMV:
            for image in unnamed:
                self.report(
                    image.field,
                    f"no placeholder names image {image.key}",
                    f"write {image.key} in the user turn where the image belongs",
                )
        else:
            named = len(self.placed)
            self.report(
                unnamed[0].field if named else "image",
                f"{len(self.images)} images but {named} <image> placeholder{'' if named == 1 else 's'}",
                "write one <image> per image, in the order of the list",
            )


def _parse(record: Any, file: str, index: int, image_root: str | None, line: int | None = None) -> _Parsed:
    """Checks one sample's structure and builds its canonical record; image files are not checked."""
    if not isinstance(record, dict):
        report = _Reporter(file, index, None, line)
        report(None, f"sample is {_type_name(record)}", 'make each sample an object with "conversations"')
        return _Parsed(None, None, [], report.errors)
    sample_id, id_problem = _read_id(record)
    report = _Reporter(file, index, sample_id, line)
    if id_problem:
        report("id", id_problem, "use a string (or integer) id, or leave it out")
    conversations = _read_conversations(record, report)
    if conversations is None:
        return _Parsed(sample_id, None, [], report.errors)
    turns, fmt = conversations
    images = _read_images(record, fmt, file, image_root, report)
    if images is None:
        return _Parsed(sample_id, None, [], report.errors)
    placer = _ImagePlacer(images, fmt, report)
    contents = placer.rewrite(turns)
    if report.errors:
        return _Parsed(sample_id, None, images, report.errors)
    canonical = {
        "id": sample_id if sample_id is not None else f"{Path(file).name}:{index}",
        "images": [{"key": image.key, "field": image.field, "path": image.path} for image in placer.placed],
        "messages": [{"role": role, "content": text} for (role, _), text in zip(turns, contents)],
        "source": {"file": file, "index": index},
    }
    return _Parsed(sample_id, canonical, images, [])


def _check_image_files(
    parsed: _Parsed, file: str, index: int, image_root: str | None, check_image: ImageCheck, line: int | None
) -> list[DataError]:
    errors = []
    for image in parsed.images:
        reason = check_image(image.path)
        if reason is None:
            continue
        if image.path not in reason:
            reason = f"{image.path}: {reason}"
        if os.path.exists(image.path):
            fix = ""  # found but unusable: the reason names the fix
        elif image.relative:
            base = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))
            fix = f"relative paths are resolved against {base} (image_root changes that)"
        else:
            fix = "check the path"
        errors.append(DataError(file, index, parsed.sample_id, image.field, reason, fix, line=line))
    return errors


def validate_record(
    record: Any,
    *,
    file: str | os.PathLike,
    index: int,
    image_root: str | os.PathLike | None = None,
    check_image: ImageCheck = image_file_exists,
    line: int | None = None,
) -> list[DataError]:
    """Every problem of one sample; never raises on bad data.

    Args:
        record: The sample as parsed from JSON (any JSON value).
        file: The data file it came from (for messages and to resolve relative image paths).
        index: Its 0-based position in that file.
        image_root: Directory that relative image paths are resolved against; default: the
            data file's directory.
        check_image: ``check_image(absolute_path)`` returns None for a usable image, else the
            reason. The default checks that the file exists; a wrapper around
            ``finetune.data.images.open_image`` decodes each image up front instead.
        line: The sample's line in the file, where known (``.jsonl``), for messages.

    Returns:
        The problems, in order of the fields; empty if the sample is good.
    """
    file, root = os.fspath(file), None if image_root is None else os.fspath(image_root)
    parsed = _parse(record, file, index, root, line)
    return parsed.errors + _check_image_files(parsed, file, index, root, check_image, line)


def normalise_record(
    record: Any, *, file: str | os.PathLike, index: int, image_root: str | os.PathLike | None = None
) -> dict:
    """The canonical record of one sample (module docstring); image files are not checked.

    Args:
        record: The sample as parsed from JSON.
        file: The data file it came from.
        index: Its 0-based position in that file.
        image_root: Directory that relative image paths are resolved against; default: the
            data file's directory.

    Returns:
        ``{"id", "images", "messages", "source"}``.

    Raises:
        DataErrors: If the sample is malformed.
    """
    parsed = _parse(record, os.fspath(file), index, None if image_root is None else os.fspath(image_root))
    if parsed.canonical is None:
        raise DataErrors(parsed.errors)
    return parsed.canonical


# ------------------------------------------------------------------------------------------- files


def _file_error(file: str, reason: str, fix: str, **where: int | None) -> DataError:
    """An error that belongs to no sample (``where`` may give index, line, column)."""
    return DataError(file, where.pop("index", None), None, None, reason, fix, **where)


def _read_file(file: str) -> Iterator[tuple[int | None, int | None, Any]]:
    """``(index, line, sample)`` per sample of a file, with a DataError in place of a bad one.

    A problem with the whole file (missing, wrong suffix, not UTF-8, bad JSON in a ``.json``)
    gives a single DataError with index None; a bad line of a ``.jsonl`` costs that line only.
    """
    suffix = Path(file).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        fix = "use .json (a list of samples) or .jsonl (one sample per line)"
        yield None, None, _file_error(file, f'unsupported file type "{suffix or file}"', fix)
    elif not os.path.isfile(file):
        yield None, None, _file_error(file, "data file not found", "check the path")
    elif suffix == ".jsonl":
        yield from _read_jsonl(file)
    else:
        yield from _read_json(file)


def _read_jsonl(file: str) -> Iterator[tuple[int, int, Any]]:
    index = 0  # counts non-blank lines
    with open(file, "rb") as handle:  # bytes: a badly encoded line costs that line, not the file
        for line, raw in enumerate(handle, start=1):
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            if not raw.strip():
                continue
            try:
                sample = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                reason = f"line is not UTF-8 ({error.reason})"
                sample = _file_error(file, reason, "save the file as UTF-8", index=index, line=line)
            except json.JSONDecodeError as error:
                fix = "fix that line (each line of a .jsonl file is one whole sample)"
                sample = _file_error(
                    file, f"invalid JSON: {error.msg}", fix, index=index, line=line, column=error.colno
                )
            yield index, line, sample
            index += 1


def _read_json(file: str) -> Iterator[tuple[int | None, None, Any]]:
    try:
        samples = json.loads(Path(file).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        reason = f"file is not UTF-8 ({error.reason} at byte {error.start})"
        yield None, None, _file_error(file, reason, "save the file as UTF-8")
        return
    except json.JSONDecodeError as error:
        fix = "fix the syntax there; no sample of this file was read"
        yield (
            None,
            None,
            _file_error(file, f"invalid JSON: {error.msg}", fix, line=error.lineno, column=error.colno),
        )
        return
    if not isinstance(samples, list):
        reason = f"top level is {_type_name(samples)}, not a list of samples"
        fix = "make the file a JSON list [{...}, ...], or use .jsonl (one sample per line)"
        yield None, None, _file_error(file, reason, fix)
        return
    for index, sample in enumerate(samples):
        yield index, None, sample


def _split_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(paths, str):
        names = [part.strip() for part in paths.split(",")]
    elif isinstance(paths, os.PathLike):
        names = [os.fspath(paths)]
    else:
        names = [os.fspath(path) for path in paths]
    names = [name for name in names if name]
    if not names:
        raise ValueError("no data files given")
    return names


def _canonical_records(paths: list[str], image_root: str | None, skip: frozenset) -> Iterator[dict]:
    """The canonical records of the good samples; ``skip`` holds (file, index) of the bad ones.

    Module-level with picklable arguments, so that ``datasets`` can shard it over ``paths``
    (one shard per file) for dataloader workers.
    """
    for file in paths:
        for index, _, sample in _read_file(file):
            if isinstance(sample, DataError) or (file, index) in skip:
                continue
            # A sample that went bad after the validating pass (file edited meanwhile) is left
            # out too; the next load reports it.
            canonical = _parse(sample, file, index, image_root).canonical
            if canonical is not None:
                yield canonical


@dataclass
class _Validation:
    errors: list[DataError] = field(default_factory=list)
    bad: set[tuple[str, int]] = field(default_factory=set)  # (file, index) of samples with errors
    good: int = 0  # samples without errors
    fingerprint: str = ""


def _validate_files(paths: list[str], image_root: str | None, check_image: ImageCheck) -> _Validation:
    """One pass over every sample of every file."""
    result = _Validation()
    checked: dict[str, str | None] = {}  # an image shared by many samples is checked once

    def check_once(path: str) -> str | None:
        if path not in checked:
            checked[path] = check_image(path)
        return checked[path]

    digest = hashlib.sha256(Path(__file__).read_bytes())  # a change of the code invalidates the cache
    digest.update(json.dumps(None if image_root is None else os.path.abspath(image_root)).encode())
    for file in paths:
        digest.update(json.dumps([os.path.abspath(file), _file_digest(file)]).encode())
        for index, line, sample in _read_file(file):
            if isinstance(sample, DataError):
                errors = [sample]
            else:
                errors = validate_record(
                    sample, file=file, index=index, image_root=image_root, check_image=check_once, line=line
                )
            if not errors:
                result.good += 1
                continue
            result.errors.extend(errors)
            if index is not None:
                result.bad.add((file, index))
    # Which samples are left out depends on the image files too, which the digest does not cover.
    digest.update(json.dumps(sorted(result.bad)).encode())
    result.fingerprint = digest.hexdigest()[:32]
    return result


def _file_digest(file: str) -> str | None:
    if not os.path.isfile(file):
        return None
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_conversations(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_root: str | os.PathLike | None = None,
    streaming: bool = False,
    check_image: ImageCheck = image_file_exists,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[DataError]]:
    """Loads conversation files as canonical records, reporting every bad sample.

    Bad samples are left out of the dataset and returned as errors; the caller decides whether
    to stop (``raise DataErrors(errors)``) or to go on without them.

    Args:
        paths: A ``.json``/``.jsonl`` file, several separated by commas, or a list of them;
            the files may mix the MiniCPM-V and LLaVA formats.
        image_root: Directory that relative image paths are resolved against; default: each
            data file's own directory.
        streaming: Return an ``IterableDataset`` that parses the files as it is iterated,
            instead of writing an Arrow table. The files are still validated in full first, so
            every error is known before training starts.
        check_image: ``check_image(absolute_path) -> reason | None``, called once per distinct
            path; default: the file exists.
        cache_dir: Where ``datasets`` writes the Arrow table; default: its own cache.

    Returns:
        ``(dataset, errors)``: the good samples as canonical records (features
        :data:`CANONICAL_FEATURES`, in file order, then sample order) and the problems found.

    Raises:
        ValueError: If ``paths`` names no file.
    """
    files = _split_paths(paths)
    root = None if image_root is None else os.fspath(image_root)
    validation = _validate_files(files, root, check_image)
    gen_kwargs = {"paths": files, "image_root": root, "skip": frozenset(validation.bad)}
    if streaming:
        dataset = datasets.IterableDataset.from_generator(
            _canonical_records, features=CANONICAL_FEATURES, gen_kwargs=gen_kwargs
        )
    elif validation.good == 0:
        # datasets cannot build an Arrow table from a generator that yields nothing.
        dataset = datasets.Dataset.from_dict(
            {name: [] for name in CANONICAL_FEATURES}, features=CANONICAL_FEATURES
        )
    else:
        dataset = datasets.Dataset.from_generator(
            _canonical_records,
            features=CANONICAL_FEATURES,
            gen_kwargs=gen_kwargs,
            fingerprint=validation.fingerprint,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
    return dataset, validation.errors


__all__ = [
    "CANONICAL_FEATURES",
    "IMAGE_MARKER_RE",
    "ImageCheck",
    "image_file_exists",
    "image_marker",
    "load_conversations",
    "normalise_record",
    "validate_record",
]
