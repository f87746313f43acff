"""Data errors that say where the problem is and how to fix it.

A bad sample must never be skipped silently or turned into a traceback: the reference
finetune swallows every exception in ``__getitem__`` and resamples, so users see endless
"data fetch error" loops instead of the broken record (landscape §2, items 2-3). Every
problem found in the data is therefore a :class:`DataError` naming the file, the sample's
index and id, the field and the fix. Loaders collect them; only ``cli.py`` shows them
(once, on stderr, without a traceback) by raising :class:`DataErrors`.

One error renders as one line::

    data.json: sample 3 (id "abc"), field conversations[2].role: unknown role "bot"; use one of user, assistant, system
    data.jsonl:7: sample 6, field conversations: missing "conversations"; add the list of turns

``file:line:`` (and ``file:line:column:``) is the compiler convention, so editors and
terminals can jump to it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(eq=True)
class DataError(Exception):
    """One problem in the training data.

    Not frozen: Python sets ``__traceback__`` on an exception when it is raised, which a
    frozen dataclass forbids.

    Attributes:
        file: The data file, as the user wrote it.
        index: 0-based position of the sample in the file (for ``.jsonl``: among the
            non-blank lines), or None for a problem with the whole file.
        sample_id: The sample's ``id`` as written in the data, or None if it has none.
        field: Path of the bad field inside the sample, e.g. ``conversations[2].role``,
            ``image["<image_01>"]`` or ``image[1]``; None when the sample as a whole is bad.
        reason: What is wrong.
        fix: What to do about it (may be empty when the reason says it all).
        line: 1-based line in the file, where known (``.jsonl`` samples, JSON syntax errors).
        column: 1-based column, for JSON syntax errors.
    """

    file: str
    index: int | None
    sample_id: str | None
    field: str | None
    reason: str
    fix: str = ""
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        location = str(self.file)
        if self.line is not None:
            location += f":{self.line}"
            if self.column is not None:
                location += f":{self.column}"
        where = []
        if self.index is not None:
            sample = f"sample {self.index}"
            if self.sample_id is not None:
                sample += f" (id {json.dumps(self.sample_id, ensure_ascii=False)})"
            where.append(sample)
        if self.field:
            where.append(f"field {self.field}")
        message = self.reason + (f"; {self.fix}" if self.fix else "")
        return ": ".join([location, ", ".join(where), message] if where else [location, message])

    def __reduce__(self):
        # Exceptions pickle through ``self.args``, which the dataclass __init__ leaves empty;
        # datasets' worker processes pickle whatever they raise.
        return (
            DataError,
            (
                self.file,
                self.index,
                self.sample_id,
                self.field,
                self.reason,
                self.fix,
                self.line,
                self.column,
            ),
        )

    def __hash__(self) -> int:  # Exception is hashable; keep it so with eq=True.
        return hash((self.file, self.index, self.field, self.reason))


class DataErrors(Exception):
    """Every problem found in the data, raised once so the user can fix them all in one go.

    ``str()`` lists at most ``max_per_file`` errors per file (in the order found) and counts
    the rest, so one systematically broken file does not bury the others.

    Args:
        errors: The problems found; must not be empty.
        max_per_file: How many errors of one file ``str()`` lists.

    Raises:
        ValueError: If ``errors`` is empty (there is nothing to report).
    """

    def __init__(self, errors: Iterable[DataError], max_per_file: int = 50):
        self.errors = list(errors)
        if not self.errors:
            raise ValueError("DataErrors needs at least one DataError")
        self.max_per_file = max_per_file
        super().__init__(self.errors, max_per_file)

    def __str__(self) -> str:
        per_file = Counter(error.file for error in self.errors)
        count = len(self.errors)
        header = f"{count} data error{'s' if count != 1 else ''}"
        if len(per_file) > 1:
            header += f" in {len(per_file)} files"
        lines = [header + ":"]
        shown: Counter[str] = Counter()
        for error in self.errors:
            shown[error.file] += 1
            if shown[error.file] <= self.max_per_file:
                lines.append(f"  {error}")
        for file, total in per_file.items():
            if total > self.max_per_file:
                lines.append(f"  {file}: ... and {total - self.max_per_file} more errors in this file")
        return "\n".join(lines)


__all__ = ["DataError", "DataErrors"]
