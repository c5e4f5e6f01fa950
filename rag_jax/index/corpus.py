"""Corpus reading, DPR-style passage splitting and an on-disk passage store.

A corpus is either JSONL, one ``{"id": ..., "title": ..., "text": ...}`` object a line, or DPR's
``psgs_w100.tsv`` (a header naming the columns id, text and title, in any order, then one passage
a line). Every bad line is reported as ``FILE:LINE: reason``; with ``skip_bad=True`` bad lines are
skipped and counted instead. A bad TSV header is never skipped (every line after it would be read
wrongly). A UTF-8 byte order mark at the start of the file is ignored.

The :class:`PassageStore` keeps all passages in one UTF-8 blob plus an int64 offsets array, both
memory-mapped, so passage ``i`` is two offset reads and one slice: O(1) time and no corpus in RAM,
which is what a 21M-passage Wikipedia needs.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from rag_jax import _files

log = logging.getLogger(__name__)

TSV_HEADER = ("id", "text", "title")
_STORE_META = "meta.json"
_STORE_BLOB = "passages.bin"
_STORE_OFFSETS = "offsets.bin"


class CorpusError(ValueError):
    """A corpus line that cannot be used; the message reads ``FILE:LINE: reason``."""


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable unit: a string id, the title of its document and its text."""

    id: str
    title: str
    text: str


# ----------------------------------------------------------------------------------------------
# Reading


