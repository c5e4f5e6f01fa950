"""Building an index directory: corpus -> passage store -> embeddings -> search backend -> manifest.

All work happens in ``<out>.partial/`` beside the destination and is renamed into place only when
complete, so a failed or interrupted build never touches an existing index at ``<out>``. Re-running
the same build resumes: the passage store is kept and encoding continues from its last finished
chunk (see encode.py), giving the same bytes as an uninterrupted build.

What is not ours is never touched: before any work, an existing ``<out>`` must be an index this
library built (a valid manifest and nothing but index files), and an existing ``<out>.partial``
must hold only build files; anything else is refused with :class:`BuildError`. A failed build
removes its ``<out>.lock`` always and its ``<out>.partial`` when nothing there can be resumed
(a bad corpus); otherwise the error says that the partial build is kept for a re-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from rag_jax import _files
from rag_jax.index.checks import positive_int
from rag_jax.index.corpus import CorpusError, CorpusReader, PassageStore, split_passages
from rag_jax.index.encode import DTYPES, TextEncoder, encode_passages, sync_processes
from rag_jax.index.manifest import BACKENDS, MANIFEST_FILE, IndexMismatchError, Manifest
from rag_jax.index.scann_index import ScannConfig, ScannIndex
from rag_jax.index.source import EMBEDDINGS_FILE, PASSAGES_DIR, SCANN_DIR

log = logging.getLogger(__name__)

_SETTINGS_FILE = "build.json"
# Everything a finished index directory holds, and what a build in progress may add.
_INDEX_ENTRIES = {MANIFEST_FILE, EMBEDDINGS_FILE, PASSAGES_DIR, SCANN_DIR}
_WORK_ENTRIES = _INDEX_ENTRIES | {
    _SETTINGS_FILE,
    f"{PASSAGES_DIR}.tmp",
    _files.replaced_path(PASSAGES_DIR).name,
    f"{EMBEDDINGS_FILE}.progress",
    f"{MANIFEST_FILE}.tmp",
}


class BuildError(RuntimeError):
    """A build that must not start: a concurrent build, or a target that is not an index of ours."""


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

    Raises:
      ValueError: a bad argument (checked before any work).
      BuildError: ``out_dir`` (or ``<out>.partial``, ``<out>.lock``) exists and is not ours, or
        another build of ``out_dir`` is running.
      CorpusError: a bad corpus line; nothing is left behind.
      EncodingError: a passage whose vector is NaN/inf or zero, or whose token ids exceed the
        encoder's vocabulary.
      OSError: e.g. a full disk, with a message naming ``out_dir``.
      Other failures keep ``<out>.partial`` for a resume and say so in a note.
    """
    _check_build_args(backend, split_words, dtype, batch_size, chunk_size, scann_config)
    corpus, out_dir = Path(corpus), Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found (or not a file): {corpus}")
    _check_not_someone_elses(out_dir, work, corpus)
    if encoder_path:  # searched later from anywhere: record where it really is
        encoder_path = str(Path(encoder_path).resolve())
    settings = {
        "corpus": str(corpus.resolve()),
        "corpus_size": corpus.stat().st_size,
        "corpus_mtime_ns": corpus.stat().st_mtime_ns,
        "split_words": split_words,
        "skip_bad": skip_bad,
    }
    leader = jax.process_index() == 0
    if leader:  # every check passed: `--out runs/new/index` on a fresh clone needs runs/new
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir) if leader else contextlib.nullcontext(), _explained(out_dir, work):
        if leader:
            stats = _build_store(corpus, work, settings, split_words=split_words, skip_bad=skip_bad)
        sync_processes("rag_jax.index.build.store")
        encoder = encoder if isinstance(encoder, TextEncoder) else encoder()
        store = PassageStore(work / PASSAGES_DIR)
        encoding_stats: dict = {}
        embeddings = encode_passages(
            store,
            encoder,
            work / EMBEDDINGS_FILE,
            dtype=dtype,
            batch_size=batch_size,
            chunk_size=chunk_size,
            progress=progress,
            stats=encoding_stats,
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
                encoder_preprocessing=encoder.preprocessing,
                n_skipped=stats["n_skipped"],
                n_truncated=encoding_stats["n_truncated"],
                backend_config=backend_config,
            )
            manifest.write(work)
            (work / _SETTINGS_FILE).unlink()
            _publish(work, out_dir)
            log.info("index written to %s (%d passages, %s)", out_dir, manifest.count, backend)
        sync_processes("rag_jax.index.build.done")
    return Manifest.read(out_dir)


