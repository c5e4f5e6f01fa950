"""Issue 14 for the index: builds never destroy what is not theirs, degenerate vectors and
queries never pass silently, and every argument is checked before the work starts."""

import errno
import json
import os
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax.index import (
    ExactIndex,
    KnowledgeSource,
    Manifest,
    ScannConfig,
    ScannIndex,
    TextEncoder,
    build_index,
    encode_texts,
    load_index,
)
from rag_jax.index.build import BuildError
from rag_jax.index.corpus import CorpusError
from rag_jax.index.encode import EncodingError
from rag_jax.index.manifest import IndexMismatchError

VOCAB, DIM = 257, 8
BUILD = dict(batch_size=8, chunk_size=16, progress=False)


def toy_encoder(table=None, *, vocab_size=VOCAB, tokenize=None, poison=None) -> TextEncoder:
    """Mean of hashed word embeddings; ``poison`` = (word, value) makes texts holding the word
    encode to ``value`` (NaN, 0, ...) in every dimension."""
    if table is None:
        table = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    marker = zlib.crc32(poison[0].encode()) % (VOCAB - 1) + 1 if poison else -1

    def apply(params, input_ids, attention_mask):
        vectors = params["table"][input_ids]  # (B, T, H)
        mask = attention_mask[..., None].astype(jnp.float32)
        mean = (vectors * mask).sum(1) / mask.sum(1)  # (B, H)
        if poison is None:
            return mean
        hit = ((input_ids == marker) & (attention_mask > 0)).any(1, keepdims=True)
        return jnp.where(hit, jnp.float32(poison[1]), mean)

    def hashed(texts, pairs=None):
        pairs = pairs if pairs is not None else [""] * len(texts)
        return [
            [zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in f"{a} {b}".split()][:48]
            for a, b in zip(texts, pairs, strict=True)
        ]

    params = {"table": jnp.asarray(table)}
    return TextEncoder(apply, params, tokenize or hashed, DIM, "toy", 48, vocab_size=vocab_size)


