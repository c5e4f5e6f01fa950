"""Training the document encoder ``BERT_d`` too, and refreshing the index inside the same program.

The paper keeps ``BERT_d`` and the index frozen; here (``config.model.train_doc_encoder``) it
is a module of the :class:`~rag_jax.rag.RagModel` (``doc_encoder/`` in parameter paths, its
own learning-rate factor ``optimizer.doc_encoder_lr_factor``, frozen by ``optimizer.freeze``
like any other path), and each step recomputes ``d(z)`` of the K retrieved passages with the
current ``BERT_d`` from their tokens, so the gradient of ``-log p(y|x)`` reaches it through
``p(z|x) ∝ exp(d(z)·q(x))`` as it reaches ``BERT_q``.

Retrieval stays on the device (``config.data.retrieval = "device"``): beside the generator's
tokens, every passage's ``BERT_d`` tokens (the index build's: the pair (title, text), cut at
the index's ``max_length``, no segment ids) sit on the device once, rows sharded as the
vectors (:func:`passage_tokens`), and the step gathers the K retrieved rows. Every
``data.refresh_every`` steps, and at the start when ``BERT_d`` is not the encoder that built
the index, the whole corpus is re-encoded with the current ``BERT_d`` on the training mesh
(:func:`encode_corpus`: one jitted program, each device its own rows) and the device index is
swapped for the new vectors between two steps (:class:`DocEncoderRetriever`). Retrieval between
refreshes searches the stale vectors; the scores that train are always fresh.

State: ``BERT_d`` is in the model's parameters (checkpointed with them); the retrieval
snapshot saved with each checkpoint holds, beside the query encoder, the ``BERT_d`` weights the
current index vectors were encoded with and the step of that refresh, so a resumed run
re-encodes (or, when they are the index file's encoder, reloads) exactly the vectors the
uninterrupted run was searching.

Shapes: B batch, K documents per question, N passages (N' padded to the shards), Ld the
longest passage's BERT_d tokens (at most the index's ``max_length``), H vector size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax import device_retrieval
from rag_jax.index.encode import hf_tokenize_fn, weights_sha256
from rag_jax.index.manifest import Manifest
from rag_jax.models.hf_bert import load_bert_tokenizer, tokenizer_dir
from rag_jax.models.inputs import check_token_ids, check_tokenizer_vocab, tokenizer_sha256

log = logging.getLogger(__name__)

# Rows each device encodes at once in a refresh: memory is O(REFRESH_ROWS · Ld · H) per device.
REFRESH_ROWS = 64


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains ``BERT_d`` or asks for refreshes or re-scoring (which
    :func:`check_settings` then holds to the rules)."""
    return (
        bool(config.model.get("train_doc_encoder", False))
        or bool(config.data.get("refresh_every", 0))
        or bool(config.data.get("rescore_candidates", 0))
    )


def doc_encoder_dir(config: ml_collections.ConfigDict) -> str:
    """``model.doc_encoder``, or the query encoder's directory when empty."""
    return config.model.get("doc_encoder", "") or config.model.question_encoder


def check_settings(config: ml_collections.ConfigDict) -> None:
    """One-line errors for document-encoder settings no run can use.

    Raises:
      ValueError: ``data.refresh_every`` or ``data.rescore_candidates`` not an int >= 0, or
        set without ``model.train_doc_encoder``; ``rescore_candidates`` not above
        ``rag.n_docs``; ``train_doc_encoder`` with a closed-book model or with
        host retrieval (the host path does not carry the passages' BERT_d tokens).
    """
    counts = {field: config.data.get(field, 0) for field in ("refresh_every", "rescore_candidates")}
    for field, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.data.{field} must be an int >= 0, got {value!r}")
    refresh_every, rescore_candidates = counts["refresh_every"], counts["rescore_candidates"]
    if not config.model.get("train_doc_encoder", False):
        if refresh_every:
            raise ValueError(
                f"config.data.refresh_every={refresh_every} re-encodes the corpus with a trained "
                "document encoder: set config.model.train_doc_encoder=True (or refresh_every=0)"
            )
        if rescore_candidates:
            raise ValueError(
                f"config.data.rescore_candidates={rescore_candidates} re-ranks candidates with a "
                "trained document encoder: set config.model.train_doc_encoder=True (or 0)"
            )
        return
    if rescore_candidates and rescore_candidates <= config.rag.n_docs:
        raise ValueError(
            f"config.data.rescore_candidates={rescore_candidates} must exceed rag.n_docs="
            f"{config.rag.n_docs} (L candidates, the best K kept), or be 0"
        )
    if config.rag.marginalization == "closed_book":
        raise ValueError(
            "config.model.train_doc_encoder=True needs retrieval, but config.rag.marginalization="
            "'closed_book' retrieves nothing"
        )
    if config.data.retrieval != "device":
        raise ValueError(
            "config.model.train_doc_encoder=True is implemented for device retrieval only: set "
            f"config.data.retrieval='device' (got {config.data.retrieval!r})"
        )


