"""Training the document encoder BERT_d (``model.train_doc_encoder``) and refreshing the device
index in the training program (``data.refresh_every``), on the toy world of tests/toy.py: its
index is sharded over the 4 test devices."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from rag_jax import device_retrieval, doc_encoder, training
from rag_jax.builders import build_model, open_knowledge
from rag_jax.checkpoints import saved_shapes
from rag_jax.data import read_qa
from rag_jax.host_retrieval import BatchBuilder
from rag_jax.index import build_index, load_text_encoder
from rag_jax.marginalize import rag_sequence_nll
from rag_jax.models import save_bert_encoder
from rag_jax.optim import make_optimizer, trainable
from rag_jax.sharding import make_mesh, place_on_mesh
from tests.toy import (
    MINILM_DIR,
    ON_MESH,
    TOKENIZER_FILES,
    read_metrics,
    tiny_config,
    tiny_encoder,
)

DOC = {"data.retrieval": "device", "model.train_doc_encoder": True, "rag.n_docs": 4, **ON_MESH}


def index_vectors(corpus_file, encoder_dir, out_dir) -> np.ndarray:
    """The vectors ``python -m rag_jax.index build`` writes for ``corpus_file`` with the encoder
    of ``encoder_dir``, as the toy index was built (max_length 32)."""
    build_index(
        corpus_file,
        lambda: load_text_encoder(encoder_dir, max_length=32),
        out_dir,
        backend="exact",
        progress=False,
    )
    return np.load(out_dir / "embeddings.npy")


def device_inputs(config, model):
    """``(corpus, questions)`` of device retrieval (no mesh): the toy corpus with its BERT_d
    tokens (and ``data.rescore_candidates``), the first 4 questions."""
    question_tokenizer, generator_tokenizer = model._tokenizers
    knowledge = open_knowledge(config, model)
    builder = BatchBuilder(
        model.config, question_tokenizer, generator_tokenizer, model.generator.config,
        knowledge=knowledge,
    )  # fmt: skip
    examples, _ = read_qa(config.data.train)
    corpus = device_retrieval.corpus_from_knowledge(knowledge, builder, examples[0].question)
    passages = knowledge.passages(np.arange(knowledge.manifest.count))
    ids, lengths = doc_encoder.passage_tokens(
        passages, doc_encoder.doc_encoder_dir(config), knowledge.manifest, model.doc_encoder
    )
    corpus = doc_encoder.with_doc_tokens(corpus, ids, lengths, config.data.rescore_candidates)
    questions, _ = device_retrieval.question_batch(examples[:4], builder, passages[0])
    return corpus, jax.tree.map(jnp.asarray, questions)


def device_batch(config, model):
    """The first 4 questions' RagBatch as device retrieval builds it (no mesh), with BERT_d
    tokens: the index's top K."""
    corpus, questions = device_inputs(config, model)
    plain = dataclasses.replace(corpus, rescore_candidates=0)
    batch, _, _ = device_retrieval.retrieve(model.query_encoder, plain, questions, model.config)
    return batch


