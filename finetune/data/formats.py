"""Conversation data: reading, validation and normalisation to one canonical record.

Two input formats are accepted, detected per sample (JSON Schemas in ``data_schemas/``):

- **MiniCPM-V**: ``{"id", "image": path | {"<image_00>": path, ...}, "conversations":
  [{"role": "user"|"assistant"|"system", "content": str}]}``. One image is marked
  ``<image>``; several are marked by their dict keys ``<image_00>``, ``<image_01>``, ...
- **LLaVA / ShareGPT**: ``{"id", "image": path | [path, ...], "conversations":
  [{"from": "human"|"gpt"|"system", "value": str}]}``; each ``<image>`` takes the next
  image of the list.

Files are ``.json`` (a list of samples) or ``.jsonl`` (one sample per line); several files
may be mixed, in either format. Every sample becomes one **canonical record**::

    {"id": str,
     "images": [{"key": str, "field": str, "path": str}, ...],   # in text order
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "source": {"file": str, "index": int}}

- ``images[k]`` is written ``<image_NN>`` (NN = k, two digits or more) in the content,
  at the place its placeholder had. Numbering follows the text, not the input dict, so
  pixel order and token order cannot disagree (the reference orders pixels by dict and
  bounds by text, spec §3.3). ``key`` is the image's name in the input (``<image>`` or the
  dict key), ``field`` where it came from (``image``, ``image["<image_01>"]``,
  ``image[1]``) for later error messages, ``path`` is absolute.
- A single image without a placeholder is put in front of the first user turn as
  ``<image_00>\\n`` (the reference's rule).
- Relative image paths are resolved against ``image_root`` when given, else against the
  directory of the data file.
- A sample without ``id`` (or with ``null``/``""``) gets ``"<file name>:<index>"``, which
  stays unique across mixed files; an integer id becomes its decimal string.

Rules the validation enforces (each violation is one :class:`DataError`; nothing is skipped
silently, and a sample with any error is left out of the dataset):

- a sample is an object with a non-empty ``conversations`` list (a ``conversation`` typo is
  named); every turn an object with a known role and string content;
- an optional system turn comes first, then user and assistant alternate, starting with the
  user and ending with an assistant answer (a sample with nothing to train on is an error);
  assistant answers are not empty;
- image placeholders may appear in any **user** turn (the reference breaks beyond the first,
  issue #587), never in assistant or system turns; every placeholder names exactly one
  image, every image is named exactly once (except the single-image shorthand above);
- every image passes ``check_image(path)``, by default "exists and is a file"; the pixel
  module can plug in a decoding check.

Loading goes through ``datasets``: one validating pass over the files collects every error,
then the good samples are written to a memory-mapped Arrow table (cached under a fingerprint
of the files' contents, the options and this module's code, so ``.map`` caches downstream keep
working) or, with ``streaming=True``, yielded lazily. Samples are parsed with :mod:`json`, not
by ``datasets``' JSON loader, whose schema inference fails or coerces on mixed types (a str
image next to a dict image, keys missing in some rows) and loses the record's position.
``.json`` files are parsed whole; use ``.jsonl`` for sets larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import datasets
from datasets import Features, List, Value

from .errors import DataError, DataErrors

# `<image_NN>` names image NN in canonical content (and in MiniCPM-V input).
IMAGE_MARKER_RE = re.compile(r"<image_(\d+)>")
# Every placeholder an input may use; `<image>` included.
_PLACEHOLDER_RE = re.compile(r"<image(?:_\d+)?>")
_SINGLE = "<image>"
_ARTICLE = {"assistant": "an", "system": "a", "user": "a"}

CANONICAL_FEATURES = Features(
    {
        "id": Value("string"),
        "images": List({"key": Value("string"), "field": Value("string"), "path": Value("string")}),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "source": {"file": Value("string"), "index": Value("int64")},
    }
)

ImageCheck = Callable[[str], "str | None"]


def image_marker(position: int) -> str:
    """The canonical marker of the image at ``position`` (text order): ``<image_00>``, ..."""
    return f"<image_{position:02d}>"


def image_file_exists(path: str) -> str | None:
    """Default image check: the path is an existing regular file.

    Args:
        path: Absolute image path.

    Returns:
        None if usable, else the reason (naming the path).
    """
    if os.path.isfile(path):
        return None
    if os.path.exists(path):
        return f"{path} is not a file"
    return f"image file not found: {path}"


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class _Format:
    name: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # input role name -> canonical role
    other_names: dict[str, str]  # the other format's role names -> ours, for hints


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
    """LLaVA if the first turn that says so uses ``from``/``value``, else MiniCPM-V."""
    for turn in turns:
        if isinstance(turn, dict):
            if "from" in turn or "value" in turn:
                return _LLAVA
            if "role" in turn or "content" in turn:
                return _MINICPMV
    return _LLAVA if isinstance(record.get("image"), list) else _MINICPMV


# --------------------------------------------------------------------------- one record


@dataclass
class _Image:
    key: str  # the image's name in the input: "<image>" or a dict key
    field: str  # where it is in the input: image, image["<image_01>"], image[1]
    path: str  # absolute
    relative: bool  # written as a relative path (for the fix hint)


@dataclass
class _Parsed:
    """The outcome of parsing one sample: a canonical record, or errors (or both empty)."""

    sample_id: str | None
    canonical: dict | None = None
    images: list[_Image] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)


class _Reporter:
    """Builds DataErrors for one sample."""

    def __init__(self, file: str, index: int, sample_id: str | None, line: int | None):
        self.file, self.index, self.sample_id, self.line = file, index, sample_id, line
        self.errors: list[DataError] = []

    def __call__(self, field_path: str | None, reason: str, fix: str = "") -> None:
        self.errors.append(
            DataError(self.file, self.index, self.sample_id, field_path, reason, fix, line=self.line)
        )


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _read_id(record: dict, report_id_error: Callable[[str, str], None]) -> str | None:
    """The id as written (None if absent); reports an id of the wrong type."""
    raw = record.get("id")
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        report_id_error(f"id is {_type_name(raw)}", "use a string (or integer) id, or leave it out")
        return None
    return str(raw)


def _read_turns(turns: list, fmt: _Format, report: _Reporter) -> list[tuple[str | None, str | None]]:
    """(canonical role or None, content or None) per turn; None where the turn is bad."""
    other = _LLAVA if fmt is _MINICPMV else _MINICPMV
    known = ", ".join(fmt.roles)
    out: list[tuple[str | None, str | None]] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            report(where, f"turn is {_type_name(turn)}",
                   f'make it an object with "{fmt.role_key}" and "{fmt.content_key}"')
            out.append((None, None))
            continue
        if fmt.role_key not in turn and fmt.content_key not in turn:
            if other.role_key in turn or other.content_key in turn:
                reason = (f'turn uses "{other.role_key}"/"{other.content_key}" ({other.name}) but this sample\'s '
                          f'first turn uses "{fmt.role_key}"/"{fmt.content_key}" ({fmt.name})')
                report(where, reason, "use one format per sample")
            else:
                report(where, f'turn has no "{fmt.role_key}" and no "{fmt.content_key}"',
                       f'use {{"{fmt.role_key}": ..., "{fmt.content_key}": ...}}')
            out.append((None, None))
            continue
        out.append((_read_role(turn, fmt, where, known, report), _read_content(turn, fmt, where, report)))
    return out


def _read_role(turn: dict, fmt: _Format, where: str, known: str, report: _Reporter) -> str | None:
    where = f"{where}.{fmt.role_key}"
    if fmt.role_key not in turn:
        report(where, f'missing "{fmt.role_key}"', f"use one of {known}")
        return None
    role = turn[fmt.role_key]
    if isinstance(role, str) and role in fmt.roles:
        return fmt.roles[role]
    if not isinstance(role, str):
        report(where, f"role is {_type_name(role)}", f"use one of {known}")
    elif role in fmt.other_names:
        hint = f'"{role}" is {"LLaVA" if fmt is _MINICPMV else "MiniCPM-V"}\'s name for "{fmt.other_names[role]}"'
        report(where, f'unknown role "{role}"', f"use one of {known} ({hint})")
    else:
        report(where, f'unknown role "{role}"', f"use one of {known}")
    return None


def _read_content(turn: dict, fmt: _Format, where: str, report: _Reporter) -> str | None:
    where = f"{where}.{fmt.content_key}"
    if fmt.content_key not in turn:
        report(where, f'missing "{fmt.content_key}"', "add the turn's text")
        return None
    content = turn[fmt.content_key]
    if isinstance(content, str):
        return content
    if isinstance(content, (list, dict)):
        # OpenAI-style content parts ([{"type": "text", ...}, {"type": "image", ...}]).
        report(where, f"content is {_type_name(content)}, not text",
               'write the text as one string and mark images with "<image>" placeholders')
    else:
        report(where, f"content is {_type_name(content)}, not text", "write the turn's text as a string")
    return None


def _check_order(turns: list[tuple[str | None, str | None]], raw_turns: list, fmt: _Format,
                 report: _Reporter) -> None:
    """System first (optional), then user/assistant alternating, ending with the assistant.

    Only the first ordering problem is reported: the rest usually follow from it.
    """
    roles = [role for role, _ in turns]
    if any(role is None for role in roles):
        return  # a bad role was reported already; the order cannot be judged
    native = [raw[fmt.role_key] for raw in raw_turns]
    names = {canonical: name for name, canonical in fmt.roles.items()}
    user, assistant = names["user"], names["assistant"]
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            report(f"conversations[{i}].{fmt.role_key}", "system turn after the first turn",
                   "move it to the front (only conversations[0] may be a system prompt), or merge them")
            return
    body = [i for i, role in enumerate(roles) if role != "system"]
    if not body:
        report("conversations", "no user or assistant turn", f"add a {user} turn and an {assistant} answer")
        return
    expected = "user"
    for position, i in enumerate(body):
        if roles[i] != expected:
            if position == 0:
                report(f"conversations[{i}].{fmt.role_key}", f'conversation starts with "{native[i]}"',
                       f'start with a "{user}" turn (after an optional system turn)')
            else:
                report(f"conversations[{i}].{fmt.role_key}",
                       f'two "{native[i]}" turns in a row (conversations[{body[position - 1]}] and [{i}])',
                       f'"{user}" and "{assistant}" turns must alternate; merge them or add the missing turn')
            return
        expected = "assistant" if expected == "user" else "user"
    last = body[-1]
    if roles[last] == "user":
        # Nothing is trained after the last answer, so a trailing question is dead weight at
        # best and a truncated sample at worst; a sample without any answer trains nothing.
        reason = (f'ends with a "{user}" turn, which has no answer' if len(body) > 1
                  else f'no "{assistant}" answer to train on')
        report(f"conversations[{last}].{fmt.role_key}", reason, f'end the sample with an "{assistant}" answer')


def _resolve(path: str, file: str, image_root: str | None) -> tuple[str, bool]:
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path), False
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))
    return os.path.normpath(os.path.join(os.path.abspath(base), path)), True


def _read_images(record: dict, fmt: _Format, file: str, image_root: str | None,
                 report: _Reporter) -> list[_Image] | None:
    """The images as listed in the input (dict or list order); None if ``image`` is malformed."""
    value = record.get("image")
    entries: list[tuple[str, str, Any]] = []  # (key, field, path value)
    if value is None:
        return []
    if isinstance(value, str):
        entries.append((_SINGLE, "image", value))
    elif fmt is _MINICPMV and isinstance(value, dict):
        for key, path in value.items():
            where = f"image[{json.dumps(key, ensure_ascii=False)}]"
            if key == _SINGLE and len(value) > 1:
                report(where, f'"{_SINGLE}" names one image but "image" holds {len(value)}',
                       "name each image <image_00>, <image_01>, ... and use those names in the text")
                return None
            if key != _SINGLE and not IMAGE_MARKER_RE.fullmatch(key):
                report(where, f'key "{key}" is not an image placeholder',
                       "name the images <image_00>, <image_01>, ... and use those names in the text")
                return None
            entries.append((key, where, path))
    elif fmt is _LLAVA and isinstance(value, list):
        entries.extend((_SINGLE, f"image[{j}]", path) for j, path in enumerate(value))
    elif isinstance(value, list):
        report("image", "image is a list; MiniCPM-V samples give one path or a dict",
               'use {"<image_00>": path, "<image_01>": path, ...}, or write the sample in LLaVA format')
        return None
    elif isinstance(value, dict):
        report("image", "image is an object; LLaVA samples give one path or a list of paths",
               "use a list (one <image> per entry, in order), or write the sample in MiniCPM-V format")
        return None
    else:
        report("image", f"image is {_type_name(value)}", "give the image's path as a string")
        return None
    images = []
    for key, where, path in entries:
        if not isinstance(path, str) or not path.strip():
            report(where, f"image path is {_type_name(path) if not isinstance(path, str) else 'empty'}",
                   "give the image's path as a string")
            return None
        absolute, relative = _resolve(path, file, image_root)
        images.append(_Image(key, where, absolute, relative))
    return images


def _place_images(turns: list[tuple[str | None, str | None]], images: list[_Image], fmt: _Format,
                  report: _Reporter) -> tuple[list[str | None], list[_Image]]:
    """Rewrites placeholders to ``<image_NN>`` in text order.

    Returns:
        The rewritten contents and the images in text order (valid only without errors).
    """
    by_key = {image.key: image for image in images} if fmt is _MINICPMV else {}
    unused = list(images)  # LLaVA: <image> takes the next one
    placed: list[_Image] = []
    where_placed: dict[int, str] = {}  # id(image) -> turn field, for "repeated" messages
    placeholder_errors = 0
    contents: list[str | None] = []
    for i, (role, content) in enumerate(turns):
        if content is None:
            contents.append(None)
            continue
        where = f"conversations[{i}].{fmt.content_key}"

        def replace(match: re.Match, i=i, role=role, where=where) -> str:
            nonlocal placeholder_errors
            name = match.group(0)
            image, problem = _resolve_placeholder(name, images, by_key, unused, fmt, where_placed)
            if problem:
                placeholder_errors += 1
                report(where, *problem)
                return name
            if role not in ("user", None):
                # Still counted as placed: the one error here is the misplaced placeholder.
                report(where, f"image placeholder {name} in {_ARTICLE[role]} {role} turn",
                       "images are inputs: put the placeholder in a user turn")
                placeholder_errors += 1
            where_placed[id(image)] = where
            placed.append(image)
            return image_marker(len(placed) - 1)

        contents.append(_PLACEHOLDER_RE.sub(replace, content))
    missing = [image for image in images if id(image) not in where_placed]
    if len(images) == 1 and missing and placeholder_errors == 0:
        first_user = next((i for i, (role, c) in enumerate(turns) if role == "user" and c is not None), None)
        if first_user is not None:
            contents[first_user] = image_marker(0) + "\n" + contents[first_user]
            return contents, list(images)
    elif missing and placeholder_errors == 0:
        # (With a bad placeholder, that placeholder was most likely meant for the unnamed
        # image: one error, not two.)
        if fmt is _MINICPMV:
            for image in missing:
                report(image.field, f"no placeholder names image {image.key}",
                       f"write {image.key} in the user turn where the image belongs")
        else:
            count = len(placed)
            report(missing[0].field if placed else "image",
                   f"{len(images)} images but {count} <image> placeholder{'s' if count != 1 else ''}",
                   "write one <image> per image, in the order of the list")
    return contents, placed


def _resolve_placeholder(name: str, images: list[_Image], by_key: dict[str, _Image], unused: list[_Image],
                         fmt: _Format, where_placed: dict[int, str]) -> tuple[_Image | None, tuple[str, str] | None]:
    """The image a placeholder names, or the (reason, fix) why it names none."""
    if fmt is _LLAVA:
        if name != _SINGLE:
            return None, (f"{name} is a MiniCPM-V placeholder", "LLaVA samples mark every image with <image>, in list order")
        if not images:
            return None, ("placeholder <image> but the sample has no image", 'add "image", or remove the placeholder')
        if not unused:
            return None, (f"more <image> placeholders than images ({len(images)})",
                          "write one <image> per image, or add the missing image to the list")
        return unused.pop(0), None
    image = by_key.get(name)
    if image is None:
        if not images:
            return None, (f"placeholder {name} but the sample has no image", 'add "image", or remove the placeholder')
        names = ", ".join(by_key)
        if name == _SINGLE and len(images) > 1:
            return None, (f"<image> is ambiguous: the sample has {len(images)} images ({names})",
                          "write the image's own name instead")
        if len(images) == 1 and images[0].key == _SINGLE:
            return None, (f"placeholder {name} names no image; the sample's one image is <image>",
                          'write <image>, or make "image" a dict {"' + name + '": path}')
        return None, (f"placeholder {name} names no image (the sample has {names})", "use one of those names")
    if id(image) in where_placed:
        return None, (f"placeholder {name} used again (first in {where_placed[id(image)]})",
                      "name each image once; to show an image twice, list it twice under two names")
    return image, None


def _parse(record: Any, file: str, index: int, image_root: str | None, line: int | None = None) -> _Parsed:
    """Validates one sample's structure and builds its canonical record (no file checks)."""
    if not isinstance(record, dict):
        report = _Reporter(file, index, None, line)
        report(None, f"sample is {_type_name(record)}", 'make each sample an object with "conversations"')
        return _Parsed(None, errors=report.errors)
    id_errors = _Reporter(file, index, None, line)
    sample_id = _read_id(record, lambda reason, fix: id_errors("id", reason, fix))
    report = _Reporter(file, index, sample_id, line)
    report.errors.extend(id_errors.errors)
    parsed = _Parsed(sample_id, errors=report.errors)

    if "conversations" not in record:
        for typo in ("conversation", "messages"):
            if typo in record:
                report("conversations", f'missing "conversations" (found "{typo}")', f'rename "{typo}" to "conversations"')
                return parsed
        report("conversations", 'missing "conversations"', "add a list of turns")
        return parsed
    raw_turns = record["conversations"]
    if not isinstance(raw_turns, list) or not raw_turns:
        what = "an empty list" if raw_turns == [] else _type_name(raw_turns)
        report("conversations", f"conversations is {what}", "give a list of turns")
        return parsed

    fmt = _detect_format(record, raw_turns)
    turns = _read_turns(raw_turns, fmt, report)
    _check_order(turns, raw_turns, fmt, report)
    for i, (role, content) in enumerate(turns):
        if role == "assistant" and content is not None and not content.strip():
            report(f"conversations[{i}].{fmt.content_key}", "empty assistant answer",
                   "write the answer, or drop the turn and the question before it")

    images = _read_images(record, fmt, file, image_root, report)
    if images is None:
        return parsed
    parsed.images = images
    contents, in_text_order = _place_images(turns, images, fmt, report)
    if report.errors:
        return parsed
    parsed.canonical = {
        "id": sample_id if sample_id is not None else f"{Path(file).name}:{index}",
        "images": [{"key": im.key, "field": im.field, "path": im.path} for im in in_text_order],
        "messages": [{"role": role, "content": text} for (role, _), text in zip(turns, contents)],
        "source": {"file": str(file), "index": index},
    }
    return parsed