def passage_tokens(
    passages: Sequence, doc_dir: str, manifest: Manifest, doc_encoder
) -> tuple[np.ndarray, np.ndarray]:
    """BERT_d's tokens of every passage, exactly as ``python -m rag_jax.index build`` tokenized
    them for the index: the pair (title, text), cut at the index's ``max_length``.

    Args:
      passages: the index's passages, in row order (``.title``, ``.text``).
      doc_dir: BERT_d's directory (its tokenizer).
      manifest: the index's manifest (its encoder's preprocessing).
      doc_encoder: the model's ``BertEncoder`` (pooling, normalisation, vocabulary).

    Returns:
      ``(ids (N, Ld) int32, lengths (N,) int32)``, padded with the tokenizer's padding id.

    Raises:
      ValueError: BERT_d's tokenizer, pooling or normalisation differ from the index's encoder
        (its vectors would live in another space), or a token id outside its vocabulary.
    """
    tokenizer = load_bert_tokenizer(doc_dir)
    config = doc_encoder.bert.config
    check_tokenizer_vocab(tokenizer, config.vocab_size, f"document encoder {doc_dir}")
    recorded = manifest.encoder_preprocessing
    given = {
        "pooling": doc_encoder.pooling,
        "normalize": doc_encoder.normalize,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir(doc_dir)),
    }
    differ = [
        f"{key} {recorded[key]!r} (index) != {given[key]!r} (doc encoder)"
        for key in given
        if key in recorded and recorded[key] != given[key]
    ]
    if differ:
        raise ValueError(
            f"config.model.doc_encoder={doc_dir!r} does not encode passages as the index's "
            f"encoder {manifest.encoder_name!r} did: {'; '.join(differ)}"
        )
    max_length = recorded.get("max_length") or min(512, config.max_position_embeddings)
    ids = hf_tokenize_fn(tokenizer, max_length)(
        [p.title for p in passages], [p.text for p in passages]
    )
    width = max(len(row) for row in ids)  # Ld
    pad_id = tokenizer.pad_token_id or 0
    out = np.full((len(ids), width), pad_id, np.int32)
    for i, row in enumerate(ids):
        out[i, : len(row)] = row
    check_token_ids(out, config.vocab_size, f"passage tokens (document encoder {doc_dir})")
    return out, np.array([max(len(row), 1) for row in ids], np.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n_passages", "rows", "out_dtype", "mesh", "axes")
)
def _encode_rows(graphdef, params, rest, ids, lengths, *, n_passages, rows, out_dtype, mesh, axes):
    """``BERT_d`` over every row of ``ids`` (N', Ld), ``rows`` per shard at a time.

    The rows are split over ``axes`` of ``mesh`` as the index's (D shards of N'/D contiguous
    rows; no mesh: one shard); each of the ``lax.map`` iterations encodes ``rows`` rows of
    every shard, so each device encodes its own rows and the vectors come out sharded as the
    index's. Rows >= ``n_passages`` (the shards' padding) are zero, as
    :meth:`ExactIndex.from_array` pads them.
    """
    encoder = nnx.merge(graphdef, params, rest)
    encoder.eval()  # no dropout: the index's vectors
    n_shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    N, Ld = ids.shape
    per_shard = N // n_shards
    n_chunks = -(-per_shard // rows)
    pad = n_chunks * rows - per_shard
    ids = jnp.pad(ids.reshape(n_shards, per_shard, Ld), ((0, 0), (0, pad), (0, 0)))
    lengths = jnp.pad(lengths.reshape(n_shards, per_shard), ((0, 0), (0, pad)), constant_values=1)
    ids = ids.reshape(n_shards, n_chunks, rows, Ld).transpose(1, 0, 2, 3)  # (chunks, D, r, Ld)
    lengths = lengths.reshape(n_shards, n_chunks, rows).transpose(1, 0, 2)  # (chunks, D, r)

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axes)))

    def encode_chunk(chunk):
        chunk_ids, chunk_lengths = chunk
        flat_ids = constrain(chunk_ids.reshape(n_shards * rows, Ld))
        mask = (jnp.arange(Ld) < chunk_lengths.reshape(-1, 1)).astype(jnp.int32)  # as the build
        vectors = encoder.embed(flat_ids, constrain(mask))  # (D·r, H) float32
        return vectors.reshape(n_shards, rows, -1)

    vectors = jax.lax.map(encode_chunk, (ids, lengths))  # (chunks, D, r, H)
    H = vectors.shape[-1]
    vectors = vectors.transpose(1, 0, 2, 3).reshape(n_shards, n_chunks * rows, H)[:, :per_shard]
    vectors = vectors.reshape(N, H)
    vectors = jnp.where((jnp.arange(N) < n_passages)[:, None], vectors, 0.0)
    return constrain(vectors.astype(out_dtype))