class CorpusReader:
    """Iterates the passages of a JSONL or psgs_w100 TSV file, validating every line.

    Checks, each reported as ``FILE:LINE: reason``: invalid UTF-8, malformed JSON (or a line that
    is not an object), missing or non-string fields, strings that cannot be stored as UTF-8
    (lone surrogates such as ``"\\ud800"``), empty text, duplicate ids, wrong TSV column count,
    unreadable TSV quoting or over-long fields. With ``skip_bad=True`` a bad line is logged and
    skipped; after iteration ``n_skipped`` counts them and ``skipped`` keeps the first 100
    messages. A TSV header that does not name exactly the columns id, text and title always
    raises.

    Args:
      path: the corpus file; ``.tsv`` means psgs_w100 format, anything else JSONL (override with
        ``fmt="tsv"|"jsonl"``).
      skip_bad: skip bad lines instead of raising :class:`CorpusError`.
      fmt: force the format.

    Attributes (valid after a full iteration):
      n_passages: passages yielded.
      n_skipped: bad lines skipped.
      sha256: hex SHA-256 of the file's bytes.
    """

    def __init__(self, path: str | os.PathLike, *, skip_bad: bool = False, fmt: str | None = None):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.fmt = fmt or ("tsv" if self.path.suffix.lower() == ".tsv" else "jsonl")
        if self.fmt not in ("tsv", "jsonl"):
            raise ValueError(f"fmt must be 'tsv' or 'jsonl', got {fmt!r}")
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file not found: {self.path}")
        self._columns = TSV_HEADER  # a TSV file's column order, read from its header
        self.n_passages = 0
        self.n_skipped = 0
        self.skipped: list[str] = []
        self.sha256 = ""

    def __iter__(self) -> Iterator[Passage]:
        self.n_passages, self.n_skipped, self.skipped = 0, 0, []
        seen: dict[str, int] = {}  # id -> line number of its first occurrence
        digest = hashlib.sha256()
        parse = self._parse_tsv if self.fmt == "tsv" else self._parse_json
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                digest.update(raw)
                if line_no == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                    if self.fmt == "tsv":  # never skippable: it says how to read the rest
                        self._columns = self._read_header(raw)
                        continue
                try:
                    passage = self._check(parse(raw, line_no), seen, line_no)
                except CorpusError as e:
                    if not self.skip_bad:
                        raise
                    self._skip(str(e))
                    continue
                if passage is not None:
                    self.n_passages += 1
                    yield passage
        self.sha256 = digest.hexdigest()
        if self.n_skipped:
            log.warning("%s: skipped %d bad line(s)", self.path, self.n_skipped)

    def _error(self, line_no: int, reason: str) -> CorpusError:
        return CorpusError(f"{self.path}:{line_no}: {reason}")

    def _skip(self, message: str) -> None:
        self.n_skipped += 1
        if len(self.skipped) < 100:
            self.skipped.append(message)
        log.debug("skipping %s", message)

    def _decode(self, raw: bytes, line_no: int) -> str:
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise self._error(line_no, f"invalid UTF-8 at byte {e.start}") from None

    def _parse_json(self, raw: bytes, line_no: int) -> dict | None:
        line = self._decode(raw, line_no)
        if not line.strip():
            return None  # blank lines (e.g. a trailing newline) carry nothing
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise self._error(line_no, f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise self._error(line_no, f"expected a JSON object, got {type(record).__name__}")
        return record

    def _split_tsv(self, line: str, line_no: int) -> list[str]:
        # DPR's psgs_w100 quotes text fields CSV-style ("" inside quotes); csv handles that.
        try:
            return next(csv.reader([line], delimiter="\t"), [])
        except csv.Error as e:  # e.g. a field over csv.field_size_limit() characters
            raise self._error(line_no, f"unreadable TSV line ({e})") from None

    def _read_header(self, raw: bytes) -> tuple[str, ...]:
        """The column names of line 1, which must be id, text and title in some order."""
        line = self._decode(raw, 1)
        columns = tuple(self._split_tsv(line, 1))
        if sorted(columns) != sorted(TSV_HEADER):
            raise self._error(
                1,
                f"expected a header naming the columns id, text and title (tab-separated, "
                f"e.g. 'id<TAB>text<TAB>title'), got {line[:80]!r}; add or fix the header line",
            )
        return columns

    def _parse_tsv(self, raw: bytes, line_no: int) -> dict | None:
        line = self._decode(raw, line_no)
        if not line.strip():
            return None
        fields = self._split_tsv(line, line_no)
        if len(fields) != 3:
            names = ", ".join(self._columns)
            raise self._error(
                line_no, f"expected 3 tab-separated fields ({names}), got {len(fields)}"
            )
        return dict(zip(self._columns, fields, strict=True))

    def _check(self, record: dict | None, seen: dict[str, int], line_no: int) -> Passage | None:
        if record is None:
            return None
        missing = [key for key in ("id", "title", "text") if key not in record]
        if missing:
            raise self._error(line_no, f"missing field(s) {', '.join(map(repr, missing))}")
        pid = record["id"]
        if isinstance(pid, bool) or not isinstance(pid, str | int):
            raise self._error(line_no, f"field 'id' must be a string or integer, got {pid!r}")
        for key in ("title", "text"):
            if not isinstance(record[key], str):
                raise self._error(line_no, f"field {key!r} must be a string")
        pid = str(pid)
        for key, value in (("id", pid), ("title", record["title"]), ("text", record["text"])):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape, e.g. "\ud800"
                bad = value[e.start]
                raise self._error(
                    line_no,
                    f"field {key!r} holds a lone surrogate {bad!r} at character {e.start}, "
                    "which is not text (fix the escape, or use --skip-bad-lines)",
                ) from None
        if not pid:
            raise self._error(line_no, "empty id")
        if not record["text"].strip():
            raise self._error(line_no, f"empty text for id {pid!r}")
        if pid in seen:
            raise self._error(line_no, f"duplicate id {pid!r} (first seen at line {seen[pid]})")
        seen[pid] = line_no
        return Passage(pid, record["title"], record["text"])


# ----------------------------------------------------------------------------------------------
# Splitting


def split_document(
    doc_id: str, title: str, text: str, words_per_passage: int = 100
) -> list[Passage]:
    """Splits one document into passages of ``words_per_passage`` words carrying its title.

    DPR (Karpukhin et al., 2020, sec. 4.1) cuts Wikipedia articles into disjoint 100-word blocks;
    the last block keeps the remaining words, however few. Words are whitespace-separated tokens
    and are re-joined with single spaces. Passage ids are ``f"{doc_id}_{i}"``.

    Example: ``split_document("d", "T", "a b c d e", 2)`` gives texts ``"a b"``, ``"c d"``, ``"e"``.
    """
    if words_per_passage < 1:
        raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
    words = text.split()
    return [
        Passage(f"{doc_id}_{n}", title, " ".join(words[start : start + words_per_passage]))
        for n, start in enumerate(range(0, len(words), words_per_passage))
    ]


def split_passages(passages: Iterable[Passage], words_per_passage: int = 100) -> Iterator[Passage]:
    """Applies :func:`split_document` to every document of a stream."""
    for doc in passages:
        yield from split_document(doc.id, doc.title, doc.text, words_per_passage)


# ----------------------------------------------------------------------------------------------
# Store


def _read_meta(path: Path) -> dict:
    """The store's meta.json: count, bytes and sha256, each checked."""
    meta = _files.read_json(path, CorpusError)
    kinds = {"count": int, "bytes": int, "sha256": str}
    bad = [
        key
        for key, kind in kinds.items()
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)
    ]
    if bad or meta["count"] < 0 or meta["bytes"] < 0:
        raise CorpusError(f"{path}: missing or invalid field(s) {bad or ['count/bytes']}")
    return meta