def _check_images(parsed: _Parsed, file: str, index: int, image_root: str | None, check_image: ImageCheck,
                  line: int | None) -> list[DataError]:
    errors = []
    for image in parsed.images:
        reason = check_image(image.path)
        if reason is None:
            continue
        if image.path not in reason:
            reason = f"{image.path}: {reason}"
        if image.relative:
            base = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))
            fix = f"relative paths are resolved against {base} (pass image_root to change that)"
        else:
            fix = "check the path"
        errors.append(DataError(file, index, parsed.sample_id, image.field, reason, fix, line=line))
    return errors


def validate_record(record: Any, *, file: str, index: int, image_root: str | os.PathLike | None = None,
                    check_image: ImageCheck = image_file_exists, line: int | None = None) -> list[DataError]:
    """Every problem of one sample. Never raises on bad data.

    Args:
        record: The sample as parsed from JSON (any JSON value).
        file: The data file it came from (used in messages and to resolve relative paths).
        index: Its 0-based position in that file.
        image_root: Directory relative image paths are resolved against; default: the data
            file's directory.
        check_image: ``check_image(absolute_path)`` returns None for a usable image, else the
            reason. The default only checks that the file exists; pass e.g. a wrapper around
            ``images.open_image`` to decode every image up front.
        line: Line of the sample in the file, where known (``.jsonl``), for messages.

    Returns:
        The problems found, in order; empty if the sample is good.
    """
    root = None if image_root is None else os.fspath(image_root)
    parsed = _parse(record, str(file), index, root, line)
    return parsed.errors + _check_images(parsed, str(file), index, root, check_image, line)


