"""ScannIndex: recall@10 against exact search with the default settings, doc vectors, save/load."""

import numpy as np
import pytest

from rag_jax.index.exact import ExactIndex
from rag_jax.index.scann_index import ScannConfig, ScannIndex


def _clustered(n, dim, n_clusters, seed, noise=0.6):
    """Points around random centres with varying norms: a MIPS problem with structure."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, n_clusters, n)]
    points += noise * rng.standard_normal((n, dim)).astype(np.float32)
    return points * rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)


def _recall(ids, exact_ids):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact_ids, strict=True)])


@pytest.fixture(scope="module")
def data():
    points = _clustered(5200, 64, 40, seed=0, noise=1.0)
    docs, queries = points[:5000], points[5000:]
    exact = ExactIndex.from_array(docs).search(queries, 10)
    return docs, queries, np.asarray(exact.ids)


@pytest.fixture(scope="module")
def index(data):
    return ScannIndex.build(data[0])


def test_default_config_uses_partitioning_hashing_and_reordering(index):
    config = index.config
    assert not config.brute_force
    assert 2 <= config.leaves_to_search < config.num_leaves  # a query scans only some leaves
    assert config.reorder_k >= 10


def test_recall_at_10_against_exact(data, index):
    _, queries, exact_ids = data
    result = index.search(queries, 10)
    assert _recall(result.ids, exact_ids) >= 0.95
    # Single queries take another code path (no thread pool); the batch is split into one
    # sub-batch per core, so compare queries from all over it.
    single = np.concatenate([index.search(q[None], 10).ids for q in queries[::10]])
    np.testing.assert_array_equal(single, result.ids[::10])


def test_scores_and_doc_vectors_are_the_stored_ones(data, index):
    docs, queries, _ = data
    result = index.search(queries, 10)
    assert result.ids.dtype == np.int32 and result.ids.shape == (200, 10)
    np.testing.assert_array_equal(result.doc_vectors, docs[result.ids])
    exact_scores = np.einsum("bh,bkh->bk", queries, docs[result.ids])
    np.testing.assert_allclose(result.scores, exact_scores, rtol=1e-4, atol=1e-4)  # reordered
    assert np.all(np.diff(result.scores, axis=1) <= 0)


def test_more_leaves_searched_never_hurts(data, index):
    _, queries, exact_ids = data
    narrow = _recall(index.search(queries, 10, leaves_to_search=2, reorder_k=20).ids, exact_ids)
    wide = _recall(
        index.search(queries, 10, leaves_to_search=index.config.num_leaves).ids, exact_ids
    )
    assert narrow <= wide and wide >= 0.99


def test_save_and_load_give_identical_results(tmp_path, data, index):
    docs, queries, _ = data
    index.save(tmp_path / "first")
    (tmp_path / "first").rename(tmp_path / "moved")  # relative asset paths survive a move
    loaded = ScannIndex.load(tmp_path / "moved", docs)
    assert loaded.config == index.config
    np.testing.assert_array_equal(loaded.search(queries, 10).ids, index.search(queries, 10).ids)
    with pytest.raises(ValueError, match="5000 points but the embeddings have 4999 rows"):
        ScannIndex.load(tmp_path / "moved", docs[:-1])


def test_load_refuses_a_pickle_and_a_non_searcher(tmp_path, data, index):
    index.save(tmp_path / "s")
    (tmp_path / "s" / "scann_docids.pkl").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        ScannIndex.load(tmp_path / "s", data[0])
    with pytest.raises(FileNotFoundError, match="no ScaNN searcher"):
        ScannIndex.load(tmp_path, data[0])


def test_tiny_corpus_falls_back_to_exact_scoring():
    docs = _clustered(300, 16, 5, seed=1)
    queries = docs[:7] + 0.01
    index = ScannIndex.build(docs)
    assert index.config.brute_force
    exact = ExactIndex.from_array(docs).search(queries, 10)
    np.testing.assert_array_equal(index.search(queries, 10).ids, exact.ids)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(queries, 301)


def test_explicit_config_is_respected():
    docs = _clustered(3000, 16, 10, seed=2)
    index = ScannIndex.build(docs, ScannConfig(num_leaves=20, leaves_to_search=5, reorder_k=50))
    assert (index.config.num_leaves, index.config.leaves_to_search) == (20, 5)
    assert index.config.reorder_k == 50
