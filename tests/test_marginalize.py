"""Tests for rag_jax.marginalize: course values, reference parity, properties, jit/vmap/grad."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RagSequenceForGeneration, RagTokenForGeneration

from rag_jax import _vocab_stats
from rag_jax import marginalize as mg
from tests.oracles import reference_nll

jax.config.update("jax_default_matmul_precision", "highest")


def probs_to_logits(target_probs):
    """Two-token vocabulary whose token 0 has the given probability: logits = log [p, 1-p]."""
    p = np.asarray(target_probs, np.float64)
    return jnp.asarray(np.log(np.stack([p, 1.0 - p], axis=-1)), jnp.float32)


def course_nll(doc_probs, token_probs):
    """RAG losses for a 1-example batch whose target is token 0 at every position."""
    logits = probs_to_logits(token_probs)[None]  # (1, K, T, 2)
    doc_scores = jnp.log(jnp.asarray(doc_probs, jnp.float32))[None]  # (1, K)
    n_tokens = logits.shape[2]
    targets = jnp.zeros((1, n_tokens), jnp.int32)
    mask = jnp.ones((1, n_tokens), bool)
    seq = mg.rag_sequence_nll(logits, doc_scores, targets, mask)[0]
    tok = mg.rag_token_nll(logits, doc_scores, targets, mask)[0]
    return float(seq), float(tok)


# ----------------------------------------------------------------------------------------
# Course values (rag-course.txt), derived by hand from the course's formulas.
# ----------------------------------------------------------------------------------------


def test_lesson2_retrieval_probabilities():
    query = jnp.array([[0.3, 0.8, 0.1]])
    docs = jnp.array([[[0.4, 0.7, 0.2], [0.3, 0.5, 0.6], [0.1, 0.2, 0.8]]])
    np.testing.assert_allclose(mg.retriever_scores(query, docs)[0], [0.70, 0.55, 0.27], atol=1e-6)
    # exp(.70), exp(.55), exp(.27) = 2.014, 1.733, 1.310; sum 5.057.
    probs = np.exp(mg.retriever_log_probs(query, docs)[0])
    np.testing.assert_allclose(
        probs, [2.01375 / 5.05696, 1.73325 / 5.05696, 1.30996 / 5.05696], atol=1e-5
    )
    np.testing.assert_allclose(probs, [0.398, 0.343, 0.259], atol=5e-4)


def test_lesson2_exercise():
    # q·d1 = 0.2 + 0.03 + 0.72 = 0.95, q·d2 = 0.45 + 0.15 + 0.09 = 0.69;
    # p(d1) = 1 / (1 + exp(-0.26)) = 0.56464.
    query = jnp.array([[0.5, 0.3, 0.9]])
    docs = jnp.array([[[0.4, 0.1, 0.8], [0.9, 0.5, 0.1]]])
    probs = np.exp(mg.retriever_log_probs(query, docs)[0])
    np.testing.assert_allclose(probs, [0.564642, 0.435358], atol=1e-5)


def test_lesson4_worked_example():
    seq, tok = course_nll([0.6, 0.4], [[0.8, 0.9], [0.5, 0.7]])
    assert math.exp(-seq) == pytest.approx(0.6 * 0.72 + 0.4 * 0.35, abs=1e-6)  # 0.572
    assert math.exp(-tok) == pytest.approx(0.68 * 0.82, abs=1e-6)  # 0.5576 ≈ 0.558
    # Lesson 5: the training loss of this example, -log 0.5576 ≈ 0.584.
    assert tok == pytest.approx(0.58410, abs=1e-4)


def test_lesson4_exercise():
    # Seq: 0.6·0.7·0.6·0.85 + 0.4·0.4·0.3·0.9 = 0.2142 + 0.0432 = 0.2574.
    # Token: (0.42 + 0.16)(0.36 + 0.12)(0.51 + 0.36) = 0.58·0.48·0.87 = 0.242208.
    seq, tok = course_nll([0.6, 0.4], [[0.70, 0.60, 0.85], [0.40, 0.30, 0.90]])
    assert math.exp(-seq) == pytest.approx(0.2574, abs=1e-6)
    assert math.exp(-tok) == pytest.approx(0.242208, abs=1e-6)


def test_lesson5_exercise_total_loss():
    # L = -log 0.72 - log 0.35 = 0.32850 + 1.04982 = 1.37833.
    token_lp = jnp.log(jnp.array([[[0.72]], [[0.35]]]))  # (B=2, K=1, T=1)
    ll = mg.rag_token_log_likelihood(token_lp, jnp.zeros((2, 1)), jnp.ones((2, 1), bool))
    assert float(-ll.sum()) == pytest.approx(1.378326, abs=1e-5)


def test_lesson6_mona_lisa():
    # The lesson's marginals (0.798 = 0.85·p1 + 0.70·p2, 0.906 = 0.92·p1 + 0.88·p2, ...) imply
    # p(z1|x) = 0.65, p(z2|x) = 0.35; their product 0.7975·0.906·0.936·0.7825 = 0.5292 ≈ 0.530.
    table = [[0.85, 0.92, 0.95, 0.80], [0.70, 0.88, 0.91, 0.75]]
    seq, tok = course_nll([0.65, 0.35], table)
    assert math.exp(-tok) == pytest.approx(0.7975 * 0.906 * 0.936 * 0.7825, abs=1e-6)
    assert math.exp(-tok) == pytest.approx(0.530, abs=1.5e-3)
    # Lesson 6 exercise: RAG-Sequence = 0.65·0.59432 + 0.35·0.42042 = 0.533455.
    assert math.exp(-seq) == pytest.approx(0.533455, abs=1e-6)


def test_hands_on_project():
    """The course's hands-on project, with values derived by hand from its starter data.

    Scores q·d: [0.85, 0.35, 0.30, 0.75, 0.79] -> top-3 docs 0, 4, 3 with softmax
    probabilities [0.351296, 0.330838, 0.317866] (the course prints 0.4191/0.3379/0.2430,
    which no softmax of these scores gives). Then
    Seq = Σ p_k·p(paris)·p(<end>) = 0.490033 and Token = 0.605015·0.801672 = 0.485023
    (the course prints 0.521498 and 0.523498), loss = -log 0.490033 = 0.713282.
    """
    query = jnp.array([[0.8, 0.2, 0.1, 0.3]])
    corpus = jnp.array(
        [
            [0.9, 0.3, 0.1, 0.2],
            [0.1, 0.8, 0.2, 0.3],
            [0.2, 0.1, 0.9, 0.1],
            [0.7, 0.2, 0.0, 0.5],
            [0.8, 0.1, 0.1, 0.4],
        ]
    )
    top_scores, top_ids = jax.lax.top_k(query @ corpus.T, 3)
    assert top_ids[0].tolist() == [0, 4, 3]
    doc_lp = mg.retriever_log_probs(query, corpus[top_ids])
    np.testing.assert_allclose(np.exp(doc_lp[0]), [0.351296, 0.330838, 0.317866], atol=1e-6)

    vocab_dist = {  # the starter code's generator table, positions 0 and 1
        0: [
            [0.75, 0.05, 0.05, 0.02, 0.01, 0.02, 0.01, 0.02, 0.02, 0.05],
            [0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01, 0.02, 0.03, 0.85],
        ],
        3: [
            [0.45, 0.15, 0.10, 0.05, 0.03, 0.05, 0.02, 0.05, 0.03, 0.07],
            [0.03, 0.03, 0.03, 0.02, 0.02, 0.02, 0.02, 0.03, 0.05, 0.75],
        ],
        4: [
            [0.60, 0.05, 0.05, 0.03, 0.02, 0.03, 0.02, 0.05, 0.05, 0.10],
            [0.03, 0.02, 0.02, 0.01, 0.01, 0.02, 0.01, 0.03, 0.05, 0.80],
        ],
    }
    logits = jnp.log(jnp.array([vocab_dist[int(i)] for i in top_ids[0]]))[None]  # (1, 3, 2, 10)
    targets, mask = jnp.array([[0, 9]]), jnp.ones((1, 2), bool)
    seq = mg.rag_sequence_nll(logits, top_scores, targets, mask)[0]
    tok = mg.rag_token_nll(logits, top_scores, targets, mask)[0]
    assert math.exp(-seq) == pytest.approx(0.490033, abs=1e-6)
    assert math.exp(-tok) == pytest.approx(0.485023, abs=1e-6)
    assert float(seq) == pytest.approx(0.713282, abs=1e-5)


# ----------------------------------------------------------------------------------------
# Parity with transformers' PyTorch RagSequenceForGeneration / RagTokenForGeneration.
# ----------------------------------------------------------------------------------------


def random_batch(seed, B, K, T, V, min_len, logit_scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, K, T, V)) * logit_scale
    doc_scores = rng.normal(size=(B, K)) * 2.0
    targets = rng.integers(2, V, size=(B, T))  # never the pad id
    lengths = rng.integers(min_len, T + 1, size=B)
    target_mask = np.arange(T)[None, :] < lengths[:, None]
    return logits, doc_scores, targets, target_mask


OURS = {RagSequenceForGeneration: mg.rag_sequence_nll, RagTokenForGeneration: mg.rag_token_nll}


def use_code_path(path: str, small_chunk_elements: int, monkeypatch) -> None:
    """Selects how the statistics over V are computed for the rest of a test.

    "cpu": as on CPU (chunks of rows, sums by matmul), here usually a single chunk;
    "cpu-small-chunks": the same in many chunks, the last one shifted back;
    "fused": the plain fused reductions that GPUs and TPUs run, forced here on the CPU.
    """
    if path == "cpu-small-chunks":
        monkeypatch.setattr(_vocab_stats, "CHUNK_ELEMENTS", small_chunk_elements)
    elif path == "fused":
        monkeypatch.setattr(
            jax.lax, "platform_dependent", lambda *args, default, **_: default(*args)
        )


@pytest.mark.parametrize("model_cls", [RagSequenceForGeneration, RagTokenForGeneration])
@pytest.mark.parametrize(
    "B,K,T,V,epsilon,padded_doc",
    [
        (1, 1, 2, 3, 0.0, False),
        (2, 3, 5, 7, 0.0, False),
        (2, 3, 5, 7, 0.0, True),
        (3, 5, 6, 11, 0.1, False),
        (3, 5, 6, 11, 0.1, True),
        (4, 2, 9, 50, 0.25, False),
        (2, 4, 3, 300, 0.05, True),
    ],
)
@pytest.mark.parametrize("path", ["cpu", "cpu-small-chunks", "fused"])
def test_reference_parity(model_cls, B, K, T, V, epsilon, padded_doc, path, monkeypatch):
    # min_len=2: the reference adds RAG-Sequence's doc prior at target position 1, which is
    # only right when that position is real (see test_sequence_prior_counts_once_...).
    # Small chunks: 2 target positions of RAG-Token, 2BK + 1 rows of V otherwise; both ragged.
    use_code_path(path, (2 * B * K + 1) * V, monkeypatch)
    logits, doc_scores, targets, target_mask = random_batch(B * 100 + T, B, K, T, V, min_len=2)
    if padded_doc:
        doc_scores[0, K // 2] = -np.inf  # a missing document inside the first row
    ref_loss, ref_dlogits, ref_dscores = reference_nll(
        model_cls, logits, doc_scores, targets, target_mask, epsilon
    )

    def loss_fn(logits, doc_scores):
        return OURS[model_cls](
            logits, doc_scores, targets, target_mask, label_smoothing=epsilon
        ).sum()

    args = (jnp.asarray(logits, jnp.float32), jnp.asarray(doc_scores, jnp.float32))
    ours = OURS[model_cls](*args, targets, target_mask, label_smoothing=epsilon)
    dlogits, dscores = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(*args)
    np.testing.assert_allclose(ours, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dlogits, ref_dlogits, atol=1e-5)
    np.testing.assert_allclose(dscores, ref_dscores, atol=1e-5)


@pytest.mark.parametrize("gap", [57.0, 100.0, 1e4])
@pytest.mark.parametrize("path", ["cpu", "cpu-small-chunks", "fused"])
def test_smoothed_token_with_improbable_vocabulary_entries(gap, path, monkeypatch):
    """Smoothed RAG-Token sums log p'(v) over every v, improbable ones included. On CPU it
    first computes p'(v) as a sum of probabilities (one exp per entry) and falls back to log
    space where some p'(v) < 1e-30: entries at log p' ~ -57 (first form) and ~ -100 or
    below (fallback), against the float64 reference, values and gradients."""
    B, K, T, V = 2, 3, 4, 20
    use_code_path(path, (2 * B * K + 1) * V, monkeypatch)
    logits, doc_scores, targets, target_mask = random_batch(8, B, K, T, V, min_len=2)
    logits[1, :, 2, 0] = logits[1, :, 2].max(axis=-1) - gap  # token 0 improbable under all docs
    ref_loss, ref_dlogits, ref_dscores = reference_nll(
        RagTokenForGeneration, logits, doc_scores, targets, target_mask, 0.1
    )

    def loss_fn(lg, sc):
        return mg.rag_token_nll(lg, sc, targets, target_mask, label_smoothing=0.1).sum()

    args = (jnp.asarray(logits, jnp.float32), jnp.asarray(doc_scores, jnp.float32))
    ours = mg.rag_token_nll(*args, targets, target_mask, label_smoothing=0.1)
    dlogits, dscores = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(*args)
    np.testing.assert_allclose(ours, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dlogits, ref_dlogits, atol=1e-5)
    np.testing.assert_allclose(dscores, ref_dscores, atol=1e-5)


def test_sequence_prior_counts_once_where_the_reference_drops_it():
    """One-token targets: the reference adds the prior at position 1, which is padding here,
    so its loss ignores the retriever entirely. The paper's eq. 1 keeps it; so do we."""
    logits, doc_scores, targets, _ = random_batch(7, 3, 4, 3, 9, min_len=1)
    target_mask = np.array([[True, False, False]] * 3)
    ref_loss, _, ref_dscores = reference_nll(
        RagSequenceForGeneration, logits, doc_scores, targets, target_mask, 0.0
    )
    assert np.allclose(ref_dscores, 0.0)  # the reference's bug: no gradient to the retriever

    ours = mg.rag_sequence_nll(jnp.asarray(logits), jnp.asarray(doc_scores), targets, target_mask)
    log_p_first = jax.nn.log_softmax(logits[:, :, 0], axis=-1)  # (B, K, V)
    first_lp = np.take_along_axis(np.asarray(log_p_first), targets[:, None, :1], axis=-1)[..., 0]
    expected = -np.log(np.sum(jax.nn.softmax(doc_scores, -1) * np.exp(first_lp), axis=-1))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert not np.allclose(ours, ref_loss, rtol=1e-3)