def normalise_record(record: Any, *, file: str, index: int, image_root: str | os.PathLike | None = None) -> dict:
    """The canonical record of one sample (see the module docstring); image files are not checked.

    Args:
        record: The sample as parsed from JSON.
        file: The data file it came from.
        index: Its 0-based position in that file.
        image_root: Directory relative image paths are resolved against; default: the data
            file's directory.

    Returns:
        ``{"id", "images", "messages", "source"}``.

    Raises:
        DataErrors: If the sample is malformed.
    """
    parsed = _parse(record, str(file), index, None if image_root is None else os.fspath(image_root))
    if parsed.canonical is None:
        raise DataErrors(parsed.errors)
    return parsed.canonical


# --------------------------------------------------------------------------- files


def _read_file(file: str) -> Iterator[tuple[int | None, int | None, Any]]:
    """Yields ``(index, line, sample)`` for each sample of a file, or a DataError in its place.

    A file-level problem (missing, wrong type, bad JSON in a ``.json``) yields one DataError
    with index None. A bad line of a ``.jsonl`` yields a DataError for that sample only.
    """
    suffix = Path(file).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        yield None, None, DataError(file, None, None, None, f'unsupported file type "{suffix or file}"',
                                    "use .json (a list of samples) or .jsonl (one sample per line)")
        return
    if not os.path.isfile(file):
        yield None, None, DataError(file, None, None, None, "data file not found", "check the path")
        return
    if suffix == ".jsonl":
        yield from _read_jsonl(file)
    else:
        yield from _read_json(file)