def test_the_gradient_reaches_bert_d_and_equals_a_finite_difference(toy):
    config = tiny_config(toy, **DOC)
    model, *tokenizers = build_model(config)
    model._tokenizers = tokenizers
    batch = device_batch(config, model)
    assert batch.doc_token_ids.shape[:2] == (4, 4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def train_loss(params, batch):
        return training.loss_fn(nnx.merge(graphdef, params, rest), batch)[0]

    # jitted: one compile each instead of the forward and backward dispatched op by op
    train_grad = jax.jit(jax.grad(train_loss))
    grads = train_grad(params, batch)["doc_encoder"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0  # it reaches BERT_d
    # Stored vectors instead of tokens: BERT_d is not on the loss's path at all.
    frozen = train_grad(params, batch.replace(doc_token_ids=None, doc_token_mask=None))
    assert all(not np.any(g) for g in jax.tree.leaves(frozen["doc_encoder"]))

    # The untrained toy generator reads every passage alike, so -log p(y|x) barely depends on
    # p(z|x) (gradients ~1e-6, below float32's finite differences). The check therefore takes
    # the same marginal loss (eq. 1, rag_sequence_nll) and the model's own doc_scores (BERT_q
    # against BERT_d's fresh d(z)), with fixed generator logits that differ strongly per
    # passage in place of the generator's.
    B, K, T = *batch.doc_mask.shape, batch.targets.shape[1]
    V = model.generator.config.vocab_size
    logits = 3 * jax.random.normal(jax.random.key(1), (B, K, T, V))

    @jax.jit
    def loss(params):
        scores = nnx.merge(graphdef, params, rest).doc_scores(batch)  # (B, K)
        return jnp.mean(rag_sequence_nll(logits, scores, batch.targets, batch.target_mask))

    grads = jax.jit(jax.grad(loss))(params)["doc_encoder"]
    # Central difference along a random unit direction v of BERT_d's parameters:
    # [L(p + h v) - L(p - h v)] / 2h = grad(L).v + O(h^2 L'''). In float32 each loss (~30 here)
    # carries a rounding error of a few ulp (ulp(30) = 1.9e-6; ~1e-5 with the sums'
    # accumulation); divided by 2h = 0.02 that is ~5e-4 absolute, and the O(h^2) term of a
    # smooth network is of the order 1e-4 L'''. Hence atol 2e-3 on a derivative required to
    # be above 0.05, plus 2% relative.
    # The direction skips the 30522-row word-embedding table (most rows unused by the batch; a
    # random direction there would carry almost no signal) and takes every other parameter.
    leaves, treedef = jax.tree.flatten(params["doc_encoder"])
    keys = jax.random.split(jax.random.key(0), len(leaves))
    v = [
        jax.random.normal(k, x.shape, x.dtype) * (x.shape[0] != V)
        for k, x in zip(keys, leaves, strict=True)
    ]
    scale = 1 / jnp.sqrt(sum(jnp.sum(x * x) for x in v))
    v = jax.tree.unflatten(treedef, [x * scale for x in v])
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    h = 1e-2

    def directional(v):
        def shifted(sign):
            moved = jax.tree.map(lambda p, d: p + sign * h * d, params["doc_encoder"], v)
            return float(loss(nnx.State({**params, "doc_encoder": moved})))

        numeric = (shifted(+1) - shifted(-1)) / (2 * h)
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True)
        analytic = float(sum(jnp.vdot(g, d) for g, d in pairs))
        return numeric, analytic

    for direction in (v, jax.tree.map(lambda g: g / norm, grads)):  # random, and the gradient's
        numeric, analytic = directional(direction)
        assert abs(analytic) > 0.05, analytic  # a direction the loss really depends on
        assert numeric == pytest.approx(analytic, rel=2e-2, abs=2e-3)


def test_a_refresh_with_the_initial_weights_equals_index_build(toy, tmp_path):
    """BERT_d (seed 1) is not the toy index's encoder (seed 0): the run re-encodes the corpus
    at the start, on the 4-device mesh, to the vectors `index build` gives with it."""
    other = tiny_encoder(tmp_path / "other", seed=1)
    expected = index_vectors(toy / "corpus.jsonl", other, tmp_path / "index")
    config = tiny_config(toy, **DOC, **{"model.doc_encoder": str(other)})
    mesh = make_mesh(config)
    assert mesh.size == 4
    model, *tokenizers = build_model(config, mesh)
    examples, _ = read_qa(config.data.train)
    with training.make_retriever(config, model, tokenizers, examples, mesh) as retriever:
        sharding = retriever.corpus.index.embeddings.sharding
        assert sharding.spec == PartitionSpec(("data", "fsdp"))  # rows split over 4 devices
        before = np.asarray(retriever.corpus.index.embeddings)[: len(expected)]
        np.testing.assert_array_equal(before, np.load(toy / "index" / "embeddings.npy"))
        with jax.set_mesh(mesh):
            retriever.before_step(model, 0, retriever.snapshot(model))
        vectors = retriever.corpus.index.embeddings
        assert vectors.sharding == sharding  # rows stay split, as the step was compiled for
        assert len(retriever.refreshes) == 1
    vectors = np.asarray(vectors)
    assert not np.any(vectors[len(expected) :])  # the shards' padding rows stay zero
    np.testing.assert_allclose(vectors[: len(expected)], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, np.load(toy / "index" / "embeddings.npy"), atol=1e-3)


def test_after_training_a_refresh_equals_index_build_with_the_trained_bert_d(toy, tmp_path):
    config = tiny_config(toy, **DOC, **{"data.refresh_every": 2})
    mesh = make_mesh(config)
    model, *tokenizers = build_model(config, mesh)
    examples, _ = read_qa(config.data.train)
    tx, _ = make_optimizer(config)
    retriever = training.make_retriever(config, model, tokenizers, examples, mesh)
    optimizer = place_on_mesh(model, tx, mesh, config, trainable(config))
    initial = jax.tree.map(np.asarray, nnx.state(model.doc_encoder, nnx.Param))
    with retriever, jax.set_mesh(mesh):
        snapshot = retriever.snapshot(model)
        for step in range(2):
            retriever.before_step(model, step, snapshot)
            assert len(retriever.refreshes) == 0  # BERT_d is the index's encoder: no refresh
            snapshot = retriever.snapshot(model)
            prepared, _ = retriever.submit(examples[4 * step : 4 * step + 4], snapshot).result()
            retriever.step(model, optimizer, prepared)
        retriever.before_step(model, 2, snapshot)  # refresh_every=2: due
        assert [r["step"] for r in retriever.refreshes] == [2]
        snapshot = retriever.snapshot(model)
        assert int(snapshot["refresh_step"][...]) == 2
        vectors = np.asarray(retriever.corpus.index.embeddings)[: len(examples)]
    trained = nnx.state(model.doc_encoder, nnx.Param)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), initial, trained)
    assert any(jax.tree.leaves(moved))  # BERT_d did train
    jax.tree.map(np.testing.assert_array_equal, snapshot["index_encoder"], trained)
    saved = tmp_path / "trained_bert_d"
    save_bert_encoder(model.doc_encoder, saved)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, saved / name)
    expected = index_vectors(toy / "corpus.jsonl", saved, tmp_path / "index")
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)