# ----------------------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------------------

# A few fixed shapes (each compiles once); hypothesis varies the values, masks and targets.
shapes = st.sampled_from([(1, 1, 1, 3), (2, 3, 4, 5), (3, 4, 5, 8)])
SEQ_NLL = jax.jit(mg.rag_sequence_nll, static_argnames="label_smoothing")
TOKEN_NLL = jax.jit(mg.rag_token_nll, static_argnames="label_smoothing")


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )


@st.composite
def batches(draw):
    B, K, T, V = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    logits, doc_scores, targets, mask = random_batch(seed, B, K, T, V, min_len=0)
    targets = np.random.default_rng(seed).integers(0, V, size=(B, T))
    return (
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(doc_scores, jnp.float32),
        jnp.asarray(targets),
        jnp.asarray(mask),
    )


@settings(max_examples=25, deadline=None)
@given(batches())
def test_sequence_equals_token_when_documents_agree(batch):
    logits, doc_scores, targets, mask = batch
    same = jnp.broadcast_to(logits[:, :1], logits.shape)
    np.testing.assert_allclose(
        SEQ_NLL(same, doc_scores, targets, mask),
        TOKEN_NLL(same, doc_scores, targets, mask),
        rtol=1e-5,
        atol=1e-5,
    )


@settings(max_examples=25, deadline=None)
@given(batches())
def test_one_document_is_plain_nll(batch):
    logits, doc_scores, targets, mask = batch
    logits, doc_scores = logits[:, :1], doc_scores[:, :1]
    full_lp = np_log_softmax(logits[:, 0])
    token_lp = np.take_along_axis(full_lp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    expected = -(token_lp * np.asarray(mask)).sum(-1)
    for fn in (SEQ_NLL, TOKEN_NLL):
        np.testing.assert_allclose(
            fn(logits, doc_scores, targets, mask), expected, rtol=1e-5, atol=1e-5
        )


@settings(max_examples=25, deadline=None)
@given(batches(), st.randoms(use_true_random=False), st.sampled_from([0.0, 0.1]))
def test_document_order_is_irrelevant(batch, random, epsilon):
    logits, doc_scores, targets, mask = batch
    order = list(range(logits.shape[1]))
    random.shuffle(order)
    for fn in (SEQ_NLL, TOKEN_NLL):
        np.testing.assert_allclose(
            fn(logits, doc_scores, targets, mask, label_smoothing=epsilon),
            fn(logits[:, order], doc_scores[:, order], targets, mask, label_smoothing=epsilon),
            rtol=1e-5,
            atol=1e-5,
        )


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compile per shape, not op by op
def loss_and_grad(fn, epsilon, logits, doc_scores, targets, mask):
    def loss(lg, sc):
        return fn(lg, sc, targets, mask, label_smoothing=epsilon).sum()

    return jax.value_and_grad(loss, argnums=(0, 1))(logits, doc_scores)


@settings(max_examples=20, deadline=None)
@given(batches(), st.sampled_from([0.0, 0.1]))
def test_minus_inf_document_equals_removing_it(batch, epsilon):
    logits, doc_scores, targets, mask = batch
    padded_logits = jnp.concatenate([logits, logits[:, :1] * 5.0], axis=1)
    padded_scores = jnp.concatenate([doc_scores, jnp.full_like(doc_scores[:, :1], -jnp.inf)], 1)
    for fn in (mg.rag_sequence_nll, mg.rag_token_nll):
        value, (dlogits, dscores) = loss_and_grad(
            fn, epsilon, padded_logits, padded_scores, targets, mask
        )
        ref_value, (ref_dlogits, ref_dscores) = loss_and_grad(
            fn, epsilon, logits, doc_scores, targets, mask
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dlogits[:, :-1], ref_dlogits, atol=1e-5)
        np.testing.assert_allclose(dscores[:, :-1], ref_dscores, atol=1e-5)
        assert np.all(dlogits[:, -1] == 0) and np.all(dscores[:, -1] == 0)


@pytest.mark.parametrize("fn", [mg.rag_sequence_nll, mg.rag_token_nll])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("path", ["cpu", "cpu-small-chunks", "fused"])
def test_finite_for_bf16_and_extreme_scores(fn, epsilon, path, monkeypatch):
    use_code_path(path, 3 * 16, monkeypatch)
    logits, doc_scores, targets, mask = random_batch(3, 2, 4, 5, 16, min_len=1)
    doc_scores = np.array([[1e4, -1e4, 0.0, -np.inf], [-1e4, -1e4, 1e4, 1e4]])
    logits = logits * 3e3  # extreme logits too

    def loss(lg, sc):
        return fn(lg, sc, targets, mask, label_smoothing=epsilon).sum()

    for dtype in (jnp.float32, jnp.bfloat16):
        args = (jnp.asarray(logits, dtype), jnp.asarray(doc_scores, dtype))
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("fn", [mg.rag_sequence_nll, mg.rag_token_nll])
def test_bf16_close_to_float32(fn):
    logits, doc_scores, targets, mask = random_batch(5, 2, 3, 6, 32, min_len=1, logit_scale=1.0)
    f32 = fn(jnp.asarray(logits, jnp.float32), jnp.asarray(doc_scores, jnp.float32), targets, mask)
    bf16 = fn(
        jnp.asarray(logits, jnp.bfloat16), jnp.asarray(doc_scores, jnp.bfloat16), targets, mask
    )
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)