def _read_jsonl(file: str) -> Iterator[tuple[int, int, Any]]:
    index = 0
    with open(file, "rb") as handle:  # bytes, so one bad encoding costs one line, not the file
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            if not raw.strip():
                continue
            try:
                yield index, line_number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield index, line_number, DataError(file, index, None, None, f"line is not UTF-8 ({error.reason})",
                                                    "save the file as UTF-8")
            except json.JSONDecodeError as error:
                yield index, line_number, DataError(
                    file, index, None, None, f"invalid JSON: {error.msg}",
                    "fix that line (each line of a .jsonl file is one whole sample)",
                    line=line_number, column=error.colno)
            index += 1


def _read_json(file: str) -> Iterator[tuple[int | None, None, Any]]:
    try:
        text = Path(file).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield None, None, DataError(file, None, None, None, f"file is not UTF-8 ({error.reason} at byte {error.start})",
                                    "save the file as UTF-8")
        return
    try:
        samples = json.loads(text)
    except json.JSONDecodeError as error:
        yield None, None, DataError(file, None, None, None, f"invalid JSON: {error.msg}",
                                    "fix the syntax there; no sample of this file was read",
                                    line=error.lineno, column=error.colno)
        return
    if not isinstance(samples, list):
        yield None, None, DataError(file, None, None, None, f"top level is {_type_name(samples)}, not a list of samples",
                                    "make the file a JSON list [{...}, {...}], or use .jsonl with one sample per line")
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
    """The canonical records of the good samples (``skip``: (file, index) of the bad ones).

    Module-level and driven by picklable arguments, so ``datasets`` can shard it over
    ``paths`` (one shard per file) for dataloader workers.
    """
    for file in paths:
        for index, line, sample in _read_file(file):
            if isinstance(sample, DataError) or (file, index) in skip:
                continue
            parsed = _parse(sample, file, index, image_root, line)
            # A sample that turned bad since the validating pass (file edited meanwhile) is
            # still left out; the next load reports it.
            if parsed.canonical is not None:
                yield parsed.canonical