def write_corpus(path: Path, n: int, special: dict[int, str] | None = None) -> None:
    """n passages doc0..doc{n-1}; ``special`` {i: text} replaces some texts."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            text = (special or {}).get(i) or " ".join(f"w{j}" for j in rng.integers(0, 300, 8))
            f.write(json.dumps({"id": f"doc{i}", "title": f"T{i}", "text": text}) + "\n")


class Loader:
    """A document-encoder loader that records whether the build got as far as loading it."""

    def __init__(self, encoder=None):
        self.encoder, self.calls = encoder or toy_encoder(), 0

    def __call__(self):
        self.calls += 1
        return self.encoder


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


# ----------------------------------------------------------------------------------------------
# 1. Never destroy what is not ours


def _user_dir(tmp_path, out):
    out.mkdir()
    (out / "notes.txt").write_text("keep")


def _user_file(tmp_path, out):
    out.write_text("keep")


def _encoder_dir(tmp_path, out):  # --out pointed at the encoder's own directory
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


def _corpus_dir(tmp_path, out):  # --out pointed at the directory holding the corpus
    out.mkdir()
    write_corpus(out / "inside.jsonl", 5)


def _index_with_extras(tmp_path, out):  # an index of ours, plus a file someone put there
    write_corpus(tmp_path / "c0.jsonl", 5)
    build_index(tmp_path / "c0.jsonl", toy_encoder(), out, backend="exact", **BUILD)
    (out / "notes.txt").write_text("keep")


@pytest.mark.parametrize(
    "make", [_user_dir, _user_file, _encoder_dir, _corpus_dir, _index_with_extras]
)
def test_build_refuses_a_target_that_is_not_an_index_of_ours(tmp_path, make):
    out = tmp_path / "target"
    make(tmp_path, out)
    write_corpus(tmp_path / "c.jsonl", 20)
    corpus = out / "inside.jsonl" if make is _corpus_dir else tmp_path / "c.jsonl"
    before = _snapshot(out)
    loader = Loader()
    with pytest.raises(BuildError, match=r"refusing to replace it|inside the output directory"):
        build_index(corpus, loader, out, backend="exact", **BUILD)
    assert _snapshot(out) == before  # untouched, and no work was done
    assert loader.calls == 0
    assert leftovers(out) == []  # no .lock, no .partial


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_a_partial_or_lock_that_is_not_ours_is_refused(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 10)
    out = tmp_path / "index"
    (tmp_path / "index.partial").mkdir()
    (tmp_path / "index.partial" / "thesis.tex").write_text("keep")
    with pytest.raises(BuildError, match=r"index\.partial holds thesis\.tex"):
        build_index(tmp_path / "c.jsonl", toy_encoder(), out, backend="exact", **BUILD)
    assert (tmp_path / "index.partial" / "thesis.tex").read_text() == "keep"
    (tmp_path / "index.partial" / "thesis.tex").rename(tmp_path / "thesis.tex")
    (tmp_path / "index.lock").write_text("my lock notes")
    with pytest.raises(BuildError, match=r"index\.lock exists and is not an empty lock file"):
        build_index(tmp_path / "c.jsonl", toy_encoder(), out, backend="exact", **BUILD)
    assert (tmp_path / "index.lock").read_text() == "my lock notes"


def test_failed_builds_remove_the_lock_and_keep_only_what_a_resume_needs(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 40)
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "title": "A"}\n')
    out = tmp_path / "index"
    with pytest.raises(CorpusError):
        build_index(tmp_path / "bad.jsonl", toy_encoder(), out, backend="exact", **BUILD)
    assert leftovers(out) == []  # nothing to resume: nothing left

    encoder, calls = toy_encoder(), []

    def crashing(texts, pairs=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of encoding
        return encoder.tokenize(texts, pairs)

    crashing_encoder = toy_encoder(tokenize=crashing)
    with pytest.raises(KeyboardInterrupt) as error:
        build_index(tmp_path / "c.jsonl", crashing_encoder, out, backend="exact", **BUILD)
    assert leftovers(out) == ["index.partial"]  # no lock
    assert any("run the same build again to resume" in n for n in error.value.__notes__)
    manifest = build_index(tmp_path / "c.jsonl", encoder, out, backend="exact", **BUILD)
    assert manifest.count == 40 and leftovers(out) == []


def test_the_embeddings_file_is_allocated_before_encoding(tmp_path):
    """A sparse memory map hits a full disk as SIGBUS mid-build; reserved blocks cannot."""
    write_corpus(tmp_path / "c.jsonl", 300)
    calls = []

    def stop_at_once(texts, pairs=None):
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(
            tmp_path / "c.jsonl", toy_encoder(tokenize=stop_at_once), tmp_path / "i", **BUILD
        )
    stat = os.stat(tmp_path / "i.partial" / "embeddings.npy")
    assert stat.st_size > 300 * DIM * 4
    assert stat.st_blocks * 512 >= stat.st_size  # every block exists on disk


def test_a_full_disk_is_an_oserror_naming_the_output_and_the_build_resumes(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.jsonl", 40)
    out = tmp_path / "index"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=rf"no space left .* building {out}") as error:
        build_index(tmp_path / "c.jsonl", toy_encoder(), out, backend="exact", **BUILD)
    assert error.value.errno == errno.ENOSPC
    assert leftovers(out) == ["index.partial"]
    monkeypatch.undo()
    assert build_index(tmp_path / "c.jsonl", toy_encoder(), out, **BUILD).count == 40


# ----------------------------------------------------------------------------------------------
# 2. NaN and degenerate vectors never pass silently


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_an_encoder_with_a_nan_weight_fails_the_build_before_encoding(tmp_path, backend):
    write_corpus(tmp_path / "c.jsonl", 30)
    table = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    table[17, 3] = np.nan
    with pytest.raises(EncodingError, match=r"NaN or inf weights in \['table'\]"):
        build_index(tmp_path / "c.jsonl", toy_encoder(table), tmp_path / "i", backend=backend)
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "NaN or inf vector"), (np.inf, "NaN or inf vector"), (0.0, "all-zero vector")],
)
@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_a_degenerate_vector_fails_the_build_naming_the_first_passage(
    tmp_path, value, message, backend
):
    write_corpus(tmp_path / "c.jsonl", 50, special={23: "poison here", 41: "poison too"})
    encoder = toy_encoder(poison=("poison", value))
    out = tmp_path / "i"
    with pytest.raises(EncodingError, match=rf"passage 'doc23' \(row 23\).*{message}"):
        build_index(tmp_path / "c.jsonl", encoder, out, backend=backend, **BUILD)
    assert not out.exists() and not (tmp_path / "i.lock").exists()


def test_float16_overflow_is_caught_after_the_cast(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 20, special={5: "huge"})
    encoder = toy_encoder(poison=("huge", 1e6))  # finite in float32, inf in float16
    build_index(tmp_path / "c.jsonl", encoder, tmp_path / "f32", backend="exact", **BUILD)
    with pytest.raises(EncodingError, match=r"passage 'doc5'.*NaN or inf"):
        build_index(tmp_path / "c.jsonl", encoder, tmp_path / "f16", dtype="float16", **BUILD)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 20)
    base = toy_encoder()

    def big_ids(texts, pairs=None):  # a tokenizer of a larger vocabulary for passage 9
        ids = base.tokenize(texts, pairs)
        return [[*row, VOCAB + 3] if "T9" in t else row for row, t in zip(ids, texts, strict=True)]

    with pytest.raises(EncodingError, match=rf"passage 'doc9'.*token id {VOCAB + 3} is outside"):
        build_index(tmp_path / "c.jsonl", toy_encoder(tokenize=big_ids), tmp_path / "i", **BUILD)

    def negative(texts, pairs=None):
        return [[-1, *row] for row in base.tokenize(texts, pairs)]

    with pytest.raises(EncodingError, match=r"text 1 \('b'\): token id -1"):
        encode_texts(toy_encoder(tokenize=lambda t, p=None: [[5], [-1]]), ["a", "b"])
    with pytest.raises(EncodingError, match=r"passage 'doc0'.*token id -1"):
        build_index(tmp_path / "c.jsonl", toy_encoder(tokenize=negative), tmp_path / "i", **BUILD)


def test_encode_texts_refuses_nan_queries_from_the_encoder():
    encoder = toy_encoder(poison=("bad", np.nan))
    good = encode_texts(encoder, ["fine words", "other words"])
    assert np.isfinite(good).all()
    with pytest.raises(EncodingError, match=r"text 1 \('a bad question'\).*NaN or inf vector"):
        encode_texts(encoder, ["fine", "a bad question"])


N_DOCS = 37


@pytest.fixture(scope="module")
def indexes():
    docs = np.random.default_rng(0).standard_normal((N_DOCS, DIM)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    return docs, {
        "exact": ExactIndex.from_array(docs),
        "sharded": ExactIndex.from_array(docs, mesh=mesh),
        "scann": ScannIndex.build(docs),
    }


BAD_QUERIES = {
    "nan": (lambda q: q.at[1, 2].set(np.nan), 3, r"queries hold NaN or inf .*first row 1"),
    "inf": (lambda q: q.at[0, 0].set(-np.inf), 3, r"queries hold NaN or inf"),
    "dim": (lambda q: q[:, :5], 3, rf"queries must have shape \(B, {DIM}\), got \(2, 5\)"),
    "rank 1": (lambda q: q[0], 3, rf"queries must have shape \(B, {DIM}\), got \({DIM},\)"),
    "rank 3": (lambda q: q[None], 3, r"queries must have shape"),
    "float k": (lambda q: q, 2.0, r"k must be an integer, got 2\.0"),
    "bool k": (lambda q: q, True, r"k must be an integer, got True"),
    "k 0": (lambda q: q, 0, rf"k must be in \[1, {N_DOCS}\]"),
    "k > N": (lambda q: q, N_DOCS + 1, rf"k must be in \[1, {N_DOCS}\]"),
}


@pytest.mark.parametrize("backend", ["exact", "sharded", "scann"])
@pytest.mark.parametrize("kind", sorted(BAD_QUERIES))
def test_one_rule_for_bad_queries_on_every_backend(indexes, backend, kind):
    _, index = indexes
    spoil, k, message = BAD_QUERIES[kind]
    queries = jnp.asarray(np.random.default_rng(1).standard_normal((2, DIM)), jnp.float32)
    bad = spoil(queries)
    with pytest.raises(ValueError, match=message):
        index[backend].search(bad if backend != "scann" else np.asarray(bad), k)
    if kind in ("nan", "inf"):  # the single-query path of ScaNN too
        with pytest.raises(ValueError, match=r"queries hold NaN or inf \(1 of 1 rows"):
            index[backend].search(np.asarray(bad)[[1 if kind == "nan" else 0]], k)


@pytest.mark.parametrize("backend", ["exact", "sharded", "scann"])
def test_an_empty_batch_gives_an_empty_result(indexes, backend):
    result = indexes[1][backend].search(np.zeros((0, DIM), np.float32), 4)
    assert [np.shape(x) for x in result] == [(0, 4), (0, 4), (0, 4, DIM)]
    assert [np.asarray(x).dtype for x in result] == [np.int32, np.float32, np.float32]


def test_sharded_search_of_the_whole_corpus_equals_brute_force(indexes):
    docs, index = indexes  # 37 rows over 4 shards: 3 padding rows
    queries = np.random.default_rng(2).standard_normal((3, DIM)).astype(np.float32)
    result = index["sharded"].search(queries, N_DOCS)
    expected = np.argsort(-(queries @ docs.T), axis=1, kind="stable")
    np.testing.assert_array_equal(np.sort(np.asarray(result.ids), axis=1), np.sort(expected, 1))
    np.testing.assert_array_equal(np.asarray(result.ids)[:, :5], expected[:, :5])


def test_scann_build_refuses_nan_rows_instead_of_aborting(indexes):
    docs = indexes[0].copy()
    docs[11, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"embeddings hold NaN or inf in 1 row\(s\), the first row 11"
    ):
        ScannIndex.build(docs)


# ----------------------------------------------------------------------------------------------
# 5. Every parameter checked before the work starts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(chunk_size=0), r"chunk_size must be >= 1, got 0"),
        (dict(batch_size=-4), r"batch_size must be >= 1, got -4"),
        (dict(batch_size=2.5), r"batch_size must be an integer"),
        (dict(split_words=0), r"split_words must be >= 1"),
        (dict(dtype="int8"), r"dtype must be one of"),
        (dict(backend="faiss"), r"backend must be one of"),
    ],
)
def test_build_arguments_are_checked_before_the_corpus_is_read(tmp_path, kwargs, message):
    write_corpus(tmp_path / "c.jsonl", 10)
    loader = Loader()
    args = {**BUILD, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_index(tmp_path / "c.jsonl", loader, tmp_path / "i", **args)
    assert loader.calls == 0 and leftovers(tmp_path / "i") == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reorder_k", 0, r"ScannConfig\.reorder_k must be >= 1"),
        ("leaves_to_search", -2, r"ScannConfig\.leaves_to_search must be >= 1"),
        ("num_leaves", 1, r"ScannConfig\.num_leaves must be >= 2"),
        ("num_leaves", "8", r"ScannConfig\.num_leaves must be an integer"),
        ("dims_per_block", 0, r"ScannConfig\.dims_per_block must be >= 1"),
        ("anisotropic_threshold", float("nan"), r"anisotropic_threshold must be finite"),
    ],
)
def test_scann_settings_are_checked_when_made(field, value, message):
    with pytest.raises(ValueError, match=message):
        ScannConfig(**{field: value})


def test_the_manifest_records_the_encoder_path_resolvably(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c.jsonl", 10)
    (tmp_path / "enc").mkdir()
    monkeypatch.chdir(tmp_path)
    build_index("c.jsonl", toy_encoder(), "i", backend="exact", encoder_path="enc", **BUILD)
    assert Manifest.read(tmp_path / "i").encoder_path == str(tmp_path / "enc")


def test_the_manifest_records_preprocessing_and_loading_compares_it(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 10)
    recorded = {"pooling": "mean", "normalize": True, "max_length": 48, "tokenizer_sha256": "ab"}
    encoder = TextEncoder(**{**toy_encoder().__dict__, "preprocessing": recorded})
    build_index(tmp_path / "c.jsonl", encoder, tmp_path / "i", backend="exact", **BUILD)
    assert Manifest.read(tmp_path / "i").encoder_preprocessing == recorded
    KnowledgeSource(tmp_path / "i", encoder_preprocessing=dict(recorded))  # the same: loads
    for key, other in [("normalize", False), ("pooling", "cls"), ("tokenizer_sha256", "cd")]:
        with pytest.raises(IndexMismatchError, match=rf"{key} .* \(index\) != .* \(given\)"):
            load_index(tmp_path / "i", encoder_preprocessing={**recorded, key: other})


# ----------------------------------------------------------------------------------------------
# 4. A damaged index is an error naming the file, never served


@pytest.fixture
def built(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 40)
    build_index(tmp_path / "c.jsonl", toy_encoder(), tmp_path / "i", backend="scann", **BUILD)
    return tmp_path / "i"


def test_a_garbled_embeddings_file_is_named_and_never_unpickled(built):
    path = built / "embeddings.npy"
    header = path.read_bytes()[:128]
    for content in [b"garbage" * 30, header, b"\x93NUMPY\x01\x00" + b"{'descr': '|O'}"]:
        path.write_bytes(content)
        with pytest.raises(IndexMismatchError, match=r"embeddings\.npy: not a readable") as e:
            load_index(built)
        assert "pickle" not in str(e.value) and "rebuild the index" in str(e.value)


def test_a_damaged_store_is_named_through_load_index(built):
    blob = built / "passages" / "passages.bin"
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(IndexMismatchError, match=r"passages\.bin: .* rebuild the index"):
        load_index(built)


def test_damaged_scann_settings_and_assets_are_named(built):
    config_file = built / "scann" / "scann_index.json"
    good = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(good), "leaves": 3}))
    with pytest.raises(ValueError, match=r"scann_index\.json: unknown setting\(s\) \['leaves'\]"):
        load_index(built)
    config_file.write_text(json.dumps({**json.loads(good), "reorder_k": 0}))
    with pytest.raises(ValueError, match=r"scann_index\.json: ScannConfig\.reorder_k must be"):
        load_index(built)
    config_file.write_text(good)
    load_index(built)  # intact again
    assets = sorted((built / "scann").glob("*.npy"))
    assert assets  # ScaNN's dataset (and, partitioned, its codes and centroids)
    for asset in assets:
        saved = asset.read_bytes()
        asset.write_bytes(saved[: len(saved) // 2])
        with pytest.raises(ValueError, match=r"scann: ScaNN cannot read its saved searcher"):
            load_index(built)
        asset.write_bytes(saved)
