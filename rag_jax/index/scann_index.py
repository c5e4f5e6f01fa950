"""Approximate MIPS on the host with ScaNN (Guo et al., 2020) via its pybind API (no TensorFlow).

Three stages: a k-means tree partitions the corpus into ``num_leaves`` leaves and each query scans
only its ``leaves_to_search`` nearest; inside them, anisotropic asymmetric hashing (AH) scores
every point from 4-bit codes (``dims_per_block`` dimensions per code) with in-register lookup
tables; the best ``reorder_k`` are then re-scored against ScaNN's copy of the vectors (bfloat16
by default). Its best k (k + 4 with bfloat16, which may misorder near ties at the k-th place)
are scored once more in float32 against the stored embeddings, and the best k by those exact
scores are returned. The defaults below give recall@10 >= 0.95 against exact search on our
tests and benchmark.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): B queries, N passages, H vector
size, k results per query.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from rag_jax import _files
from rag_jax.index.checks import check_search_args, positive_int
from rag_jax.index.exact import SearchResult

_CONFIG_FILE = "scann_index.json"
_ASSETS_FILE = "scann_assets.pbtxt"
# Below this many points partitioning and hashing buy nothing: score everything exactly.
_BRUTE_FORCE_BELOW = 2048
_REORDER_TYPES = {"float32": "FLOAT32", "bfloat16": "BFLOAT16"}  # ScaNN's ReorderType names
# With bfloat16 re-scoring ScaNN's k-th and (k+1)-th candidates can be a near tie in the wrong
# order, so the exact top k may reach one or two past ScaNN's k and recall stalls below 1.
# Taking this many more and keeping the best k by float32 score restores float32 re-scoring's
# recall (BENCHMARKS.md, Document index: "After the bfloat16 near-tie fix").
_EXTRA_FOR_BFLOAT16 = 4


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """ScaNN settings; ``None`` fields are derived from N by :meth:`resolve`.

    The figures behind each default are in BENCHMARKS.md ("Document index": the current table,
    and "How the ScaNN defaults were chosen" under its history).

    Attributes:
      num_leaves: k-means partitions (default ~sqrt(N)/2, where a single query's two costs,
        scoring every centroid and hashing the points of its leaves, balance).
      leaves_to_search: partitions scanned per query (default num_leaves / 10, at least 20).
        Data that partitions badly needs more, other data far fewer: :meth:`ScannIndex.tune`
        measures the fewest that reach a recall target on sample queries.
      reorder_k: candidates re-scored against full vectors. A search for k results re-scores
        at least k (k + 4 with bfloat16, see ``reorder_dtype``).
      reorder_dtype: ``"bfloat16"`` or ``"float32"``, the type of ScaNN's copy of the vectors
        used for re-scoring. bfloat16 halves that copy and, re-scoring being bound by memory,
        searches faster at nearly equal recall. The results are re-scored in float32 either
        way; with bfloat16, ScaNN's best k + 4 are, and the best k by exact score kept, since
        bfloat16 misorders near ties at the k-th place.
      spherical: spherical k-means (unit-norm centroids) for the partitions: it groups points
        by direction, as inner products do, instead of splitting a cluster by norm as L2
        k-means does.
      quantize_centroids: score queries against the partition centroids in int8 (a quarter of
        the bytes); off by default, as it made single queries slower.
      dims_per_block: dimensions per 4-bit AH code. 2 (ScaNN's recommendation) ranks finely
        enough that few candidates need re-scoring; 4 needs so many more that it is slower at
        equal recall.
      anisotropic_threshold: AH's anisotropic quantization threshold (ScaNN's suggested 0.2 for
        normalised data; it weighs the error parallel to a point more, which is what MIPS needs).
      training_sample_size: points used to train the partitioner.
      ah_training_sample_size: points used to train the AH codebooks (16 centres per block
        need few; fewer points build faster at the same recall).
      brute_force: score all points exactly (chosen automatically for tiny N).
    """

    num_leaves: int | None = None
    leaves_to_search: int | None = None
    reorder_k: int = 100
    reorder_dtype: str = "bfloat16"
    spherical: bool = True
    quantize_centroids: bool = False
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    training_sample_size: int = 100_000
    ah_training_sample_size: int = 30_000
    brute_force: bool | None = None

    def __post_init__(self):
        """Checks every setting here, so a bad one fails before a corpus is encoded."""
        positive_int("ScannConfig.num_leaves", self.num_leaves, minimum=2, allow_none=True)
        positive_int("ScannConfig.leaves_to_search", self.leaves_to_search, allow_none=True)
        for name in ("reorder_k", "dims_per_block", "training_sample_size"):
            positive_int(f"ScannConfig.{name}", getattr(self, name))
        positive_int("ScannConfig.ah_training_sample_size", self.ah_training_sample_size)
        threshold = self.anisotropic_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(
                f"ScannConfig.anisotropic_threshold must be a number, got {threshold!r}"
            )
        if not math.isfinite(threshold):
            raise ValueError(f"ScannConfig.anisotropic_threshold must be finite, got {threshold}")
        if self.reorder_dtype not in _REORDER_TYPES:
            raise ValueError(
                f"ScannConfig.reorder_dtype must be one of {sorted(_REORDER_TYPES)}, "
                f"got {self.reorder_dtype!r}"
            )

    def resolve(self, n: int) -> ScannConfig:
        """Fills the N-dependent defaults."""
        brute_force = n < _BRUTE_FORCE_BELOW if self.brute_force is None else self.brute_force
        num_leaves = self.num_leaves or max(2, round(math.sqrt(n) / 2))
        num_leaves = min(num_leaves, max(2, n // 10))
        leaves_to_search = self.leaves_to_search or max(20, math.ceil(num_leaves / 10))
        return dataclasses.replace(
            self,
            num_leaves=num_leaves,
            leaves_to_search=min(leaves_to_search, num_leaves),
            training_sample_size=min(self.training_sample_size, n),
            ah_training_sample_size=min(self.ah_training_sample_size, n),
            brute_force=brute_force,
        )


class ScannIndex:
    """ScaNN searcher plus the stored (N, H) embeddings it returns doc vectors from.

    Build with :meth:`build`, persist with :meth:`save` (ScaNN's own serialisation, with paths
    relative to the directory so it can be moved) and reopen with :meth:`load`.
    """

    def __init__(self, searcher, embeddings: np.ndarray, config: ScannConfig):
        self.searcher = searcher
        self.embeddings = embeddings
        self.config = config

    @property
    def n_passages(self) -> int:
        return self.embeddings.shape[0]

    @staticmethod
    def build(
        embeddings: np.ndarray, config: ScannConfig | None = None, *, threads: int = 0
    ) -> ScannIndex:
        """Trains and fills a ScaNN searcher for (N, H) embeddings (dot product).

        Args:
          embeddings: (N, H) float array (a memory map is fine; ScaNN copies it as float32).
          config: settings; defaults derived from N.
          threads: training threads (0: ScaNN's default).
        """
        import scann
        from scann.scann_ops.py.scann_builder import ReorderType

        n = embeddings.shape[0]
        if embeddings.ndim != 2 or n == 0:
            raise ValueError(
                f"embeddings must have shape (N, H) with N >= 1, got {embeddings.shape}"
            )
        config = (config or ScannConfig()).resolve(n)
        data = np.ascontiguousarray(embeddings, dtype=np.float32)
        finite = np.isfinite(data).all(axis=1)
        if not finite.all():  # ScaNN would abort the whole process from C++ on them
            bad = np.flatnonzero(~finite)
            raise ValueError(
                f"embeddings hold NaN or inf in {len(bad)} row(s), the first row {bad[0]}"
            )
        builder = scann.scann_ops_pybind.builder(data, 10, "dot_product")
        if config.brute_force:
            builder = builder.score_brute_force()
        else:
            builder = (
                builder.tree(
                    num_leaves=config.num_leaves,
                    num_leaves_to_search=config.leaves_to_search,
                    training_sample_size=config.training_sample_size,
                    spherical=config.spherical,
                    quantize_centroids=config.quantize_centroids,
                )
                .score_ah(
                    config.dims_per_block,
                    anisotropic_quantization_threshold=config.anisotropic_threshold,
                    training_sample_size=config.ah_training_sample_size,
                )
                .reorder(
                    config.reorder_k,
                    quantize=getattr(ReorderType, _REORDER_TYPES[config.reorder_dtype]),
                )
            )
        searcher = builder.set_n_training_threads(threads).build()
        return ScannIndex(searcher, embeddings, config)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        leaves_to_search: int | None = None,
        reorder_k: int | None = None,
    ) -> SearchResult:
        """Approximate top-k MIPS for (B, H) queries.

        Returns:
          :class:`SearchResult` of NumPy arrays: ids (B, k) int32, scores (B, k) float32 (exact
          float32 inner products with the stored embeddings, in descending order),
          doc_vectors (B, k, H) float32. If ScaNN finds fewer than k candidates, missing slots
          hold id -1, score -inf and a zero vector. B = 0 gives empty results.

        Raises:
          ValueError: as :func:`~rag_jax.index.checks.check_search_args`, and for
            ``leaves_to_search`` or ``reorder_k`` below 1.
        """
        check_search_args(queries, k, self.embeddings.shape[1], self.n_passages)
        positive_int("leaves_to_search", leaves_to_search, allow_none=True)
        positive_int("reorder_k", reorder_k, allow_none=True)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) == 0:
            dim = self.embeddings.shape[1]
            return SearchResult(
                np.zeros((0, k), np.int32),
                np.zeros((0, k), np.float32),
                np.zeros((0, k, dim), np.float32),
            )
        leaves = leaves_to_search or self.config.leaves_to_search
        # Candidates taken from ScaNN: k, and a few more when it ranks them by bfloat16 scores.
        fetch = k
        if self.config.reorder_dtype == "bfloat16" and not self.config.brute_force:
            fetch = min(k + _EXTRA_FOR_BFLOAT16, self.n_passages)
        reorder = max(fetch, reorder_k or self.config.reorder_k)
        if self.config.brute_force:
            leaves, reorder = -1, -1  # ScaNN's "use the searcher's own setting"
        if len(queries) == 1:
            # The single-query call skips ScaNN's batch machinery, and our post-processing
            # stays 1-D: the 2-D path's extra NumPy calls are a large share of a single query.
            ids, _ = self.searcher.search(queries[0], fetch, reorder, leaves)
            return self._rescore_one(ids.astype(np.intp), queries[0], k)
        # ScaNN hands each thread whole sub-batches of batch_size queries: at its default (256)
        # a batch of 256 would run on one core.
        per_thread = min(256, -(-len(queries) // _available_cpus()))
        ids, scann_scores = self.searcher.search_batched_parallel(
            queries, fetch, reorder, leaves, batch_size=per_thread
        )
        # Batched search pads short rows with id 0 and a NaN score; mark those missing.
        ids = np.where(np.isnan(scann_scores), -1, ids.astype(np.int64))
        ids = _pad_to_k(np.asarray(ids), fetch)
        vectors = np.asarray(np.take(self.embeddings, np.maximum(ids, 0), axis=0), np.float32)
        # ScaNN's scores come from its (bfloat16) copy; the returned ones are exact float32.
        scores = np.matmul(vectors, queries[:, :, None])[..., 0]  # (B, fetch)
        if ids.min() < 0:
            vectors[ids < 0] = 0.0
            scores[ids < 0] = -np.inf
        # Keep the k best by exact score, in descending order. Most rows already are (bfloat16
        # swaps near ties in ~1 query of 3 at 1M), so only the others are rearranged, by fancy
        # indexing of those rows (take_along_axis would build (B, k, H) index arrays, a large
        # share of a batch's time).
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rows = np.flatnonzero((top != np.arange(k)).any(axis=1))
        if rows.size:
            cols = top[rows]
            ids[rows, :k], scores[rows, :k] = ids[rows[:, None], cols], scores[rows[:, None], cols]
            vectors[rows, :k] = vectors[rows[:, None], cols]
        return SearchResult(ids[:, :k], scores[:, :k], vectors[:, :k])

    def _rescore_one(self, ids: np.ndarray, query: np.ndarray, k: int) -> SearchResult:
        """The single-query case of :meth:`search`'s re-scoring: the (n,) ids ScaNN found."""
        vectors = np.asarray(np.take(self.embeddings, ids, axis=0), np.float32)  # (n, H)
        scores = vectors @ query  # exact float32, as in the batched path
        if len(ids) > 1 and (scores[1:] > scores[:-1]).any():  # a near tie swapped by bfloat16
            order = np.argsort(-scores, kind="stable")
            ids, scores, vectors = ids[order], scores[order], vectors[order]
        ids, scores, vectors = ids[:k], scores[:k], vectors[:k]
        if len(ids) < k:  # ScaNN found fewer than k candidates
            missing = k - len(ids)
            ids = np.pad(ids, (0, missing), constant_values=-1)
            scores = np.pad(scores, (0, missing), constant_values=-np.inf)
            vectors = np.pad(vectors, ((0, missing), (0, 0)))
        return SearchResult(ids.astype(np.int32)[None], scores[None], vectors[None])

    def tune(
        self,
        queries: np.ndarray,
        k: int = 10,
        target_recall: float = 0.95,
        *,
        max_reorder_k: int | None = None,
    ) -> ScannConfig:
        """Fewest leaves searched, then fewest candidates re-scored, reaching a recall@k target.

        The defaults search 10% of the leaves, safe but often far more than a given corpus
        needs (BENCHMARKS.md: on the 1M benchmark set 1 leaf of 500 is enough). This measures
        instead: recall
        against exact float32 search over the stored embeddings, on held-out queries that look
        like the ones to come (e.g. query-encoder outputs for a sample of training questions).
        First the smallest ``leaves_to_search`` reaching ``target_recall`` when re-scoring
        ``max_reorder_k`` candidates, then the smallest ``reorder_k`` (at least k) still
        reaching it there. Sets ``self.config`` (persisted by :meth:`save`) and returns it;
        calling it again starts afresh, as its defaults do not depend on a previous tuning.

        Args:
          queries: ``(Q, H)`` sample queries; a few hundred give recall to about +-0.01.
          k: neighbours per query the recall is measured at.
          target_recall: recall@k to reach, in (0, 1].
          max_reorder_k: the re-scoring budget the leaves are chosen at (default: the larger
            of the current ``reorder_k`` and ScannConfig's default, 100).

        Raises:
          ValueError: on a bad argument, or if even every leaf with ``max_reorder_k``
            candidates stays below ``target_recall``.
        """
        check_search_args(queries, k, self.embeddings.shape[1], self.n_passages)
        if len(queries) == 0:
            raise ValueError("queries must hold at least one sample query")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        positive_int("max_reorder_k", max_reorder_k, allow_none=True)
        if self.config.brute_force:
            return self.config  # scores every point: nothing to tune
        exact_ids = exact_top_k(self.embeddings, queries, k)

        def recall(leaves: int, reorder: int) -> float:
            found = self.search(queries, k, leaves_to_search=leaves, reorder_k=reorder).ids
            hits = [len(set(a) & set(b)) for a, b in zip(found, exact_ids, strict=True)]
            return sum(hits) / exact_ids.size

        reorder = max_reorder_k or max(self.config.reorder_k, ScannConfig.reorder_k)
        reorder, num_leaves = max(k, reorder), self.config.num_leaves
        if recall(num_leaves, reorder) < target_recall:
            raise ValueError(
                f"recall@{k} stays below {target_recall} even with all {num_leaves} leaves "
                f"searched and {reorder} candidates re-scored: raise max_reorder_k"
            )
        leaves = _smallest_reaching(lambda n: recall(n, reorder) >= target_recall, 1, num_leaves)
        reorder = _smallest_reaching(lambda n: recall(leaves, n) >= target_recall, k, reorder)
        self.config = dataclasses.replace(self.config, leaves_to_search=leaves, reorder_k=reorder)
        return self.config

    def save(self, path: str | os.PathLike) -> None:
        """Serialises the searcher into directory ``path`` (embeddings are stored by the caller)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.searcher.serialize(str(path), relative_path=True)
        self.save_config(path)

    def save_config(self, path: str | os.PathLike) -> None:
        """Writes only the settings (e.g. after :meth:`tune`) into a saved searcher's directory.

        Atomic (temp file, then rename): a reader sees the old settings or the new.
        """
        _files.write_text(
            Path(path) / _CONFIG_FILE, json.dumps(dataclasses.asdict(self.config), indent=1)
        )

    @staticmethod
    def load(path: str | os.PathLike, embeddings: np.ndarray) -> ScannIndex:
        """Loads a searcher saved by :meth:`save`; ``embeddings`` are the (N, H) stored vectors.

        Raises:
          FileNotFoundError: no saved searcher in ``path``.
          ValueError: a damaged directory (settings, assets or ScaNN's files), naming the file.
        """
        from scann.scann_ops.py import scann_ops_pybind

        path = Path(path)
        assets = path / _ASSETS_FILE
        if not assets.is_file():
            raise FileNotFoundError(f"no ScaNN searcher in {path} (missing {_ASSETS_FILE})")
        if (path / "scann_docids.pkl").exists():
            # ScaNN's own loader would unpickle this file; we never write it and never unpickle.
            raise ValueError(f"{path}: refusing to load a ScaNN directory holding a pickle")
        assets_text = assets.read_text()
        config = _read_config(path / _CONFIG_FILE, assets_text)
        try:
            native = scann_ops_pybind.scann_pybind.ScannNumpy(str(path), assets_text)
        except (RuntimeError, ValueError) as error:  # e.g. "File too short" for a cut file
            raise ValueError(
                f"{path}: ScaNN cannot read its saved searcher ({error}); a file listed in "
                f"{assets} is damaged or truncated: rebuild the index"
            ) from None
        searcher = scann_ops_pybind.ScannSearcher(native)
        if searcher.size() != embeddings.shape[0]:
            raise ValueError(
                f"{path}: ScaNN searcher holds {searcher.size()} points but the embeddings "
                f"have {embeddings.shape[0]} rows"
            )
        return ScannIndex(searcher, embeddings, config)


def _read_config(path: Path, assets_text: str) -> ScannConfig:
    """The settings saved in ``scann_index.json``; every problem names the file."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: rebuild the index")
    fields = _files.read_json(path, advice="; rebuild the index")
    known = {f.name for f in dataclasses.fields(ScannConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {unknown} (written by another version?); known: "
            f"{sorted(known)}"
        )
    if "reorder_dtype" not in fields:  # saved before the field existed: read ScaNN's assets
        bf16 = "asset_type: BF16_DATASET_NPY" in assets_text
        fields["reorder_dtype"] = "bfloat16" if bf16 else "float32"
    try:
        return ScannConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def exact_top_k(
    embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1 << 16
) -> np.ndarray:
    """Ids ``(Q, k)`` of the k largest inner products, by brute force over row chunks.

    NumPy in float32, one chunk of ``embeddings`` (which may be a memory map) at a time, so
    memory stays at ``Q x chunk`` scores whatever N is; :func:`~rag_jax.index.exact.chunked_top_k`
    would first copy the whole array into a JAX array.
    """
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(embeddings), chunk):
        block = np.asarray(embeddings[start : start + chunk], np.float32)
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        block_ids = np.broadcast_to(
            np.arange(start, start + len(block)), (len(queries), len(block))
        )
        ids = np.concatenate([best_ids, block_ids], axis=1)
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def _smallest_reaching(good, lowest: int, highest: int) -> int:
    """Smallest n in [lowest, highest] with ``good(n)``, given ``good(highest)``, good monotone.

    Doubling the distance from ``lowest``, then bisection: O(log n) calls, cheap ones first.
    """
    low, high = lowest, lowest  # good(n) is False for every n < low
    while high < highest and not good(high):
        low, high = high + 1, min(2 * high - lowest + 1, highest)
    while low < high:
        middle = (low + high) // 2
        if good(middle):
            high = middle
        else:
            low = middle + 1
    return high


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pad_to_k(ids: np.ndarray, k: int) -> np.ndarray:
    ids = ids.astype(np.int32).reshape(len(ids), -1)  # ScaNN gives uint32 row numbers, -1 added
    missing = k - ids.shape[1]
    if missing > 0:
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
    return ids