@dataclass
class _Validation:
    errors: list[DataError]
    bad: frozenset  # (file, index) of every sample with an error
    good: int  # how many samples passed
    fingerprint: str  # of the files' bytes, the options, this module's code and `bad`


def _validate_files(paths: list[str], image_root: str | None, check_image: ImageCheck) -> _Validation:
    """One pass over every sample of every file."""
    errors: list[DataError] = []
    bad: set[tuple[str, int]] = set()
    good = 0
    checked: dict[str, str | None] = {}  # a path shared by many samples is checked once

    def check_once(path: str) -> str | None:
        if path not in checked:
            checked[path] = check_image(path)
        return checked[path]

    fingerprint = hashlib.sha256(Path(__file__).read_bytes())  # code changes invalidate the cache
    fingerprint.update(json.dumps([None if image_root is None else os.path.abspath(image_root)]).encode())
    for file in paths:
        fingerprint.update(json.dumps([os.path.abspath(file), _file_digest(file)]).encode())
        for index, line, sample in _read_file(file):
            if isinstance(sample, DataError):
                found = [sample]
            else:
                found = validate_record(sample, file=file, index=index, image_root=image_root,
                                        check_image=check_once, line=line)
            if not found:
                good += 1
                continue
            errors.extend(found)
            if index is not None:
                bad.add((file, index))
    fingerprint.update(json.dumps(sorted(bad)).encode())
    return _Validation(errors, frozenset(bad), good, fingerprint.hexdigest()[:32])


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
    """Loads conversation files into canonical records, reporting every bad sample.

    Bad samples are left out of the dataset and returned as errors; the caller decides
    whether to stop (``raise DataErrors(errors)``) or go on.

    Args:
        paths: One ``.json``/``.jsonl`` file, several comma-separated, or a list; files may
            mix the MiniCPM-V and LLaVA formats.
        image_root: Directory relative image paths are resolved against; default: each data
            file's own directory.
        streaming: Return an ``IterableDataset`` that parses the files lazily instead of
            writing an Arrow table (for sets larger than memory or disk cache). The files are
            still validated in full first, so every error is known before training starts.
        check_image: ``check_image(absolute_path) -> reason | None``, run once per distinct
            path; default: the file exists.
        cache_dir: Where ``datasets`` writes the Arrow table; default: its own cache.

    Returns:
        ``(dataset, errors)``: the good samples as canonical records (features
        :data:`CANONICAL_FEATURES`, in file then sample order) and the problems found.

    Raises:
        ValueError: If ``paths`` names no file.
    """
    files = _split_paths(paths)
    root = None if image_root is None else os.fspath(image_root)
    validation = _validate_files(files, root, check_image)
    gen_kwargs = {"paths": files, "image_root": root, "skip": validation.bad}
    if streaming:
        dataset = datasets.IterableDataset.from_generator(
            _canonical_records, features=CANONICAL_FEATURES, gen_kwargs=gen_kwargs
        )
    elif validation.good == 0:
        # datasets cannot build an Arrow table from a generator that yields nothing.
        dataset = datasets.Dataset.from_dict({name: [] for name in CANONICAL_FEATURES}, features=CANONICAL_FEATURES)
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
    "image_file_exists",
    "image_marker",
    "load_conversations",
    "normalise_record",
    "validate_record",
]
