"""QA data: reading (question, answers) files, and the order a run reads them in.

``read_qa`` reads JSONL, DPR's JSON or TSV files and names the file and line of any bad
record; :class:`DataPosition` is where a run is in its seeded, per-epoch permutation of them
(saved with each checkpoint, so a resumed run reads on where it stopped).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class QAFormatError(ValueError):
    """A bad line in a QA file; the message starts with ``FILE:LINE:``."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]  # the first is the training target (see target_answer)


def read_qa(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[QAExample], int]:
    """Reads QA pairs; returns ``(examples, n_skipped)``.

    Formats, by content: JSONL ``{"question": str, "answers": [str, ...]}`` a line; DPR's
    JSON file (a list of such objects, extra keys ignored); or a TSV ``question<TAB>["a",
    ...]`` as in DPR's ``nq-*.qa.csv``. Training uses the first answer as the target.

    Raises:
      FileNotFoundError: no such file.
      QAFormatError: ``FILE:LINE: reason`` for a malformed line, an empty question or an empty
        answer list, or text that is not Unicode (a lone surrogate, see :func:`check_text`)
        (unless ``skip_bad``, which skips and counts them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {str(path)!r} does not exist")
    records = list(_records(path))
    examples, skipped = [], 0
    for line_no, record in records:
        try:
            examples.append(_example(record))
        except ValueError as error:
            if not skip_bad:
                raise QAFormatError(f"{path}:{line_no}: {error}") from None
            skipped += 1
    if not examples:
        raise QAFormatError(
            f"{path}: no QA pairs" + (f" ({skipped} bad lines skipped)" if skipped else "")
        )
    return examples, skipped


def _records(path: Path) -> Iterator[tuple[int, object]]:
    with path.open("rb") as f:
        head = f.read(1).lstrip()
    if path.suffix == ".json" or head == b"[":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise QAFormatError(f"{path}: not a JSON file: {error}") from None
        if not isinstance(data, list):
            raise QAFormatError(f"{path}: expected a JSON list of QA objects")
        yield from ((i + 1, record) for i, record in enumerate(data))
        return
    tsv = path.suffix in (".csv", ".tsv")
    with path.open(encoding="utf-8", errors="strict", newline="") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if tsv:
                row = next(csv.reader([line], delimiter="\t"))
                yield line_no, row
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_no, ValueError(f"not valid JSON: {error.msg}")


def _example(record: object) -> QAExample:
    if isinstance(record, ValueError):
        raise record
    if isinstance(record, list):  # TSV row: question, JSON list of answers
        if len(record) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(record)}")
        try:
            record = {"question": record[0], "answers": json.loads(record[1])}
        except json.JSONDecodeError as error:
            raise ValueError(f"answers column is not a JSON list: {error.msg}") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with 'question' and 'answers'")
    question, answers = record.get("question"), record.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answers, list) or not answers:
        raise ValueError("'answers' must be a non-empty list of strings")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("every answer must be a non-empty string")
    check_text(question, "'question'")
    for answer in answers:
        check_text(answer, "an answer")
    return QAExample(question.strip(), tuple(a.strip() for a in answers))


def check_text(text: str, what: str) -> None:
    """Raises ValueError (naming ``what``) if ``text`` is not Unicode text: a lone surrogate
    such as ``"\\ud800"``, which JSON's ``\\u`` escapes (and undecodable command-line bytes)
    can spell, cannot be tokenized or written as UTF-8; refused on reading, not half-way
    through an evaluation's output."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{what} holds a lone surrogate {text[error.start]!r} at character {error.start}: "
            "not Unicode text"
        ) from None


@dataclasses.dataclass
class DataPosition:
    """Where the loop is in the data: a deterministic permutation per epoch, by seed.

    ``running`` holds what the loop has measured so far that its logged figures depend on
    (the collapse watch's window of retrieved documents, the inputs cut), saved with the
    position so that a resumed run logs what the uninterrupted one would.
    """

    epoch: int = 0
    index: int = 0
    running: dict = dataclasses.field(default_factory=dict)

    def next_batch(
        self, examples: list[QAExample], batch_size: int, seed: int, process: tuple[int, int]
    ):
        """The next ``batch_size`` examples for this process (its slice of the global batch)."""
        n = len(examples)
        chosen = []
        while len(chosen) < batch_size * process[1]:
            order = np.random.default_rng([seed, self.epoch]).permutation(n)
            take = min(batch_size * process[1] - len(chosen), n - self.index)
            chosen.extend(order[self.index : self.index + take])
            self.index += take
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0
        mine = chosen[process[0] * batch_size : (process[0] + 1) * batch_size]
        return [examples[i] for i in mine]
