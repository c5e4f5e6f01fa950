"""Index builds with a toy encoder: resumption is bit-identical, failures never destroy an index,
manifests catch mismatches, and a KnowledgeSource swaps indexes in one call."""

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.index import (
    CorpusError,
    CorpusReader,
    ExactIndex,
    IndexMismatchError,
    KnowledgeSource,
    Manifest,
    PassageStore,
    ScannIndex,
    TextEncoder,
    build_index,
    encode_passages,
    encode_texts,
    load_index,
    tune_index,
)

VOCAB, DIM = 257, 8


def toy_encoder(seed: int = 0, dim: int = DIM) -> TextEncoder:
    """Mean of hashed word embeddings: a real (if dull) jittable encoder with a tokenizer."""
    table = np.random.default_rng(seed).standard_normal((VOCAB, dim)).astype(np.float32)

    def apply(params, input_ids, attention_mask):
        vectors = params["table"][input_ids]  # (B, T, H)
        mask = attention_mask[..., None].astype(jnp.float32)  # (B, T, 1)
        return (vectors * mask).sum(1) / mask.sum(1)  # (B, H)

    def tokenize(texts, pairs=None):
        pairs = pairs if pairs is not None else [""] * len(texts)
        return [
            [zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in f"{a} {b}".split()][:48]
            for a, b in zip(texts, pairs, strict=True)
        ]

    return TextEncoder(apply, {"table": jnp.asarray(table)}, tokenize, dim, f"toy-{seed}", 48)


def with_tokenize(encoder: TextEncoder, tokenize) -> TextEncoder:
    return dataclasses.replace(encoder, tokenize=tokenize)


def write_corpus(path, n: int, seed: int = 0, extra: list[str] = ()) -> None:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(words, size=rng.integers(3, 45)))
            f.write(json.dumps({"id": f"doc{i}", "title": f"Title {i}", "text": text}) + "\n")
        for line in extra:
            f.write(line + "\n")


BUILD = dict(batch_size=8, chunk_size=16, progress=False)


class SimulatedCrashError(Exception):
    pass


def test_resumed_build_equals_uninterrupted_bit_for_bit(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 150)
    encoder = toy_encoder()
    reference = build_index(corpus, encoder, tmp_path / "reference", backend="scann", **BUILD)

    calls = []

    def interrupting(texts, pairs=None):
        calls.append(len(texts))
        if len(calls) == 5:  # dies while chunk 5 of 10 is being prepared
            raise SimulatedCrashError
        return encoder.tokenize(texts, pairs)

    out = tmp_path / "resumed"
    with pytest.raises(SimulatedCrashError):
        build_index(corpus, with_tokenize(encoder, interrupting), out, backend="scann", **BUILD)
    assert not out.exists()  # nothing half-built is published
    done = json.loads(
        (tmp_path / "resumed.partial/embeddings.npy.progress/done-0.json").read_text()
    )
    assert len(done) >= 3

    calls.clear()

    def counting(texts, pairs=None):
        calls.append(len(texts))
        return encoder.tokenize(texts, pairs)

    resumed = build_index(corpus, with_tokenize(encoder, counting), out, backend="scann", **BUILD)
    assert len(calls) == 10 - len(done)  # only the unfinished chunks were encoded again
    assert not (tmp_path / "resumed.partial").exists()
    a = (tmp_path / "reference/embeddings.npy").read_bytes()
    assert a == (out / "embeddings.npy").read_bytes()
    strip = lambda m: {**dataclasses.asdict(m), "created": None}  # noqa: E731
    assert strip(resumed) == strip(reference)
    embeddings = np.load(out / "embeddings.npy")
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    np.testing.assert_array_equal(
        ScannIndex.load(out / "scann", embeddings).search(queries, 3).ids,
        ExactIndex.from_array(embeddings).search(queries, 3).ids,
    )


def test_embeddings_equal_one_passage_at_a_time_and_float16_is_a_cast(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 40)
    encoder = toy_encoder()
    build_index(corpus, encoder, tmp_path / "f32", backend="exact", **BUILD)
    # an --out whose parents do not exist yet (runs/new/index on a fresh clone): created
    f16_dir = tmp_path / "runs" / "new" / "f16"
    build_index(corpus, encoder, f16_dir, backend="exact", dtype="float16", **BUILD)
    store = PassageStore(tmp_path / "f32/passages")
    embeddings = np.load(tmp_path / "f32/embeddings.npy")
    for i in [0, 7, 39]:  # bucketing and padding do not change a passage's vector
        ids = np.array(encoder.tokenize([store[i].title], [store[i].text]), np.int32)
        alone = encoder.apply(encoder.params, ids, np.ones_like(ids))
        np.testing.assert_allclose(embeddings[i], alone[0], rtol=1e-6, atol=1e-6)
    f16 = np.load(f16_dir / "embeddings.npy")
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, embeddings.astype(np.float16))
    assert load_index(f16_dir).manifest.dtype == "float16"


