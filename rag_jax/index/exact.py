"""Exact maximum-inner-product search on the accelerator: a matmul and a top-k, chunked and sharded.

``scores = queries @ docs.T`` is never materialised whole: the corpus is scanned in chunks of
``chunk_size`` rows, keeping a running top-k, so memory is O(B * chunk_size) whatever N is. With the
embeddings sharded over a mesh axis, each device searches its own rows and the per-device top-k
lists (k each) are gathered and merged; cross-device traffic is B * k * n_devices scores and ids
plus one sum of the (B, k, H) returned doc vectors, never the corpus.

Everything here is a pure function of arrays, so search runs inside a jitted training step with
no host round trip; :class:`ExactIndex` is a pytree holding the (sharded) embeddings.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): B queries, N passages, H vector
size, k results per query.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.index.checks import check_search_args


class SearchResult(NamedTuple):
    """What every backend returns for a batch of B queries and k neighbours.

    Attributes:
      ids: (B, k) int32 passage ids, best first.
      scores: (B, k) float32 inner products ``d(z) . q(x)``.
      doc_vectors: (B, k, H) float32 stored embeddings d(z) of those passages, so training can
        recompute the scores against a trainable query encoder.
    """

    ids: jax.Array | np.ndarray
    scores: jax.Array | np.ndarray
    doc_vectors: jax.Array | np.ndarray


def chunked_top_k(
    queries: jax.Array,
    docs: jax.Array,
    k: int,
    *,
    chunk_size: int = 16384,
    n_valid: int | jax.Array | None = None,
    approx_recall: float | None = None,
    precision: lax.Precision = lax.Precision.HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """Top-k inner products of queries against docs, scanning docs in chunks.

    ``top_k_j(q_b . d_j)`` computed as a running merge: for each chunk c,
    ``best = top_k(concat(best, top_k(q @ d_c.T)))``.

    Args:
      queries: (B, H) float.
      docs: (N, H) float32/float16/bfloat16.
      k: neighbours per query, k <= N.
      chunk_size: rows scored at once (memory is O(B * chunk_size)); clipped to N. 16384 was
        fastest on CPU for batch 1 and 256 (larger chunks slow single queries; BENCHMARKS.md).
      n_valid: rows with index >= n_valid are padding and never returned (default N).
      approx_recall: if set, use ``lax.approx_max_k`` with this recall target per chunk
        (fast on TPU; elsewhere it is exact).
      precision: matmul precision; HIGHEST keeps float32 accuracy on TPU/GPU.

    Returns:
      ``(scores, ids)``: (B, k) float32 descending, (B, k) int32 row indices.
    """
    N = docs.shape[0]
    if not 0 < k <= N:
        raise ValueError(f"k must be in [1, {N}] for {N} documents, got {k}")
    C = max(min(chunk_size, N), k)
    n_chunks = math.ceil(N / C)
    n_valid = N if n_valid is None else n_valid
    queries = queries.astype(jnp.float32)

    def top(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
        if approx_recall is None:
            return lax.top_k(scores, k)
        return lax.approx_max_k(scores, k, recall_target=approx_recall)

    def step(best: tuple[jax.Array, jax.Array], c: jax.Array):
        # The last chunk is read at N - C (dynamic_slice clamps) so shapes stay static; its rows
        # that an earlier chunk already scored are masked, as are padding rows.
        start = jnp.minimum(c * C, N - C)
        chunk = lax.dynamic_slice_in_dim(docs, start, C)  # (C, H)
        scores = jnp.einsum(
            "bh,ch->bc", queries, chunk, precision=precision, preferred_element_type=jnp.float32
        )  # (B, C)
        rows = start + jnp.arange(C, dtype=jnp.int32)  # (C,)
        scores = jnp.where((rows >= c * C) & (rows < n_valid), scores, -jnp.inf)
        chunk_scores, chunk_pos = top(scores)  # (B, k)
        merged_scores = jnp.concatenate([best[0], chunk_scores], axis=1)  # (B, 2k)
        merged_ids = jnp.concatenate([best[1], rows[chunk_pos]], axis=1)  # (B, 2k)
        top_scores, pos = lax.top_k(merged_scores, k)  # (B, k)
        return (top_scores, jnp.take_along_axis(merged_ids, pos, axis=1)), None

    B = queries.shape[0]
    init = (jnp.full((B, k), -jnp.inf, jnp.float32), jnp.zeros((B, k), jnp.int32))
    (scores, ids), _ = lax.scan(step, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return scores, ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExactIndex:
    """Embeddings held on device(s) for exact MIPS; a pytree, so it can be passed into ``jit``.

    Build with :meth:`from_array` (from a NumPy array or memory map). With a mesh, rows are sharded
    over the mesh axes ``doc_axes``; N is padded to a multiple of the number of shards with rows
    that are masked out.

    Attributes:
      embeddings: (N_padded, H) stored dtype, rows sharded over ``doc_axes`` of ``mesh`` if any.
      n_passages: N, the real number of documents.
      mesh: the mesh the rows are sharded over, or None for a single device.
      doc_axes: the mesh axes the rows are split over (all axes of ``mesh`` by default).
      chunk_size: rows scored at once per device.
      approx_recall: if set, per-chunk ``lax.approx_max_k`` with this recall target.
    """

    embeddings: jax.Array
    n_passages: int = dataclasses.field(metadata={"static": True})
    mesh: Mesh | None = dataclasses.field(default=None, metadata={"static": True})
    doc_axes: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})
    chunk_size: int = dataclasses.field(default=16384, metadata={"static": True})
    approx_recall: float | None = dataclasses.field(default=None, metadata={"static": True})

    @staticmethod
    def from_array(
        embeddings: np.ndarray,
        *,
        mesh: Mesh | None = None,
        doc_axes: tuple[str, ...] | None = None,
        chunk_size: int = 16384,
        approx_recall: float | None = None,
    ) -> ExactIndex:
        """Places (N, H) embeddings on device, rows sharded over ``mesh`` if given.

        Each device reads only its own rows from ``embeddings`` (which may be a memory map).
        ``doc_axes`` defaults to all of ``mesh``'s axes, i.e. one shard per device.
        """
        N, H = embeddings.shape
        if mesh is None:
            return ExactIndex(jnp.asarray(embeddings), N, None, (), chunk_size, approx_recall)
        doc_axes = tuple(mesh.axis_names) if doc_axes is None else tuple(doc_axes)
        n_shards = math.prod(mesh.shape[axis] for axis in doc_axes)
        padded = math.ceil(N / n_shards) * n_shards

        def rows(index: tuple[slice, ...]) -> np.ndarray:
            start, stop, _ = index[0].indices(padded)
            block = np.zeros((stop - start, H), embeddings.dtype)
            block[: max(0, min(stop, N) - start)] = embeddings[start : min(stop, N)]
            return block

        sharding = NamedSharding(mesh, P(doc_axes))
        array = jax.make_array_from_callback((padded, H), sharding, rows)
        return ExactIndex(array, N, mesh, doc_axes, chunk_size, approx_recall)

    @property
    def dim(self) -> int:
        """H, the vector size."""
        return self.embeddings.shape[1]

    def search(self, queries: jax.Array, k: int) -> SearchResult:
        """Top-k MIPS for (B, H) queries: ids (B, k), scores (B, k), doc vectors (B, k, H).

        Compiled once per (B, k); inside an outer ``jit`` it is simply inlined. B = 0 gives
        empty results.

        Raises:
          ValueError: as :func:`~rag_jax.index.checks.check_search_args` (k not an integer in
            [1, N], queries not (B, H), or concrete queries holding NaN/inf).
        """
        check_search_args(queries, k, self.dim, self.n_passages)
        if np.shape(queries)[0] == 0:
            return _empty_result(k, self.dim)
        return _jitted_exact_search(self, queries, k)


def exact_search(index: ExactIndex, queries: jax.Array, k: int) -> SearchResult:
    """Pure exact MIPS; usable inside ``jit`` (``k`` must be static).

    Args:
      index: the embeddings and settings.
      queries: (B, H) query vectors q(x).
      k: neighbours per query.

    Returns:
      :class:`SearchResult` with ids (B, k) int32, scores (B, k) float32 (descending) and
      doc_vectors (B, k, H) float32.

    Raises:
      ValueError: at trace time, for a k or a query shape that does not fit the index (see
        :func:`~rag_jax.index.checks.check_search_args`); for concrete queries also NaN/inf.
    """
    check_search_args(queries, k, index.embeddings.shape[1], index.n_passages)
    if queries.shape[0] == 0:
        return _empty_result(k, index.embeddings.shape[1])
    search_kwargs = dict(chunk_size=index.chunk_size, approx_recall=index.approx_recall)
    if index.mesh is None:
        scores, ids = chunked_top_k(queries, index.embeddings, k, **search_kwargs)
        doc_vectors = jnp.take(index.embeddings, ids, axis=0).astype(jnp.float32)  # (B, k, H)
        return SearchResult(ids, scores, doc_vectors)

    axes = index.doc_axes
    rows_per_shard = index.embeddings.shape[0] // math.prod(index.mesh.shape[a] for a in axes)

    def per_shard(queries: jax.Array, docs: jax.Array):
        offset = lax.axis_index(axes) * rows_per_shard
        local_valid = jnp.clip(index.n_passages - offset, 0, rows_per_shard)
        scores, local_ids = chunked_top_k(
            queries, docs, min(k, rows_per_shard), n_valid=local_valid, **search_kwargs
        )  # (B, k')
        # Merge: every device gathers all devices' candidates (B, k' * D) and keeps the top k.
        all_scores = lax.all_gather(scores, axes, axis=1, tiled=True)
        all_ids = lax.all_gather(local_ids + offset, axes, axis=1, tiled=True)
        top_scores, pos = lax.top_k(all_scores, k)  # (B, k)
        ids = jnp.take_along_axis(all_ids, pos, axis=1)  # (B, k)
        # Each device contributes the rows it owns; the sum assembles d(z) for every hit.
        local = ids - offset
        owned = (local >= 0) & (local < rows_per_shard)
        vectors = jnp.take(docs, jnp.where(owned, local, 0), axis=0).astype(jnp.float32)
        vectors = lax.psum(jnp.where(owned[..., None], vectors, 0.0), axes)  # (B, k, H)
        return ids, top_scores, vectors

    ids, scores, vectors = jax.shard_map(
        per_shard,
        mesh=index.mesh,
        in_specs=(P(), P(axes)),
        out_specs=(P(), P(), P()),
        check_vma=False,  # the merged results are identical on every device by construction
    )(queries, index.embeddings)
    return SearchResult(ids, scores, vectors)


def _empty_result(k: int, dim: int) -> SearchResult:
    """The result for a batch of 0 queries: ids, scores (0, k), doc_vectors (0, k, H)."""
    return SearchResult(
        jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k, dim))
    )


_jitted_exact_search = jax.jit(exact_search, static_argnums=2)