def test_all_documents_missing_gives_minus_inf_not_nan():
    doc_lp = mg.doc_log_probs(jnp.array([[-jnp.inf, -jnp.inf], [0.0, -jnp.inf]]))
    assert np.all(np.isneginf(doc_lp[0]))
    np.testing.assert_array_equal(doc_lp[1], [0.0, -np.inf])


# ----------------------------------------------------------------------------------------
# Building blocks, jit and vmap.
# ----------------------------------------------------------------------------------------


def test_target_log_probs_matches_full_log_softmax():
    logits, _, targets, _ = random_batch(11, 2, 3, 4, 20, min_len=1)
    ours = mg.target_log_probs(jnp.asarray(logits), targets[:, None, :])
    full = np_log_softmax(logits)
    expected = np.take_along_axis(full, targets[:, None, :, None], axis=-1)[..., 0]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["cpu", "cpu-small-chunks", "fused"])
@pytest.mark.parametrize("transform", ["jit", "vmap"])
@pytest.mark.parametrize("gap", [0.0, 60.0, 100.0, 1e4])
def test_target_log_probs_of_improbable_targets(path, transform, gap, monkeypatch):
    """On CPU the logsumexp is first shifted by the target's logit: exact unless another
    logit exceeds it by more than log(FLT_MAX / V), where the sum overflows and every row is
    recomputed with the row maxima. Rows at and past that gap, mixed with ordinary rows,
    against float64 log-softmax, values and gradients."""
    use_code_path(path, 2 * 50, monkeypatch)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 4, 50)) * 3.0
    targets = rng.integers(0, 50, size=(3, 4))
    logits[1, 2, (targets[1, 2] + 1) % 50] = logits[1, 2, targets[1, 2]] + gap
    logits[2, 0, targets[2, 0]] = -np.inf  # an impossible target: log p = -inf, no NaN
    weights = rng.normal(size=(3, 4))

    def weighted(lg):
        lp = mg.target_log_probs(lg, targets)
        return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0) * weights), lp

    def per_example(lg, tg, w):  # one [4, 50] example at a time, under vmap
        lp = mg.target_log_probs(lg, tg)
        return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0) * w), lp

    x = jnp.asarray(logits, jnp.float32)
    if transform == "jit":
        grad, lp = jax.jit(jax.grad(weighted, has_aux=True))(x)
    else:
        grad, lp = jax.vmap(jax.grad(per_example, has_aux=True))(x, targets, weights)
    full = np_log_softmax(logits.astype(np.float64))
    expected = np.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(lp, expected, rtol=1e-6, atol=1e-5)
    finite = np.isfinite(expected)[..., None]
    one_hot = np.arange(50) == targets[..., None]
    expected_grad = np.where(finite, weights[..., None] * (one_hot - np.exp(full)), 0.0)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_rag_token_log_probs_is_the_mixture():
    rng = np.random.default_rng(2)
    logits, doc_scores = rng.normal(size=(3, 4, 12)), rng.normal(size=(3, 4))
    doc_scores[1, 2] = -np.inf
    ours = mg.rag_token_log_probs(jnp.asarray(logits), jnp.asarray(doc_scores))
    prior = np.exp(doc_scores - doc_scores.max(-1, keepdims=True))
    prior /= prior.sum(-1, keepdims=True)
    token_p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(ours), np.einsum("bk,bkv->bv", prior, token_p), rtol=1e-5)
    np.testing.assert_allclose(np.exp(ours).sum(-1), 1.0, rtol=1e-5)
    # Extra leading axes (beams, time) pass through.
    stacked = mg.rag_token_log_probs(jnp.asarray(logits)[None], jnp.asarray(doc_scores)[None])
    np.testing.assert_allclose(stacked[0], ours, rtol=1e-6)