def test_encoding_sharded_over_four_devices_equals_one_device(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 50)
    store = PassageStore.write(CorpusReader(corpus), tmp_path / "s")
    encoder = toy_encoder()
    one = encode_passages(store, encoder, tmp_path / "one.npy", devices=jax.devices()[:1], **BUILD)
    four = encode_passages(store, encoder, tmp_path / "four.npy", devices=jax.devices(), **BUILD)
    assert len(jax.devices()) == 4
    np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-7)


def test_failed_build_keeps_the_existing_index(tmp_path):
    corpus, bad = tmp_path / "corpus.jsonl", tmp_path / "bad.jsonl"
    write_corpus(corpus, 30)
    write_corpus(bad, 30, extra=['{"id": "doc0", "title": "dup", "text": "again"}'])
    out = tmp_path / "index"
    build_index(corpus, toy_encoder(), out, backend="exact", **BUILD)
    before = (out / "manifest.json").read_text(), (out / "embeddings.npy").read_bytes()
    with pytest.raises(
        CorpusError, match=rf"{bad}:31: duplicate id 'doc0' \(first seen at line 1\)"
    ):
        build_index(bad, toy_encoder(), out, backend="exact", **BUILD)

    def broken(texts, pairs=None):
        raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        build_index(corpus, with_tokenize(toy_encoder(1), broken), out, backend="exact", **BUILD)
    assert ((out / "manifest.json").read_text(), (out / "embeddings.npy").read_bytes()) == before
    assert load_index(out).manifest.count == 30

    # skipping bad lines instead: the count lands in the manifest
    manifest = build_index(bad, toy_encoder(), out, backend="exact", skip_bad=True, **BUILD)
    assert (manifest.n_skipped, manifest.count) == (1, 30)


