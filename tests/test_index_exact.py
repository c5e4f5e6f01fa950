"""ExactIndex against NumPy brute force: chunking, float16 storage, 4-device sharding, approx_max_k,
use inside jit and gradients through the returned doc vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.index.exact import ExactIndex, chunked_top_k, exact_search


def _data(n=1003, dim=24, n_queries=9, seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    return docs, queries


def _brute_force(docs, queries, k):
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


@pytest.mark.parametrize("chunk_size", [64, 100, 1003, 5000])  # remainder, exact fit, > N
def test_exact_equals_numpy_brute_force(chunk_size):
    docs, queries = _data()
    ids, scores = _brute_force(docs, queries, 10)
    index = ExactIndex.from_array(docs, chunk_size=chunk_size)
    result = jax.jit(exact_search, static_argnums=2)(index, queries, 10)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.doc_vectors, docs[ids])
    assert result.ids.shape == (9, 10) and result.doc_vectors.shape == (9, 10, 24)


def test_float16_storage_scores_with_float32_accumulation():
    docs, queries = _data()
    docs16 = docs.astype(np.float16)
    ids, scores = _brute_force(docs16.astype(np.float32), queries, 5)
    result = ExactIndex.from_array(docs16, chunk_size=128).search(queries, 5)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-4)
    assert result.doc_vectors.dtype == jnp.float32


def test_k_out_of_range_is_an_error():
    docs, queries = _data(n=20)
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        chunked_top_k(queries, docs, 21)


@pytest.mark.parametrize("n", [1003, 1004, 7])  # uneven split (padding rows), even, fewer than k
def test_sharded_over_four_devices_equals_unsharded(n):
    assert len(jax.devices()) == 4  # tests/conftest.py
    docs, queries = _data(n=n)
    k = min(10, n)
    mesh = jax.make_mesh((4,), ("docs",))
    sharded = ExactIndex.from_array(docs, mesh=mesh, chunk_size=64)
    assert len(sharded.embeddings.sharding.device_set) == 4
    single = ExactIndex.from_array(docs, chunk_size=64)
    expected = single.search(queries, k)
    got = jax.jit(lambda index, q: index.search(q, k))(sharded, queries)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6)
    np.testing.assert_array_equal(got.doc_vectors, expected.doc_vectors)
    assert np.all(np.asarray(got.ids) < n)  # padding rows are never returned


def test_sharded_over_a_two_axis_training_mesh():
    docs, queries = _data(n=501)
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
    index = ExactIndex.from_array(docs, mesh=mesh, chunk_size=50)
    assert index.doc_axes == ("data", "fsdp")
    ids, _ = _brute_force(docs, queries, 8)
    np.testing.assert_array_equal(index.search(queries, 8).ids, ids)


def test_approx_max_k_option_is_sane():
    docs, queries = _data(n=4000, dim=32, n_queries=32)
    exact_ids, _ = _brute_force(docs, queries, 10)
    result = ExactIndex.from_array(docs, chunk_size=1024, approx_recall=0.95).search(queries, 10)
    ids, scores = np.asarray(result.ids), np.asarray(result.scores)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)])
    assert recall >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 0)  # sorted, best first
    assert all(len(set(row)) == 10 for row in ids)  # no duplicates
    # The scores are the inner products of the returned ids, not estimates.
    np.testing.assert_allclose(scores, np.einsum("bh,bkh->bk", queries, docs[ids]), rtol=1e-5)


def test_retrieval_inside_jit_and_gradient_through_doc_vectors():
    """Training recomputes d(z).q(x) from the returned doc vectors; the gradient of
    log sum_z exp(d(z).q) w.r.t. q is sum_z p(z|x) d(z), which we check by hand."""
    docs, queries = _data(n=300, dim=16, n_queries=4)
    index = ExactIndex.from_array(docs, mesh=jax.make_mesh((4,), ("docs",)), chunk_size=32)
    W = np.eye(16, dtype=np.float32) * 0.5

    @jax.jit
    def loss_and_grad(W, index, x):
        def loss(W):
            q = x @ W  # (B, H) a "query encoder"
            hits = index.search(jax.lax.stop_gradient(q), 5)
            doc_scores = jnp.einsum("bkh,bh->bk", hits.doc_vectors, q)  # (B, K)
            return jax.nn.logsumexp(doc_scores, axis=1).sum(), hits

        return jax.value_and_grad(loss, has_aux=True)(W)

    (value, hits), grad = loss_and_grad(W, index, queries)
    q = queries @ W
    ids, _ = _brute_force(docs, q, 5)
    np.testing.assert_array_equal(hits.ids, ids)
    doc_scores = np.einsum("bkh,bh->bk", docs[ids], q)
    p = np.exp(doc_scores - doc_scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_grad = np.einsum("bi,bk,bkh->ih", queries, p, docs[ids])  # dL/dW = x^T (p . D)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert np.isfinite(value)
