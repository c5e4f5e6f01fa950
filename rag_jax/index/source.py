"""Opening index directories, and the hot-swappable knowledge source a RAG model retrieves from.

An index directory holds::

    manifest.json     what built it (see manifest.py)
    embeddings.npy    (N, H) float32/float16 document vectors, row i = passage i
    passages/         the passage store (see corpus.PassageStore)
    scann/            the ScaNN searcher, for backend "scann"

Any directory can be opened with the exact backend (it only needs the embeddings), so training can
retrieve on device from an index built for ScaNN.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): B queries, N passages, H vector
size, k results per query.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from jax.sharding import Mesh

from rag_jax import _files
from rag_jax.index.corpus import CorpusError, Passage, PassageStore
from rag_jax.index.exact import ExactIndex, SearchResult
from rag_jax.index.manifest import IndexMismatchError, Manifest
from rag_jax.index.scann_index import ScannConfig, ScannIndex

EMBEDDINGS_FILE = "embeddings.npy"
PASSAGES_DIR = "passages"
SCANN_DIR = "scann"


class Index(Protocol):
    """What every search backend offers."""

    n_passages: int

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top-k MIPS: ids (B, k), scores (B, k), doc_vectors (B, k, H)."""
        ...


class LoadedIndex(NamedTuple):
    """An opened index directory: the searchable index, its passages and its manifest."""

    index: Index
    passages: PassageStore
    manifest: Manifest
    path: Path


REBUILD = "rebuild the index (python -m rag_jax.index build ...)"


def open_embeddings(index_dir: str | os.PathLike, manifest: Manifest) -> np.ndarray:
    """Memory-maps ``embeddings.npy`` and checks its shape and dtype against the manifest.

    The file is read as plain array data (never unpickled); a damaged file is an
    :class:`IndexMismatchError` naming it.
    """
    path = Path(index_dir) / EMBEDDINGS_FILE
    if not path.is_file():
        raise IndexMismatchError(f"index {index_dir} has no {EMBEDDINGS_FILE}; {REBUILD}")
    try:
        embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        kind = type(error).__name__
        raise IndexMismatchError(
            f"{path}: not a readable .npy array ({kind}: damaged or truncated); {REBUILD}"
        ) from None
    expected = ((manifest.count, manifest.dim), manifest.dtype)
    if (embeddings.shape, str(embeddings.dtype)) != expected:
        raise IndexMismatchError(
            f"{path}: shape {embeddings.shape} dtype {embeddings.dtype} but the manifest says "
            f"shape {expected[0]} dtype {expected[1]}; {REBUILD}"
        )
    return embeddings


def load_index(
    index_dir: str | os.PathLike,
    *,
    backend: str | None = None,
    encoder_sha256: str | None = None,
    encoder_name: str | None = None,
    dim: int | None = None,
    encoder_preprocessing: dict | None = None,
    mesh: Mesh | None = None,
    chunk_size: int = 16384,
    approx_recall: float | None = None,
) -> LoadedIndex:
    """Opens an index directory, checking its manifest and files.

    Args:
      index_dir: the directory ``build_index`` wrote.
      backend: "exact" or "scann"; default the one it was built with.
      encoder_sha256, encoder_name: the document encoder the caller expects (None: not checked).
      dim: the query embedding size the caller will search with (None: not checked).
      encoder_preprocessing: the document encoder's ``TextEncoder.preprocessing`` (None: not
        checked); see :meth:`Manifest.check`.
      mesh: for "exact", shard the embeddings over this mesh's devices.
      chunk_size, approx_recall: for "exact", see :class:`ExactIndex`.

    Raises:
      IndexMismatchError: another encoder, preprocessing or dim, or files that are missing,
        damaged or disagree with the manifest (each naming the file).
    """
    index_dir = Path(index_dir)
    _files.restore_replaced(index_dir)  # a rebuild interrupted between its two renames
    manifest = Manifest.read(index_dir)
    manifest.check(
        index_dir,
        encoder_sha256=encoder_sha256,
        encoder_name=encoder_name,
        dim=dim,
        encoder_preprocessing=encoder_preprocessing,
    )
    try:
        passages = PassageStore(index_dir / PASSAGES_DIR)
    except (CorpusError, FileNotFoundError) as error:
        raise IndexMismatchError(f"{error}; {REBUILD}") from None
    if (len(passages), passages.sha256) != (manifest.count, manifest.corpus_sha256):
        raise IndexMismatchError(
            f"index {index_dir}: passage store ({len(passages)} passages, sha256 "
            f"{passages.sha256[:12]}...) does not match the manifest ({manifest.count}, "
            f"{manifest.corpus_sha256[:12]}...); {REBUILD}"
        )
    embeddings = open_embeddings(index_dir, manifest)
    backend = backend or manifest.backend
    if backend == "exact":
        index = ExactIndex.from_array(
            embeddings, mesh=mesh, chunk_size=chunk_size, approx_recall=approx_recall
        )
    elif backend == "scann":
        if manifest.backend != "scann":
            raise IndexMismatchError(f"index {index_dir} was built without a ScaNN searcher")
        index = ScannIndex.load(index_dir / SCANN_DIR, embeddings)
    else:
        raise ValueError(f"backend must be 'exact' or 'scann', got {backend!r}")
    return LoadedIndex(index, passages, manifest, index_dir)