def test_rescoring_keeps_the_best_k_of_l_by_the_current_bert_d(toy, tmp_path):
    """L = 8 candidates (every passage) from the stale index (seed-0 encoder), re-scored with
    BERT_d (seed 1): the K = 2 kept, in order, are the top 2 of brute force over the vectors
    `index build` gives with BERT_d, not the stale index's top 2."""
    other = tiny_encoder(tmp_path / "other", seed=1)
    fresh = index_vectors(toy / "corpus.jsonl", other, tmp_path / "index")  # (N, H)
    stale = np.load(toy / "index" / "embeddings.npy")
    overrides = {"model.doc_encoder": str(other), "rag.n_docs": 2, "data.rescore_candidates": 8}
    config = tiny_config(toy, **{**DOC, **overrides})
    model, *tokenizers = build_model(config)
    model._tokenizers = tokenizers
    model.eval()
    batch = device_batch(config, model)
    corpus, questions = device_inputs(config, model)
    doc_encoder = nnx.merge(*nnx.split(model.doc_encoder))
    _, ids, _ = device_retrieval.retrieve(
        model.query_encoder, corpus, questions, model.config, doc_encoder
    )
    q = np.asarray(model.embed_questions(batch.question_ids, batch.question_mask))
    expected = np.argsort(-(q @ fresh.T), axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.asarray(ids), expected)
    assert not np.array_equal(expected, np.argsort(-(q @ stale.T), axis=1)[:, :2])


