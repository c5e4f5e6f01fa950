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
    path.write_text("id\tbody\ttitle\n1\tt\tT\n")
    for skip_bad in (False, True):  # a header is never skipped as a bad line
        with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:1: expected a header"):
            list(CorpusReader(path, skip_bad=skip_bad))
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


# Issue 14, section 4: every kind of unreadable input is a CorpusError with file and line, and
# --skip-bad-lines gets past each one.


def test_a_lone_surrogate_escape_is_a_bad_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(
        _jsonl([GOOD, b'{"id": "b", "title": "B", "text": "a \\ud800 b"}', {**GOOD, "id": "c"}])
    )
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:2: field 'text' holds a lone"):
        list(CorpusReader(path))
    reader = CorpusReader(path, skip_bad=True)
    store = PassageStore.write(reader, tmp_path / "store")  # the store accepts what remains
    assert [p.id for p in store] == ["a", "c"] and reader.n_skipped == 1
    path.write_bytes(_jsonl([b'{"id": "\\udfff", "title": "B", "text": "x"}']))
    with pytest.raises(CorpusError, match=r":1: field 'id' holds a lone surrogate"):
        list(CorpusReader(path))


def test_an_over_long_tsv_field_is_a_bad_line(tmp_path):
    path = tmp_path / "psgs.tsv"
    long_text = '"' + "x" * 200_000 + '"'  # beyond csv.field_size_limit()
    path.write_text(f"id\ttext\ttitle\n1\tok\tT\n2\t{long_text}\tLong\n3\tfine\tU\n")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:3: unreadable TSV line"):
        list(CorpusReader(path))
    reader = CorpusReader(path, skip_bad=True)
    assert [p.id for p in reader] == ["1", "3"] and reader.n_skipped == 1


@pytest.mark.parametrize("skip_bad", [False, True])
def test_tsv_columns_are_read_by_the_header_names(tmp_path, skip_bad):
    path = tmp_path / "psgs.tsv"
    path.write_text("id\ttitle\ttext\n1\tAaron\tAaron is a prophet\n")
    reader = CorpusReader(path, skip_bad=skip_bad)
    assert list(reader) == [Passage("1", "Aaron", "Aaron is a prophet")]
    assert reader.n_skipped == 0  # the header was read, not skipped
    path.write_text("title\ttext\tid\nAaron\tAaron is a prophet\t1\n")
    assert list(CorpusReader(path, skip_bad=skip_bad)) == [
        Passage("1", "Aaron", "Aaron is a prophet")
    ]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path, skip_bad):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + _jsonl([GOOD, {**GOOD, "id": "b"}]))
    reader = CorpusReader(jsonl, skip_bad=skip_bad)
    assert [p.id for p in reader] == ["a", "b"] and reader.n_skipped == 0
    assert reader.sha256 == hashlib.sha256(jsonl.read_bytes()).hexdigest()  # of the file as is
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfid\ttext\ttitle\n1\tt\tT\n")
    assert list(CorpusReader(tsv, skip_bad=skip_bad)) == [Passage("1", "T", "t")]


def _store(tmp_path, n=30):
    passages = [Passage(f"id{i}", f"Title {i}", f"text number {i} " * 3) for i in range(n)]
    return PassageStore.write(passages, tmp_path / "store").path


def test_a_truncated_blob_is_named_at_load(tmp_path):
    path = _store(tmp_path)
    blob = path / "passages.bin"
    blob.write_bytes(blob.read_bytes()[:-40])
    with pytest.raises(CorpusError, match=r"passages\.bin: \d+ bytes, but .*meta\.json says"):
        PassageStore(path)
    blob.unlink()
    with pytest.raises(CorpusError, match=r"passages\.bin: missing"):
        PassageStore(path)


def test_garbled_offsets_are_named_at_load(tmp_path):
    path = _store(tmp_path)
    offsets_path = path / "offsets.bin"
    offsets = np.fromfile(offsets_path, "<i8")
    garbled = offsets.copy()
    garbled[40] = 3  # same size, one boundary out of order
    garbled.tofile(offsets_path)
    with pytest.raises(CorpusError, match=r"offsets\.bin: offset 40 falls below the one before"):
        PassageStore(path)
    garbled = offsets.copy()
    garbled[-1] += 7  # points past the end of the blob
    garbled.tofile(offsets_path)
    with pytest.raises(CorpusError, match=r"offsets\.bin: offsets run from 0 to \d+, not from 0"):
        PassageStore(path)
    offsets[:-1].tofile(offsets_path)
    with pytest.raises(CorpusError, match=r"offsets\.bin: \d+ bytes, but .*meta\.json says"):
        PassageStore(path)


@pytest.mark.parametrize(
    "meta", ['{"count": 30, "sha256": "ab"}', '{"count": "30", "bytes": 1, "sha256": "a"}', "{"]
)
def test_a_bad_store_meta_file_is_named(tmp_path, meta):
    path = _store(tmp_path)
    (path / "meta.json").write_text(meta)
    with pytest.raises(CorpusError, match=r"meta\.json: (missing or invalid field|not valid JSON)"):
        PassageStore(path)


def test_huge_texts_are_cut_before_tokenizing():
    """A 36 MB line once took 5.4 GB to tokenize; only what truncation can keep is passed."""
    from rag_jax.index.encode import MAX_CHARS_PER_TOKEN, hf_tokenize_fn

    seen = []

    def tokenizer(texts, pairs, **kwargs):
        seen.append([len(t) for t in texts] + [len(p) for p in pairs or []])
        return {"input_ids": [[1] * kwargs["max_length"] for _ in texts]}

    tokenize = hf_tokenize_fn(tokenizer, 16)
    tokenize(["t" * 10, "x " * 5_000_000], ["y" * 3_000_000, "short"])
    assert seen == [[10, 16 * MAX_CHARS_PER_TOKEN, 16 * MAX_CHARS_PER_TOKEN, 5]]