def tune_index(
    index_dir: str | os.PathLike,
    queries: np.ndarray,
    k: int = 10,
    target_recall: float = 0.95,
    *,
    encoder_sha256: str | None = None,
    encoder_name: str | None = None,
    encoder_preprocessing: dict | None = None,
) -> ScannConfig:
    """Tunes the ScaNN search settings of an index directory and saves them there.

    :meth:`ScannIndex.tune` on ``queries`` (``(Q, H)`` sample query vectors), then the new
    settings go to ``scann/`` and to the manifest's ``backend_config`` (each file replaced
    atomically); the searcher itself is not rewritten. Later loads search with them.

    Args:
      encoder_sha256, encoder_name, encoder_preprocessing: the document encoder the queries'
        encoder pairs with, checked against the manifest as in :func:`load_index` (None skips
        the check).

    Raises:
      IndexMismatchError: if the directory has no ScaNN searcher, another dim than the queries
        or was built with another document encoder.
      ValueError: as :meth:`ScannIndex.tune`.
    """
    index_dir = Path(index_dir)
    queries = np.asarray(queries, np.float32)
    loaded = load_index(
        index_dir,
        backend="scann",
        encoder_sha256=encoder_sha256,
        encoder_name=encoder_name,
        encoder_preprocessing=encoder_preprocessing,
        dim=queries.shape[-1] if queries.ndim == 2 else None,
    )
    config = loaded.index.tune(queries, k, target_recall)
    loaded.index.save_config(index_dir / SCANN_DIR)
    manifest = dataclasses.replace(loaded.manifest, backend_config=dataclasses.asdict(config))
    manifest.write(index_dir)
    return config


class KnowledgeSource:
    """The retrieval memory of a RAG model: an index plus its passages, swappable in one call.

    ``swap(index_dir)`` opens and fully checks the new directory first and only then replaces the
    current one, in a single reference assignment: a failed swap leaves the old index serving, and
    a search running concurrently sees either the old pair or the new, never a mix.

    Example::

        source = KnowledgeSource("indexes/wiki-2018", dim=768)
        result = source.search(query_vectors, k=5)      # ids, scores, doc_vectors
        passages = source.passages(result.ids)          # [[Passage, ...], ...]
        source.swap("indexes/wiki-2024")                # same encoder and dim required

    Args:
      index_dir: the index directory to open.
      backend, mesh, chunk_size, approx_recall: as in :func:`load_index`, kept for swaps.
      encoder_sha256, encoder_name, encoder_preprocessing: the document encoder every index must
        have been built with (None: that of the first index).
      dim: the query embedding size every index must match (None: that of the first index).
      min_passages: the fewest passages every index must hold (a reader of K documents a
        question needs K); :meth:`require_passages` raises it later.

    Raises:
      IndexMismatchError: as :func:`load_index`, or an index with fewer than ``min_passages``.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        *,
        backend: str | None = None,
        encoder_sha256: str | None = None,
        encoder_name: str | None = None,
        dim: int | None = None,
        encoder_preprocessing: dict | None = None,
        mesh: Mesh | None = None,
        chunk_size: int = 16384,
        approx_recall: float | None = None,
        min_passages: int = 1,
    ):
        self.min_passages = min_passages
        self._options = dict(
            backend=backend, mesh=mesh, chunk_size=chunk_size, approx_recall=approx_recall
        )
        self._expect = dict(
            encoder_sha256=encoder_sha256,
            encoder_name=encoder_name,
            dim=dim,
            encoder_preprocessing=encoder_preprocessing,
        )
        self._lock = threading.Lock()
        self._current = self._load(index_dir)
        # Later swaps must match the first index: same query space, same document encoder.
        self._expect["dim"] = self._current.manifest.dim
        self._expect["encoder_sha256"] = self._current.manifest.encoder_sha256
        self._expect["encoder_name"] = self._current.manifest.encoder_name
        self._expect["encoder_preprocessing"] = self._current.manifest.encoder_preprocessing

    def _load(self, index_dir: str | os.PathLike) -> LoadedIndex:
        loaded = load_index(index_dir, **self._expect, **self._options)
        if loaded.manifest.count < self.min_passages:
            raise IndexMismatchError(
                f"index {index_dir} holds {loaded.manifest.count} passages, fewer than the "
                f"{self.min_passages} documents each question reads (n_docs)"
            )
        return loaded

    def require_passages(self, n_docs: int) -> None:
        """From now on every index, the current one and any swapped in, must hold at least
        ``n_docs`` passages (K, the documents a reader takes per question).

        Raises:
          IndexMismatchError: the current index holds fewer (nothing changes then).
        """
        with self._lock:
            count = self._current.manifest.count
            if count < n_docs:
                raise IndexMismatchError(
                    f"index {self._current.path} holds {count} passages, fewer than the "
                    f"{n_docs} documents each question reads (n_docs)"
                )
            self.min_passages = max(self.min_passages, n_docs)

    @property
    def index(self) -> Index:
        return self._current.index

    @property
    def manifest(self) -> Manifest:
        return self._current.manifest

    @property
    def path(self) -> Path:
        return self._current.path

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top-k passages for (B, H) query vectors: ids, scores (B, k), doc_vectors (B, k, H)."""
        return self._current.index.search(queries, k)

    def retrieve(self, queries: Any, k: int) -> tuple[SearchResult, list[list[Passage | None]]]:
        """Search and passage lookup against the same index, even if a swap happens between.

        A slot the index could not fill (id -1, score -inf) has passage ``None``.
        """
        current = self._current
        result = current.index.search(queries, k)
        return result, current.passages.get(np.asarray(result.ids))

    def passages(self, ids: Any) -> list:
        """Passages for integer ids of any shape (nested lists of that shape)."""
        return self._current.passages.get(np.asarray(ids))

    def swap(self, index_dir: str | os.PathLike) -> Manifest:
        """Replaces index and passages with those of ``index_dir``; returns the new manifest.

        Raises :class:`IndexMismatchError` (and keeps the current index) if the new directory was
        built with another encoder or dim, or holds fewer than ``min_passages`` passages.
        """
        with self._lock:
            loaded = self._load(index_dir)
            self._current = loaded
            return loaded.manifest