def test_retriever_log_probs_mask_and_grad():
    rng = np.random.default_rng(4)
    query, docs = jnp.asarray(rng.normal(size=(2, 8))), jnp.asarray(rng.normal(size=(2, 3, 8)))
    mask = jnp.array([[True, True, False], [True, True, True]])
    lp = mg.retriever_log_probs(query, docs, mask)
    assert np.isneginf(lp[0, 2])
    np.testing.assert_allclose(
        lp[0, :2], mg.retriever_log_probs(query[:1], docs[:1, :2])[0], rtol=1e-6
    )

    # The gradient reaches the query vector (how BERT_q learns): check one coordinate against
    # a central finite difference of the log-probability of document 0.
    def f(q):
        return mg.retriever_log_probs(q, docs, mask)[:, 0].sum()

    grad = jax.grad(f)(query)
    h = 1e-3
    bump = jnp.zeros_like(query).at[1, 5].set(h)
    fd = (f(query + bump) - f(query - bump)) / (2 * h)
    assert float(grad[1, 5]) == pytest.approx(float(fd), rel=1e-3)
    assert np.all(np.isfinite(grad))


def test_jit_and_vmap_agree_with_eager():
    logits, doc_scores, targets, mask = random_batch(9, 3, 4, 5, 13, min_len=1)
    args = (
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(doc_scores, jnp.float32),
        jnp.asarray(targets),
        jnp.asarray(mask),
    )
    for fn in (mg.rag_sequence_nll, mg.rag_token_nll):
        eager = fn(*args, label_smoothing=0.1)
        jitted = jax.jit(fn, static_argnames="label_smoothing")(*args, label_smoothing=0.1)

        def one(lg, sc, tg, mk, fn=fn):
            return fn(lg[None], sc[None], tg[None], mk[None], label_smoothing=0.1)[0]

        mapped = jax.vmap(one)(*args)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(mapped, eager, rtol=1e-6)