def test_off_or_frozen_bert_d_trains_as_the_frozen_index(toy, tmp_path):
    """Off: no BERT_d in the model or the checkpoint. On but frozen (``optimizer.freeze``):
    BERT_d's fresh d(z) equal the index's stored vectors up to float32 rounding (~1e-7), so
    the first two steps' figures equal the off run's to 1e-5; later ones to 1e-3, because
    Adam's update g/sqrt(v) turns rounding in near-zero gradient components into updates of
    the learning rate's size (lr 1e-2 here)."""
    common = {"train_steps": 4, "log_every": 1, "checkpoint.every": 4, **DOC}
    off = tiny_config(toy, **{**common, "model.train_doc_encoder": False})
    training.train(off, str(tmp_path / "off"))
    frozen = tiny_config(toy, **common, **{"optimizer.freeze": "^doc_encoder/"})
    training.train(frozen, str(tmp_path / "frozen"))
    a, b = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "frozen")
    for name in ("loss", "doc_entropy", "grad_norm"):
        np.testing.assert_allclose(
            [m[name] for m in b[:2]], [m[name] for m in a[:2]], rtol=1e-5, atol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(
            [m[name] for m in b], [m[name] for m in a], rtol=1e-3, atol=1e-3, err_msg=name
        )
    off_arrays = saved_shapes(tmp_path / "off" / "checkpoints" / "4")
    assert not any("doc_encoder" in p or "index_encoder" in p for p in off_arrays)
    frozen_arrays = saved_shapes(tmp_path / "frozen" / "checkpoints" / "4")
    assert any(p.startswith("params/doc_encoder/") for p in frozen_arrays)
    assert "retrieval_query_encoder/refresh_step" in frozen_arrays
    assert any(p.startswith("retrieval_query_encoder/index_encoder/") for p in frozen_arrays)


# Re-scoring on too (6 candidates, the best 4 kept), dropout on, parameters sharded: resumed,
# exported, as any other setting. The program of test_training_distributed's one-process BERT_d
# run: the session's XLA cache compiles it once for both files.
RESUME = {
    "log_every": 1, "checkpoint.every": 10, "data.refresh_every": 2,
    "data.rescore_candidates": 6, **DOC, "mesh.data": 1, "mesh.fsdp_params": True,
    "model.dropout": 0.1, "model.attention_dropout": 0.1,
}  # fmt: skip


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
    """6 steps, refreshes after steps 2 and 4, uninterrupted."""
    workdir = tmp_path_factory.mktemp("straight")
    training.train(tiny_config(toy, train_steps=6, **RESUME), str(workdir))
    return workdir


@pytest.mark.parametrize("stop", [3, 4])  # after the refresh of step 2; just before step 4's
def test_a_run_resumed_across_a_refresh_equals_the_uninterrupted_one(toy, tmp_path, stop, straight):
    """Stopped at ``stop`` and resumed to step 6: the losses of the uninterrupted run, bit for
    bit (the resumed run re-encodes the corpus with the BERT_d weights its checkpoint's snapshot
    holds, in the same jitted program, on the same inputs)."""
    common = RESUME
    resumed = tmp_path / "resumed"
    training.train(tiny_config(toy, train_steps=stop, **common), str(resumed))
    training.train(tiny_config(toy, train_steps=6, **common), str(resumed))
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    assert [m["grad_norm"] for m in b] == [m["grad_norm"] for m in a]


def test_the_trained_bert_d_is_exported_and_only_its_index_serves_the_model(
    toy, tmp_path, straight
):
    """A model whose BERT_d trained is evaluated (eval.py, ask: ``Evaluator.from_workdir``)
    only against an index built with that BERT_d: the training index (the untrained encoder's
    vectors) is refused, naming the export; the export's doc_encoder/ is the trained BERT_d and
    builds an index that is accepted."""
    from rag_jax.evaluation import Evaluator
    from rag_jax.export import export
    from rag_jax.index import IndexMismatchError
    from rag_jax.index.encode import weights_sha256

    with pytest.raises(IndexMismatchError, match=r"BERT_d trained in .*step 6.*rag_jax.export"):
        Evaluator.from_workdir(straight)  # the config's index, built before BERT_d trained
    record = export(straight, tmp_path / "export")
    exported = tmp_path / "export" / "doc_encoder"
    bert_d = load_text_encoder(exported, max_length=32)
    assert record["document_encoder"]["encoder_sha256"] == bert_d.weights_sha256
    vectors = index_vectors(toy / "corpus.jsonl", exported, tmp_path / "index")
    assert not np.allclose(vectors, np.load(toy / "index" / "embeddings.npy"), atol=1e-3)
    evaluator = Evaluator.from_workdir(straight, index=tmp_path / "index")
    trained = weights_sha256(nnx.state(evaluator.model.doc_encoder, nnx.Param))
    assert trained == bert_d.weights_sha256  # the checkpoint's BERT_d, exported unchanged


def test_settings_no_run_can_use_are_refused(toy, tmp_path):
    cases = [
        ({"data.refresh_every": 2, "data.retrieval": "device"}, r"refresh_every=2.*train_doc_enc"),
        ({"model.train_doc_encoder": True}, r"device retrieval only.*'host'"),
        ({**DOC, "data.refresh_every": -1}, r"refresh_every must be an int >= 0"),
        ({**DOC, "rag.marginalization": "closed_book"}, r"closed_book"),
        ({"data.rescore_candidates": 6}, r"rescore_candidates=6 re-ranks.*train_doc_encoder"),
        ({**DOC, "data.rescore_candidates": 4}, r"rescore_candidates=4 must exceed rag.n_docs=4"),
        ({**DOC, "data.rescore_candidates": 9}, r"rescore_candidates=9 but the index .* 8 pass"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            training.train(tiny_config(toy, **overrides), str(tmp_path / "run"))
        assert not (tmp_path / "run").exists()  # refused before anything is written