def _check_build_args(
    backend: str,
    split_words: int | None,
    dtype: str,
    batch_size: int,
    chunk_size: int,
    scann_config: ScannConfig | None,
) -> None:
    """Every build argument checked before the corpus is read (ValueError naming it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    positive_int("split_words", split_words, allow_none=True)
    positive_int("batch_size", batch_size)
    positive_int("chunk_size", chunk_size)
    if scann_config is not None and not isinstance(scann_config, ScannConfig):
        raise ValueError(f"scann_config must be a ScannConfig, got {type(scann_config).__name__}")


def _check_not_someone_elses(out_dir: Path, work: Path, corpus: Path) -> None:
    """Refuses, before any work, targets whose replacement would destroy something not ours.

    ``out_dir`` may be absent or an index built here (valid manifest, only index entries);
    ``<out>.partial`` absent or holding only build files; ``<out>.lock`` absent or empty.
    """
    how = f"choose another output directory, or move {out_dir} away yourself"
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BuildError(
            f"output {out_dir} exists and is not a directory: refusing to replace it; {how}"
        )
    if out_dir.is_dir():
        try:
            Manifest.read(out_dir)
        except IndexMismatchError:
            raise BuildError(
                f"output directory {out_dir} exists and is not an index built by rag_jax (no valid "
                f"{MANIFEST_FILE}): refusing to replace it; {how}"
            ) from None
        others = sorted(set(os.listdir(out_dir)) - _INDEX_ENTRIES)
        if others:
            raise BuildError(
                f"index {out_dir} also holds {', '.join(others)}, which a rebuild would delete: "
                f"refusing to replace it; move them out, or {how}"
            )
    if corpus.resolve().is_relative_to(out_dir.resolve()):
        raise BuildError(f"the corpus {corpus} lies inside the output directory {out_dir}; {how}")
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise BuildError(f"{work} exists and is not a build directory: move it away")
    if work.is_dir():
        others = sorted(set(os.listdir(work)) - _WORK_ENTRIES)
        if others:
            raise BuildError(f"{work} holds {', '.join(others)}: not a build of ours; move it away")
    lock = out_dir.with_name(out_dir.name + ".lock")
    if lock.is_symlink() or (lock.exists() and (not lock.is_file() or lock.stat().st_size)):
        raise BuildError(f"{lock} exists and is not an empty lock file: move it away")


@contextlib.contextmanager
def _explained(out_dir: Path, work: Path):
    """Removes ``work`` after a failure that left nothing to resume, else says it is kept.

    A corpus error or a refusal happens before anything resumable exists; a full disk gets a
    message naming ``out_dir``.
    """
    try:
        yield
    except CorpusError:
        if not (work / _SETTINGS_FILE).is_file():  # the store was never finished
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({error.filename})" if error.filename else ""
            full = OSError(
                f"no space left on the device while building {out_dir}: "
                f"{error.strerror or error}{where}; free space and run the same build again "
                f"to resume from {work}"
            )
            full.errno = error.errno
            raise full from error
        if work.is_dir():
            error.add_note(
                f"the work done so far is kept in {work}: run the same build again to resume, "
                "or delete it"
            )
        raise


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
    """Holds ``<out>.lock`` so two builds never write the same ``<out>.partial`` at once.

    The file is removed when the build ends, successfully or not. Since a waiting build may
    open the file just before it is removed, a lock counts only if the path still names the
    locked file afterwards; otherwise that build sees a concurrent build and stops.
    """
    lock_path = out_dir.with_name(out_dir.name + ".lock")
    running = f"another build of {out_dir} is running (it holds {lock_path})"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(running) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder finished and removed it between our open and flock
            raise BuildError(running + "; or it just finished: try again")
        try:
            yield  # the lock is released when the file closes, also if the process dies
        finally:
            lock_path.unlink(missing_ok=True)


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

    ``rag_jax._files.replace_dir``: the old index is deleted only once the new one is in place,
    and restored if that fails (or, after a crash between the two renames, when next opened).
    """
    _files.replace_dir(work, out_dir)
