"""Building an index directory: corpus -> passage store -> embeddings -> search backend -> manifest.

All work happens in ``<out>.partial/`` beside the destination and is renamed into place only when
complete, so a failed or interrupted build never touches an existing index at ``<out>``. Re-running
the same build resumes: the passage store is kept and encoding continues from its last finished
chunk (see encode.py), giving the same bytes as an uninterrupted build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from rag_jax.index.corpus import CorpusError, CorpusReader, PassageStore, split_passages
from rag_jax.index.encode import TextEncoder, encode_passages, sync_processes
from rag_jax.index.manifest import BACKENDS, Manifest
from rag_jax.index.scann_index import ScannConfig, ScannIndex
from rag_jax.index.source import EMBEDDINGS_FILE, PASSAGES_DIR, SCANN_DIR

log = logging.getLogger(__name__)

_SETTINGS_FILE = "build.json"


def build_index(
    corpus: str | os.PathLike,
    encoder: TextEncoder | Callable[[], TextEncoder],
    out_dir: str | os.PathLike,
    *,
    backend: str = "scann",
    split_words: int | None = None,
    skip_bad: bool = False,
    dtype: str = "float32",
    batch_size: int = 128,
    chunk_size: int = 8192,
    scann_config: ScannConfig | None = None,
    encoder_path: str = "",
    progress: bool = True,
) -> Manifest:
    """Builds a searchable index directory from a corpus file.

    Args:
      corpus: JSONL or psgs_w100 TSV file (see corpus.CorpusReader).
      encoder: the frozen document encoder, or a function loading it: then it is loaded only
        after the corpus has been read and validated, so a bad corpus fails fast.
      out_dir: the index directory to create or replace (only once the build has succeeded).
      backend: "scann" (also writes a ScaNN searcher) or "exact" (embeddings only).
      split_words: if set, split each document into passages of this many words (DPR: 100).
      skip_bad: skip bad corpus lines (their count goes into the manifest) instead of failing.
      dtype: embedding storage, "float32" or "float16".
      batch_size, chunk_size: encoding batch and resumable-chunk sizes (see encode_passages).
      scann_config: ScaNN settings (defaults derived from N).
      encoder_path: where the encoder came from, recorded in the manifest for the search CLI.
      progress: show progress bars.

    Returns:
      The manifest of the new index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    corpus, out_dir = Path(corpus), Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    settings = {
        "corpus": str(corpus.resolve()),
        "corpus_size": corpus.stat().st_size,
        "corpus_mtime_ns": corpus.stat().st_mtime_ns,
        "split_words": split_words,
        "skip_bad": skip_bad,
    }
    leader = jax.process_index() == 0
    with _exclusive(out_dir) if leader else contextlib.nullcontext():
        if leader:
            stats = _build_store(corpus, work, settings, split_words=split_words, skip_bad=skip_bad)
        sync_processes("rag_jax.index.build.store")
        encoder = encoder if isinstance(encoder, TextEncoder) else encoder()
        store = PassageStore(work / PASSAGES_DIR)
        embeddings = encode_passages(
            store,
            encoder,
            work / EMBEDDINGS_FILE,
            dtype=dtype,
            batch_size=batch_size,
            chunk_size=chunk_size,
            progress=progress,
        )
        if leader:
            backend_config = _build_backend(backend, embeddings, work, scann_config)
            manifest = Manifest(
                encoder_name=encoder.name,
                encoder_sha256=encoder.weights_sha256,
                dim=encoder.dim,
                count=len(store),
                dtype=dtype,
                backend=backend,
                corpus_sha256=store.sha256,
                source_sha256=stats["source_sha256"],
                source=str(corpus),
                encoder_path=encoder_path,
                n_skipped=stats["n_skipped"],
                backend_config=backend_config,
            )
            manifest.write(work)
            (work / _SETTINGS_FILE).unlink()
            _publish(work, out_dir)
            log.info("index written to %s (%d passages, %s)", out_dir, manifest.count, backend)
        sync_processes("rag_jax.index.build.done")
    return Manifest.read(out_dir)


def _build_backend(
    backend: str, embeddings: np.ndarray, work: Path, scann_config: ScannConfig | None
) -> dict:
    """Builds the search structure into ``work``; returns its settings for the manifest."""
    shutil.rmtree(work / SCANN_DIR, ignore_errors=True)
    if backend == "exact":
        return {}
    log.info("building the ScaNN searcher over %d vectors", len(embeddings))
    scann_index = ScannIndex.build(embeddings, scann_config)
    scann_index.save(work / SCANN_DIR)
    return dataclasses.asdict(scann_index.config)


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """Holds ``<out>.lock`` so two builds never write the same ``<out>.partial`` at once."""
    lock_path = out_dir.with_name(out_dir.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"another build of {out_dir} is running (it holds {lock_path})"
            raise RuntimeError(message) from None
        yield  # the lock is released when the file closes, also if the process dies
        lock_path.unlink(missing_ok=True)  # after success only: a failed build leaves it


def _build_store(
    corpus: Path, work: Path, settings: dict, *, split_words: int | None, skip_bad: bool
) -> dict:
    """Writes ``work/passages`` unless a previous run with the same settings already did."""
    settings_path = work / _SETTINGS_FILE
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous.get("settings") == settings and "stats" in previous:
            log.info("resuming the build in %s", work)
            return previous["stats"]
        log.warning("%s holds a build with other settings; starting over", work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reader = CorpusReader(corpus, skip_bad=skip_bad)
    passages = split_passages(reader, split_words) if split_words else iter(reader)
    store = PassageStore.write(passages, work / PASSAGES_DIR)
    if len(store) == 0:
        shutil.rmtree(work)
        raise CorpusError(f"{corpus}: no passages (skipped {reader.n_skipped} bad line(s))")
    stats = {"source_sha256": reader.sha256, "n_skipped": reader.n_skipped}
    settings_path.write_text(json.dumps({"settings": settings, "stats": stats}))
    return stats


def _publish(work: Path, out_dir: Path) -> None:
    """Moves the finished ``work`` directory to ``out_dir``, replacing an existing index.

    The old index is renamed aside first and restored if the second rename fails, so at every
    moment one complete index exists on disk.
    """
    if not out_dir.exists():
        os.replace(work, out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(work, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old)