def encode_corpus(doc_encoder, corpus: device_retrieval.DeviceCorpus, params=None) -> jax.Array:
    """``BERT_d(title, text)`` of every passage of ``corpus``: (N', H) in the index's dtype,
    rows sharded as ``corpus.index.embeddings`` (padding rows zero).

    ``doc_encoder``: the model's ``BertEncoder`` (its graph; and its weights unless ``params``,
    a state of its ``nnx.Param`` s, is given). Dropout is off.
    """
    graphdef, own, rest = nnx.split(doc_encoder, nnx.Param, ...)
    index = corpus.index
    rows_per_shard = corpus.doc_token_ids.shape[0]
    if index.mesh is not None:
        rows_per_shard //= math.prod(index.mesh.shape[a] for a in index.doc_axes)
    vectors = _encode_rows(
        graphdef,
        own if params is None else params,
        rest,
        corpus.doc_token_ids,
        corpus.doc_token_lengths,
        n_passages=index.n_passages,
        rows=max(1, min(REFRESH_ROWS, rows_per_shard)),
        out_dtype=jnp.dtype(index.embeddings.dtype).name,
        mesh=index.mesh,
        axes=index.doc_axes,
    )
    # The index's own sharding object (an equivalent one could differ in spelling, and the
    # train step would compile again for it).
    return jax.device_put(vectors, index.embeddings.sharding)


def with_doc_tokens(
    corpus: device_retrieval.DeviceCorpus,
    ids: np.ndarray,
    lengths: np.ndarray,
    rescore_candidates: int = 0,
) -> device_retrieval.DeviceCorpus:
    """``corpus`` with the passages' BERT_d tokens (N, Ld), (N,) placed beside its vectors
    (padded to its N' rows, length 1), and ``rescore_candidates`` (L, 0: off) set."""
    rows = corpus.index.embeddings.shape[0]
    ids = np.pad(ids, ((0, rows - len(ids)), (0, 0)))
    lengths = np.pad(lengths, (0, rows - len(lengths)), constant_values=1)
    return dataclasses.replace(
        corpus,
        doc_token_ids=device_retrieval._like_index(ids, corpus.index),
        doc_token_lengths=device_retrieval._like_index(lengths, corpus.index),
        rescore_candidates=rescore_candidates,
    )


def _copy_params(module) -> nnx.State:
    """A copy of ``module``'s parameters (the train step donates the originals)."""
    return jax.tree.map(jnp.copy, nnx.state(module, nnx.Param))