@pytest.mark.parametrize("fn", [mg.rag_sequence_nll, mg.rag_token_nll])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_batch_sharded_over_devices_stays_sharded(fn, epsilon):
    """Batch split over 4 devices: same values and gradients, and no device gathers the logits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()[:4]
    assert len(devices) == 4, "tests/conftest.py asks XLA for 4 CPU devices"
    by_batch = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    logits, doc_scores, targets, mask = random_batch(21, 8, 3, 5, 40, min_len=1)
    args = [jnp.asarray(x, jnp.float32) for x in (logits, doc_scores)]

    def loss(lg, sc):
        return fn(lg, sc, targets, mask, label_smoothing=epsilon).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    sharded_args = [jax.device_put(x, by_batch) for x in args]
    compiled = step.lower(*sharded_args).compile().as_text()
    assert "all-gather" not in compiled and "all-to-all" not in compiled
    value, (d_logits, d_scores) = step(*sharded_args)
    expected_value, (expected_d_logits, expected_d_scores) = step(*args)
    assert d_logits.sharding.is_equivalent_to(by_batch, d_logits.ndim)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(d_logits, expected_d_logits, atol=1e-6)
    np.testing.assert_allclose(d_scores, expected_d_scores, atol=1e-6)


# ----------------------------------------------------------------------------------------
# What the losses accept: shapes, masked and out-of-vocabulary ids, rows without documents.
# ----------------------------------------------------------------------------------------

LOSSES = [mg.rag_sequence_nll, mg.rag_token_nll]


@pytest.mark.parametrize("fn", LOSSES)
def test_mismatched_shapes_raise_naming_the_parameter(fn):
    logits, doc_scores, targets, mask = random_batch(1, 2, 3, 4, 7, min_len=1)
    bad = {
        "doc_scores": (logits, doc_scores[:, :1], targets, mask),  # [B,1] against K=3
        "targets": (logits, doc_scores, targets[:, :3], mask),
        "target_mask": (logits, doc_scores, targets, mask[:1]),
        "logits": (logits[0], doc_scores, targets, mask),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match=name):
            fn(*args)
        with pytest.raises(ValueError, match=name):  # at trace time, too
            jax.jit(fn)(*args)
    with pytest.raises(ValueError, match="integer"):
        fn(logits, doc_scores, targets.astype(np.float32), mask)


def test_other_functions_check_shapes():
    with pytest.raises(ValueError, match="doc_scores"):
        mg.rag_token_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="doc_log_prior"):
        mg.rag_token_log_likelihood(jnp.zeros((2, 3, 4)), jnp.zeros((2, 1)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="target_mask"):
        mg.rag_sequence_log_likelihood(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="doc_emb"):
        mg.retriever_scores(jnp.zeros((2, 8)), jnp.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match="targets"):
        mg.target_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((4,), int))


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("epsilon", [-0.1, 1.0, 1.5])
def test_label_smoothing_outside_unit_interval_is_an_error(fn, epsilon):
    logits, doc_scores, targets, mask = random_batch(1, 2, 3, 4, 7, min_len=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        fn(logits, doc_scores, targets, mask, label_smoothing=epsilon)


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("path", ["cpu", "fused"])
def test_masked_positions_contribute_nothing_whatever_their_id(fn, epsilon, path, monkeypatch):
    """Values and gradients equal those with id 0 at the masked positions (the ids the loss
    ignores); the reference's own pad id must not matter either."""
    use_code_path(path, 1 << 20, monkeypatch)
    logits, doc_scores, targets, mask = random_batch(3, 3, 4, 5, 11, min_len=1)
    mask[0, 1:] = False
    clean = np.where(mask, targets, 0)
    for junk in (-100, -1, 11, 10**6):
        dirty = np.where(mask, targets, junk)
        value, grads = loss_and_grad(
            fn,
            epsilon,
            *map(jnp.asarray, (logits, doc_scores)),
            jnp.asarray(dirty),
            jnp.asarray(mask),
        )
        ref_value, ref_grads = loss_and_grad(
            fn,
            epsilon,
            *map(jnp.asarray, (logits, doc_scores)),
            jnp.asarray(clean),
            jnp.asarray(mask),
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for g, ref_g in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, ref_g, atol=1e-7)


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_example_without_target_tokens_has_zero_loss_and_gradient(fn, epsilon):
    logits, doc_scores, targets, mask = random_batch(4, 2, 3, 4, 9, min_len=1)
    mask[1] = False
    _, (dlogits, dscores) = loss_and_grad(
        fn, epsilon, jnp.asarray(logits), jnp.asarray(doc_scores), targets, jnp.asarray(mask)
    )
    per_example = fn(
        jnp.asarray(logits), jnp.asarray(doc_scores), targets, mask, label_smoothing=epsilon
    )
    assert float(per_example[1]) == 0.0
    assert np.all(dlogits[1] == 0) and np.all(dscores[1] == 0)
    assert float(per_example[0]) > 0