def _check_offsets(offsets: np.ndarray, size: int, path: Path, block: int = 1 << 20) -> None:
    """Raises CorpusError unless ``offsets`` start at 0, never fall and end at ``size``.

    Read in blocks, so a 21M-passage store (63M offsets) never sits in memory at once.
    """
    if offsets[0] != 0 or offsets[-1] != size:
        first, last = int(offsets[0]), int(offsets[-1])
        raise CorpusError(f"{path}: offsets run from {first} to {last}, not from 0 to {size}")
    for start in range(0, len(offsets) - 1, block):
        chunk = np.asarray(offsets[start : start + block + 1])
        if (np.diff(chunk) < 0).any():
            where = start + int(np.flatnonzero(np.diff(chunk) < 0)[0])
            raise CorpusError(f"{path}: offset {where + 1} falls below the one before: damaged")


class PassageStore:
    """Read-only passages by integer id, memory-mapped: O(1) access, nothing loaded up front.

    Layout of the directory: ``passages.bin`` holds, for every passage in id order, the UTF-8
    bytes of its string id, title and text back to back; ``offsets.bin`` holds ``3 * N + 1``
    little-endian int64 boundaries, so passage ``i`` spans ``offsets[3i : 3i + 4]``;
    ``meta.json`` holds the count and the SHA-256 of both files.

    Build one with :meth:`write`; open one with ``PassageStore(path)``. Opening checks the
    meta file, both files' sizes and that the offsets rise from 0 to the blob's size, so a
    truncated or garbled store is a :class:`CorpusError` naming the file, never empty titles.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _files.restore_replaced(self.path)  # a write interrupted between its two renames
        meta_path = self.path / _STORE_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a passage store (no {_STORE_META}): {self.path}")
        meta = _read_meta(meta_path)
        self.sha256: str = meta["sha256"]
        self._n: int = meta["count"]
        offsets_path, blob_path = self.path / _STORE_OFFSETS, self.path / _STORE_BLOB
        for file, size in ((offsets_path, 8 * (3 * self._n + 1)), (blob_path, meta["bytes"])):
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes"
                raise CorpusError(f"{file}: {found}, but {meta_path} says {size} bytes")
        self._offsets = np.memmap(offsets_path, dtype="<i8", mode="r")
        _check_offsets(self._offsets, meta["bytes"], offsets_path)
        # np.memmap cannot map an empty file; an empty blob only happens for an empty store.
        self._blob = np.memmap(blob_path, np.uint8, "r") if meta["bytes"] else b""

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Passage:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"passage {i} out of range for a store of {self._n}")
        i %= self._n
        a, b, c, d = (int(x) for x in self._offsets[3 * i : 3 * i + 4])
        fields = bytes(self._blob[a:d])
        pid, title, text = fields[: b - a], fields[b - a : c - a], fields[c - a :]
        try:
            return Passage(pid.decode(), title.decode(), text.decode())
        except UnicodeDecodeError:
            raise CorpusError(
                f"{self.path / _STORE_BLOB}: passage {i} is not UTF-8: the store is damaged"
            ) from None

    def __iter__(self) -> Iterator[Passage]:
        for i in range(self._n):
            yield self[i]

    def get(self, ids: Sequence[int] | np.ndarray) -> list:
        """Passages for an array of integer ids of any shape, as nested lists of that shape.

        A negative id is a missing search result (the indexes return -1 when they find fewer
        than k documents) and gives ``None``, not the passage counted from the end.
        """
        ids = np.asarray(ids)
        if ids.ndim == 0:
            return None if ids < 0 else self[int(ids)]
        return [self.get(row) for row in ids]

    def titles_and_texts(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        """Titles and texts of passages ``start..stop-1``, for batched encoding."""
        rows = [self[i] for i in range(start, stop)]
        return [p.title for p in rows], [p.text for p in rows]

    @staticmethod
    def write(passages: Iterable[Passage], path: str | os.PathLike) -> PassageStore:
        """Writes ``passages`` (a stream, never held in memory) as a store at ``path``.

        The store is written into ``path + ".tmp"`` and moved into place once complete
        (``rag_jax._files.replace_dir``), so a crash leaves no half-written store at ``path``. An
        existing ``path`` is replaced, and deleted only once the new store is in place.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        digest = hashlib.sha256()
        count, position = 0, 0
        with open(tmp / _STORE_BLOB, "wb") as blob, open(tmp / _STORE_OFFSETS, "wb") as offsets:
            offsets.write(struct.pack("<q", 0))
            for p in passages:
                pid, title, text = p.id.encode(), p.title.encode(), p.text.encode()
                id_end = position + len(pid)
                title_end = id_end + len(title)
                position = title_end + len(text)
                ends = struct.pack("<3q", id_end, title_end, position)
                record = pid + title + text
                blob.write(record)
                offsets.write(ends)
                # Hash the boundaries too, so ("ab", "c") and ("a", "bc") differ.
                digest.update(ends)
                digest.update(record)
                count += 1
        meta = {"count": count, "bytes": position, "sha256": digest.hexdigest()}
        (tmp / _STORE_META).write_text(json.dumps(meta, indent=1))
        _files.replace_dir(tmp, path)
        return PassageStore(path)
