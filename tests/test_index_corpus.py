"""Corpus reading (every bad-line kind, with file and line), DPR splitting and the passage store."""

import hashlib
import json
import random
import re

import numpy as np
import pytest

from rag_jax.index.corpus import (
    CorpusError,
    CorpusReader,
    Passage,
    PassageStore,
    split_document,
    split_passages,
)


def _jsonl(records: list) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


GOOD = {"id": "a", "title": "Alpha", "text": "first passage"}
BAD_LINES = {  # line 2 of a two-line file -> the reason the error must give
    "malformed": (b'{"id": "b", "title": "B", "text": ', "malformed JSON"),
    "not an object": (b'["b", "B", "text"]', "expected a JSON object, got list"),
    "missing title": (_jsonl([{"id": "b", "text": "x"}])[:-1], "missing field(s) 'title'"),
    "missing id and text": (_jsonl([{"title": "B"}])[:-1], "missing field(s) 'id', 'text'"),
    "empty text": (_jsonl([{"id": "b", "title": "B", "text": "  \t"}])[:-1], "empty text"),
    "duplicate id": (
        _jsonl([{"id": "a", "title": "B", "text": "x"}])[:-1],
        "duplicate id 'a' (first seen at line 1)",
    ),
    "invalid utf-8": (b'{"id": "b", "title": "\xff\xfe", "text": "x"}', "invalid UTF-8"),
    "non-string text": (_jsonl([{"id": "b", "title": "B", "text": 3}])[:-1], "'text' must be"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_bad_jsonl_line_names_file_line_and_reason(tmp_path, kind):
    bad_line, reason = BAD_LINES[kind]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_jsonl([GOOD, bad_line]))
    with pytest.raises(CorpusError) as error:
        list(CorpusReader(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert reason in str(error.value)


def test_skip_bad_lines_keeps_good_ones_and_counts_bad_ones(tmp_path):
    bad = [line for line, _ in BAD_LINES.values()]
    lines = [GOOD, *bad, {"id": 7, "title": "Seven", "text": "integer ids become strings"}]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_jsonl(lines) + b"\n")  # a trailing blank line is not an error
    reader = CorpusReader(path, skip_bad=True)
    passages = list(reader)
    assert passages == [
        Passage("a", "Alpha", "first passage"),
        Passage("7", "Seven", "integer ids become strings"),
    ]
    assert reader.n_skipped == len(bad) and reader.n_passages == 2
    assert all(message.startswith(f"{path}:") for message in reader.skipped)
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_psgs_w100_tsv_with_dpr_quoting(tmp_path):
    path = tmp_path / "psgs_w100.tsv"
    path.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        "2\tplain text, no quotes\tSecond\n"
    )
    assert list(CorpusReader(path)) == [
        Passage("1", "Aaron", 'Aaron ( or ; "Ahärôn") is a prophet'),
        Passage("2", "Second", "plain text, no quotes"),
    ]


def test_tsv_bad_header_and_bad_column_count(tmp_path):
    path = tmp_path / "bad_header.tsv"
    path.write_text("id\ttitle\ttext\n1\tt\tT\n")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:1: expected the header"):
        list(CorpusReader(path))
    path = tmp_path / "bad_row.tsv"
    path.write_text("id\ttext\ttitle\n1\tok\tT\n2\tonly two\n")
    with pytest.raises(
        CorpusError, match=rf"^{re.escape(str(path))}:3: expected 3 tab-separated fields.*got 2"
    ):
        list(CorpusReader(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        CorpusReader(tmp_path / "nope.jsonl")


def test_split_document_dpr_style():
    words = [f"w{i}" for i in range(250)]
    passages = split_document("doc", "Title", "  ".join(words) + "\n")
    assert [p.id for p in passages] == ["doc_0", "doc_1", "doc_2"]
    assert all(p.title == "Title" for p in passages)
    assert [len(p.text.split()) for p in passages] == [100, 100, 50]
    assert " ".join(p.text for p in passages) == " ".join(words)  # nothing lost or reordered
    assert [p.text for p in split_document("d", "T", "a b c d e", 2)] == ["a b", "c d", "e"]
    assert split_document("d", "T", "   ") == []
    with pytest.raises(ValueError, match="words_per_passage"):
        split_document("d", "T", "a", 0)
    docs = [Passage("x", "X", "a b c"), Passage("y", "Y", "d e f g")]
    assert [p.id for p in split_passages(docs, 2)] == ["x_0", "x_1", "y_0", "y_1"]


def test_passage_store_random_access(tmp_path):
    rng = random.Random(0)
    alphabet = "abc ÄÖü 中文 é\t\"'"
    passages = [
        Passage(
            f"id{i}",
            "".join(rng.choices(alphabet, k=rng.randint(0, 12))),
            "".join(rng.choices(alphabet, k=rng.randint(1, 300))),
        )
        for i in range(500)
    ]
    store = PassageStore.write(iter(passages), tmp_path / "store")
    assert not (tmp_path / "store.tmp").exists()
    reopened = PassageStore(tmp_path / "store")
    assert len(reopened) == 500 and reopened.sha256 == store.sha256
    for i in rng.sample(range(500), 100):
        assert reopened[i] == passages[i]
    assert reopened[-1] == passages[-1]
    ids = np.array([[3, 1], [499, 0]])
    assert reopened.get(ids) == [[passages[3], passages[1]], [passages[499], passages[0]]]
    # -1 marks a missing search result: None, not the last passage (reopened[-1] above).
    assert reopened.get(np.array([[7, -1]])) == [[passages[7], None]]
    assert reopened.titles_and_texts(10, 13) == (
        [p.title for p in passages[10:13]],
        [p.text for p in passages[10:13]],
    )
    with pytest.raises(IndexError):
        reopened[500]


def test_store_checksum_depends_on_field_boundaries(tmp_path):
    one = PassageStore.write([Passage("1", "ab", "c")], tmp_path / "one")
    two = PassageStore.write([Passage("1", "a", "bc")], tmp_path / "two")
    assert one.sha256 != two.sha256
    assert one[0] == Passage("1", "ab", "c") and two[0] == Passage("1", "a", "bc")