class DocEncoderRetriever(device_retrieval.DeviceRetriever):
    """Device retrieval for a run that trains ``BERT_d``: the corpus carries BERT_d tokens, and
    :meth:`before_step` swaps in re-encoded vectors when a refresh is due.

    Its snapshot (what each checkpoint saves for retrieval) is
    ``{"query_encoder": q state, "index_encoder": BERT_d params the vectors come from,
    "refresh_step": step of that refresh (0: none yet)}``.
    """

    def __init__(self, builder, corpus, mesh, step_fn, prefetch, *, model, refresh_every: int):
        super().__init__(builder, corpus, mesh, step_fn, prefetch)
        self.refresh_every = refresh_every
        manifest = builder.knowledge.manifest
        self.file_sha256 = manifest.encoder_sha256  # the encoder of the index file's vectors
        self.file_embeddings = corpus.index.embeddings
        self.index_params = _copy_params(model.doc_encoder)
        self.refresh_step = 0
        self.started = False
        self.refreshes: list[dict] = []  # step, seconds, passages of each re-encoding

    def snapshot(self, model) -> nnx.State:
        return nnx.State(
            {
                "query_encoder": super().snapshot(model),
                "index_encoder": self.index_params,
                "refresh_step": nnx.Variable(jnp.asarray(self.refresh_step, jnp.int32)),
            }
        )

    def _dispatch(self, examples, state) -> tuple:
        return examples, state["query_encoder"]

    def before_step(self, model, step: int, snapshot: nnx.State) -> None:
        """Between steps ``step`` and ``step + 1``: a refresh when one is due (every
        ``refresh_every`` steps), else, the first time, the vectors of ``snapshot``'s index
        encoder (the index file's when it built the index, else re-encoded with it: a fresh
        start with another BERT_d, or a resumed run)."""
        due = self.refresh_every and step > 0 and step % self.refresh_every == 0
        if due:
            self.refresh(model, step)
        elif not self.started:
            self.adopt(model, snapshot)
        self.started = True

    def adopt(self, model, snapshot: nnx.State) -> None:
        """Searches the vectors of ``snapshot["index_encoder"]`` from now on."""
        params = snapshot["index_encoder"]
        self.refresh_step = int(jax.device_get(snapshot["refresh_step"][...]))
        if weights_sha256(params) == self.file_sha256:
            self._swap(self.file_embeddings)
        else:
            self._swap(self._timed_encode(model, params, self.refresh_step))
        self.index_params = params

    def refresh(self, model, step: int) -> None:
        """Re-encodes the corpus with the current ``BERT_d`` and searches it from now on."""
        params = _copy_params(model.doc_encoder)
        self._swap(self._timed_encode(model, params, step))
        self.index_params, self.refresh_step = params, step

    def _timed_encode(self, model, params, step: int) -> jax.Array:
        start = time.perf_counter()
        embeddings = jax.block_until_ready(encode_corpus(model.doc_encoder, self.corpus, params))
        seconds = time.perf_counter() - start
        n = self.corpus.index.n_passages
        self.refreshes.append({"step": step, "seconds": seconds, "passages": n})
        log.info("re-encoded %d passages with BERT_d of step %d in %.2f s", n, step, seconds)
        return embeddings

    def _swap(self, embeddings: jax.Array) -> None:
        index = dataclasses.replace(self.corpus.index, embeddings=embeddings)
        self.corpus = dataclasses.replace(self.corpus, index=index)


def make_retriever(
    config: ml_collections.ConfigDict, model, builder, examples, mesh, step_fn
) -> DocEncoderRetriever:
    """The retriever of a run with ``model.train_doc_encoder`` (``step_fn``: the device train
    step), its corpus carrying BERT_d tokens.

    Raises:
      ValueError: as :func:`check_settings` and :func:`passage_tokens`.
    """
    check_settings(config)
    knowledge = builder.knowledge
    corpus = device_retrieval.corpus_from_knowledge(knowledge, builder, examples[0].question)
    passages = knowledge.passages(np.arange(knowledge.manifest.count))
    ids, lengths = passage_tokens(
        passages, doc_encoder_dir(config), knowledge.manifest, model.doc_encoder
    )
    rescore_candidates = config.data.get("rescore_candidates", 0)
    if rescore_candidates > knowledge.manifest.count:
        raise ValueError(
            f"config.data.rescore_candidates={rescore_candidates} but the index "
            f"{config.data.index} holds {knowledge.manifest.count} passages"
        )
    return DocEncoderRetriever(
        builder,
        with_doc_tokens(corpus, ids, lengths, rescore_candidates),
        mesh,
        step_fn,
        config.data.prefetch,
        model=model,
        refresh_every=config.data.refresh_every,
    )