@pytest.mark.parametrize("fn", LOSSES)
def test_out_of_vocabulary_targets_are_never_read_as_other_tokens(fn):
    logits, doc_scores, targets, mask = random_batch(5, 2, 3, 4, 9, min_len=4)
    for bad_id in (-1, -100, 9):
        bad = targets.copy()
        bad[1, 2] = bad_id
        with pytest.raises(ValueError, match=r"targets\[1, 2\]"):
            fn(logits, doc_scores, bad, mask)
        jitted = jax.jit(fn)(jnp.asarray(logits), jnp.asarray(doc_scores), bad, mask)
        assert np.isnan(jitted[1]) and np.isfinite(jitted[0])
    lp = mg.target_log_probs(jnp.asarray(logits[0, 0]), jnp.array([-1, 9, 0, 8]))
    assert np.isnan(lp[0]) and np.isnan(lp[1]) and np.all(np.isfinite(lp[2:]))


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_row_without_documents_is_finite_with_zero_gradients(fn, epsilon):
    """All K documents padded: loss 0 and zero gradients for that row, the other rows exactly
    as computed without it, and has_documents reports it."""
    logits, doc_scores, targets, mask = random_batch(6, 3, 4, 5, 11, min_len=1)
    doc_scores[1] = -np.inf
    assert np.array_equal(mg.has_documents(doc_scores), [True, False, True])
    value, (dlogits, dscores) = loss_and_grad(
        fn, epsilon, jnp.asarray(logits), jnp.asarray(doc_scores), targets, jnp.asarray(mask)
    )
    keep = np.array([0, 2])
    ref_value, (ref_dlogits, ref_dscores) = loss_and_grad(
        fn,
        epsilon,
        jnp.asarray(logits[keep]),
        jnp.asarray(doc_scores[keep]),
        targets[keep],
        jnp.asarray(mask[keep]),
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert np.all(dlogits[1] == 0) and np.all(dscores[1] == 0)
    np.testing.assert_allclose(dlogits[keep], ref_dlogits, atol=1e-7)
    np.testing.assert_allclose(dscores[keep], ref_dscores, atol=1e-7)
    # A NaN score is not "no document": NaN propagates.
    doc_scores[1] = np.nan
    assert np.isnan(fn(logits, doc_scores, targets, mask, label_smoothing=epsilon)[1])


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(mg, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