def test_a_concurrent_build_of_the_same_index_is_refused(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 5)
    with open(tmp_path / "index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running build holds it
        with pytest.raises(RuntimeError, match=r"another build of .*index is running"):
            build_index(corpus, toy_encoder(), tmp_path / "index", backend="exact", **BUILD)


def test_empty_corpus_and_splitting(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": 1, "title": "t", "text": ""}\n')
    with pytest.raises(CorpusError, match="no passages"):
        build_index(empty, toy_encoder(), tmp_path / "e", skip_bad=True, **BUILD)
    long_doc = tmp_path / "long.jsonl"
    text = " ".join(f"w{i}" for i in range(250))
    long_doc.write_text(json.dumps({"id": "d", "title": "Long", "text": text}) + "\n")
    build_index(long_doc, toy_encoder(), tmp_path / "split", split_words=100, **BUILD)
    passages = load_index(tmp_path / "split").passages
    assert [p.id for p in passages] == ["d_0", "d_1", "d_2"]
    assert passages[2].text == " ".join(f"w{i}" for i in range(200, 250))


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    for name, seed in [("a", 0), ("b", 1)]:
        write_corpus(root / f"{name}.jsonl", 40, seed=seed)
        build_index(root / f"{name}.jsonl", toy_encoder(), root / name, backend="exact", **BUILD)
    build_index(root / "a.jsonl", toy_encoder(seed=5), root / "other_encoder", **BUILD)
    build_index(root / "a.jsonl", toy_encoder(dim=4), root / "other_dim", **BUILD)
    return root


def test_manifest_mismatches_are_clear_errors(two_indexes, tmp_path):
    root, encoder = two_indexes, toy_encoder()
    load_index(root / "a", encoder_sha256=encoder.weights_sha256, dim=DIM)  # the right one loads
    with pytest.raises(IndexMismatchError, match=r"built with encoder 'toy-5'.*given is 'toy-0'"):
        load_index(
            root / "other_encoder", encoder_sha256=encoder.weights_sha256, encoder_name="toy-0"
        )
    with pytest.raises(IndexMismatchError, match=r"holds 4-dim vectors .* query vectors are 8-dim"):
        load_index(root / "other_dim", dim=DIM)
    with pytest.raises(IndexMismatchError, match=r"no manifest\.json"):
        load_index(tmp_path)

    for name, tamper, message in [
        ("bad_json", lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
        ("bad_rows", lambda d: np.save(d / "embeddings.npy", np.zeros((3, DIM))), "shape"),
        (
            "bad_store",
            lambda d: PassageStore.write([], d / "passages"),
            "passage store .* does not match the manifest",
        ),
    ]:
        shutil.copytree(root / "a", tmp_path / name)
        tamper(tmp_path / name)
        with pytest.raises(IndexMismatchError, match=message):
            load_index(tmp_path / name)


def test_knowledge_source_hot_swap(two_indexes):
    root, encoder = two_indexes, toy_encoder()
    source = KnowledgeSource(root / "a", encoder_sha256=encoder.weights_sha256, dim=DIM)
    assert isinstance(source.index, ExactIndex)
    query = np.load(root / "b/embeddings.npy")[[3]]  # passage 3 of corpus b, as a query
    _, passages = source.retrieve(query, 2)
    store_b = PassageStore(root / "b/passages")
    assert passages[0][0] != store_b[3]

    assert source.swap(root / "b").corpus_sha256 == store_b.sha256
    result, passages = source.retrieve(query, 2)
    assert int(result.ids[0, 0]) == 3 and passages[0][0] == store_b[3]

    for bad in ["other_encoder", "other_dim"]:
        with pytest.raises(IndexMismatchError):
            source.swap(root / bad)
        assert source.path == root / "b"  # a failed swap keeps the current index serving
    assert source.passages([[3]]) == [[store_b[3]]]

    scann_view = KnowledgeSource(root / "other_encoder", backend="scann")
    assert isinstance(scann_view.index, ScannIndex)
    exact_view = KnowledgeSource(root / "other_encoder", backend="exact")
    np.testing.assert_array_equal(
        scann_view.search(query, 5).ids, np.asarray(exact_view.search(query, 5).ids)
    )
    assert Manifest.read(root / "other_encoder").backend == "scann"


MULTI_PROCESS_WORKER = """
import faulthandler, os, sys
faulthandler.dump_traceback_later(90, exit=True)  # a hung worker prints where it hangs
process_id, port, corpus, out, tests_dir = sys.argv[1:]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
sys.path.insert(0, tests_dir)
from test_index_build import BUILD, toy_encoder, with_tokenize
from rag_jax.index import build_index
import numpy as np, time
if process_id == "1":  # a slow host: it must still find every file where it expects it
    np_load = np.load
    np.load = lambda *a, **k: time.sleep(1) or np_load(*a, **k)
encoder, chunks = toy_encoder(), []
def tokenize(texts, pairs=None):
    chunks.append(len(texts))
    return encoder.tokenize(texts, pairs)
manifest = build_index(corpus, with_tokenize(encoder, tokenize), out, backend="exact", **BUILD)
print("chunks encoded here:", len(chunks), "count:", manifest.count, flush=True)
"""


def test_multi_process_build_splits_chunks_over_hosts(tmp_path):
    """Two JAX processes (2 CPU devices each) build one index; each encodes its own chunks."""
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 100)  # 7 chunks of 16
    build_index(corpus, toy_encoder(), tmp_path / "single", backend="exact", **BUILD)
    (tmp_path / "worker.py").write_text(MULTI_PROCESS_WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [str(port), str(corpus), str(tmp_path / "multi"), str(Path(__file__).parent)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:  # never leave a hung worker behind
            w.kill()
    if any(w.returncode != 0 for w in workers):
        pytest.fail(
            "\n".join(
                f"worker {i} exit {w.returncode}:\n{err[-4000:]}"
                for i, (w, (_, err)) in enumerate(zip(workers, outputs, strict=True))
            )
        )
    counts = [int(out.split("chunks encoded here:")[1].split()[0]) for out, _ in outputs]
    assert sorted(counts) == [3, 4]  # 7 chunks dealt out round-robin
    assert all("count: 100" in out for out, _ in outputs)
    np.testing.assert_allclose(
        np.load(tmp_path / "multi/embeddings.npy"),
        np.load(tmp_path / "single/embeddings.npy"),
        rtol=1e-6,
        atol=1e-7,
    )


def test_tune_index_saves_the_settings_and_leaves_the_searcher(tmp_path, two_indexes):
    write_corpus(tmp_path / "big.jsonl", 2600, seed=3)  # above ScaNN's brute-force size
    encoder = toy_encoder()
    build_index(tmp_path / "big.jsonl", encoder, tmp_path / "big", **BUILD)
    built = load_index(tmp_path / "big").index
    searcher_files = {
        f.name: f.read_bytes()
        for f in (tmp_path / "big" / "scann").iterdir()
        if f.suffix != ".json"
    }
    rng = np.random.default_rng(7)
    questions = [" ".join(rng.choice([f"w{i}" for i in range(300)], size=6)) for _ in range(150)]
    queries = encode_texts(encoder, questions)

    config = tune_index(tmp_path / "big", queries, k=10, target_recall=0.9)
    expected = ScannIndex(built.searcher, built.embeddings, built.config).tune(queries, 10, 0.9)
    assert config == expected and config != built.config
    reloaded = load_index(tmp_path / "big")
    assert reloaded.index.config == config  # later loads search with the tuned settings
    assert reloaded.manifest.backend_config == dataclasses.asdict(config)
    assert not list((tmp_path / "big").rglob("*.tmp"))
    for name, content in searcher_files.items():  # the searcher itself is not rewritten
        assert (tmp_path / "big" / "scann" / name).read_bytes() == content

    with pytest.raises(IndexMismatchError, match="built without a ScaNN searcher"):
        tune_index(two_indexes / "a", queries)
    with pytest.raises(IndexMismatchError, match="holds 8-dim vectors"):
        tune_index(tmp_path / "big", queries[:, :4])
    other = toy_encoder(seed=5)
    with pytest.raises(IndexMismatchError, match="built with encoder 'toy-0'"):
        tune_index(
            tmp_path / "big", queries, encoder_sha256=other.weights_sha256, encoder_name=other.name
        )
    with pytest.raises(ValueError, match="target_recall must be in"):
        tune_index(tmp_path / "big", queries, target_recall=0.0)
    assert load_index(tmp_path / "big").index.config == config  # failed calls changed nothing
