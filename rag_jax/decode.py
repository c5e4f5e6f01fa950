"""Decoding: one beam search, and RAG-Token / RAG-Sequence ("thorough", "fast") on top of it.

:func:`beam_search` is written once, as a ``lax.while_loop`` over a :class:`BeamState` with
static shapes; the model-specific part is a ``step_fn(last_tokens, cache) -> (log_probs,
cache)``. It follows transformers' vectorised beam search step for step (top 2W candidates,
finished hypotheses scored ``sum log p / length ** length_penalty``, its early-stopping
heuristic, min/max length, forced BOS/EOS), so the same model gives the same outputs. Beam
size 1 is greedy decoding.

* RAG-Token (paper section 2.4): the next-token distribution is
  :func:`rag_jax.marginalize.rag_token_log_probs` over the K documents' decoder outputs,
  with B x W x K decoder streams; the encoder runs once per (question, document).
* RAG-Sequence "thorough": a beam search per (question, document), the union of hypotheses
  without duplicates, every hypothesis scored on every document (chunked) and ranked by
  ``log p(y|x) = log Σ_z p(z|x) p(y|x,z)`` (eq. 1), as transformers'
  ``RagSequenceForGeneration.generate`` rescores them: a forced EOS is part of y and scored
  with the model's probability, a forced BOS is left out (its ``exclude_bos_score``).
* RAG-Sequence "fast" (no transformers counterpart): the same candidates, no extra forward
  passes: ``p(y|x,z)`` is the beam score with which document z's beam search produced y
  (``Σ log p``, a forced token counted as probability 1, as beam search scores it), and
  ``p(y|x,z) = 0`` for a document whose beams did not produce y.

Two differences from transformers' RAG-Sequence ``generate`` are deliberate: the prior
``p(z|x)`` is counted once per sequence (eq. 1; transformers adds it at the second target
position, so drops it for a y of a single token), and padded context positions are masked in the
per-document beams (transformers 5 passes no attention mask there and reads the pads).

Every entry point refuses a question without any document (all doc scores ``-inf``) with a
ValueError before compiling anything: there is no distribution to decode from.

Shapes: B questions, K documents per question, W beams, S source length, M maximum output
length (including the decoder start token), V vocabulary, C candidates per question.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rag_jax.marginalize import (
    doc_log_probs,
    has_documents,
    rag_token_log_probs,
    target_log_probs,
)
from rag_jax.models import Bart, BartConfig

Array = jax.Array
_NEG = -1.0e9  # transformers' "impossible" score; finite so that sums never make NaN


@struct.dataclass
class BeamState:
    """Everything the beam-search loop carries."""

    cur_len: Array  # () int32: tokens in every sequence so far, the start token included
    running_sequences: Array  # (B, W, M) int32 live hypotheses
    running_scores: Array  # (B, W) float32 Σ log p of each live hypothesis
    sequences: Array  # (B, W, M) int32 finished hypotheses
    scores: Array  # (B, W) float32 their length-penalised scores (_NEG: empty slot)
    log_likelihoods: Array  # (B, W) float32 their Σ log p
    finished: Array  # (B, W) bool: slot holds a finished hypothesis
    improvable: Array  # (B,) bool: live beams may still beat the worst finished one
    all_stopped: Array  # () bool: every candidate of the last step hit EOS or max length
    cache: Any  # the model's decoding state, leading axis B·W (or B·W·K)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Generation settings, transformers' names and meanings (``max_length`` counts the
    decoder start token). Hashable: it is a static argument of the jitted decoders."""

    beam_size: int = 4
    max_length: int = 20
    min_length: int = 0
    length_penalty: float = 1.0
    start_token: int = 2
    eos_token: int = 2
    pad_token: int = 1
    forced_bos_token: int | None = None
    forced_eos_token: int | None = None

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start token + one), got {self.max_length}")

    @classmethod
    def from_generator(cls, config: BartConfig, **settings) -> DecodeConfig:
        """Special tokens from the generator's config; ``settings`` for the rest."""
        return cls(
            start_token=config.decoder_start_token_id,
            eos_token=config.eos_token_id,
            pad_token=config.pad_token_id,
            forced_bos_token=config.forced_bos_token_id,
            forced_eos_token=config.forced_eos_token_id,
            **settings,
        )


def _process(log_probs: Array, cur_len: Array, config: DecodeConfig) -> Array:
    """transformers' logits processors on ``(R, V)`` log-probs: min length, forced BOS/EOS."""
    vocab = jnp.arange(log_probs.shape[-1])
    if config.min_length > 0:
        too_short = cur_len < config.min_length
        log_probs = jnp.where(too_short & (vocab == config.eos_token), -jnp.inf, log_probs)
    for token, position in (
        (config.forced_bos_token, 1),
        (config.forced_eos_token, config.max_length - 1),
    ):
        if token is not None:
            forced = jnp.where(vocab == token, 0.0, -jnp.inf)
            log_probs = jnp.where(cur_len == position, forced, log_probs)
    return log_probs


def beam_search(
    step_fn: Callable[[Array, Any], tuple[Array, Any]],
    reorder_fn: Callable[[Any, Array], Any],
    cache: Any,
    batch_size: int,
    config: DecodeConfig,
) -> tuple[Array, Array, Array]:
    """Beam search with transformers' semantics (``early_stopping=False``).

    Args:
      step_fn: ``(last_tokens (B·W,), cache) -> (log_probs (B·W, V), cache)``.
      reorder_fn: ``(cache, rows (B·W,)) -> cache`` whose row ``i`` is the old row ``rows[i]``.
      cache: initial decoding state for B·W rows (beams of one question adjacent).
      batch_size: B.
      config: beam size, lengths, length penalty, special tokens.

    Returns:
      ``(sequences (B, W, M), scores (B, W), log_likelihoods (B, W))``, best first; each
      sequence starts with the start token and is padded after EOS; ``scores`` are
      ``log_likelihood / generated_length ** length_penalty``. Slots that never finished
      have score ``-1e9``.
    """
    B, W, M = batch_size, config.beam_size, config.max_length
    keep = 2 * W if W > 1 else 1  # candidates per step; greedy keeps the best one only
    start = jnp.full((B, W, M), config.pad_token, jnp.int32).at[:, :, 0].set(config.start_token)
    state = BeamState(
        cur_len=jnp.asarray(1, jnp.int32),
        running_sequences=start,
        running_scores=jnp.zeros((B, W)).at[:, 1:].set(_NEG),
        sequences=start,
        scores=jnp.full((B, W), _NEG),
        log_likelihoods=jnp.full((B, W), _NEG),
        finished=jnp.zeros((B, W), bool),
        improvable=jnp.ones((B,), bool),
        all_stopped=jnp.asarray(False),
        cache=cache,
    )

    def not_done(state: BeamState) -> Array:
        return jnp.any(state.improvable) & ~state.all_stopped & (state.cur_len < M)

    def step(state: BeamState) -> BeamState:
        cur_len = state.cur_len
        last = jax.lax.dynamic_index_in_dim(state.running_sequences, cur_len - 1, 2, False)
        log_probs, cache = step_fn(last.reshape(B * W), state.cache)  # (B·W, V)
        log_probs = _process(log_probs.astype(jnp.float32), cur_len, config)
        V = log_probs.shape[-1]
        totals = (log_probs.reshape(B, W, V) + state.running_scores[..., None]).reshape(B, W * V)
        top_scores, top_ids = jax.lax.top_k(totals, keep)  # (B, keep)
        from_beam, tokens = top_ids // V, top_ids % V
        top_seqs = jnp.take_along_axis(state.running_sequences, from_beam[..., None], axis=1)
        top_seqs = jax.lax.dynamic_update_index_in_dim(top_seqs, tokens, cur_len, 2)
        hits = (tokens == config.eos_token) | (cur_len + 1 >= M)  # (B, keep)

        # The best W candidates that did not stop live on; the cache follows them.
        live_scores = top_scores + hits * _NEG
        next_rank = jax.lax.top_k(live_scores, W)[1]  # (B, W)
        running_sequences = jnp.take_along_axis(top_seqs, next_rank[..., None], axis=1)
        running_scores = jnp.take_along_axis(live_scores, next_rank, axis=1)
        source_beam = jnp.take_along_axis(from_beam, next_rank, axis=1)  # (B, W)
        cache = reorder_fn(cache, (jnp.arange(B)[:, None] * W + source_beam).reshape(B * W))

        # Stopped candidates among the best W join the finished ones; the best W are kept.
        just_finished = hits & (jnp.arange(keep) < W)[None]
        penalised = top_scores / ((cur_len + 1 - 1) ** config.length_penalty)
        penalised += (~state.improvable[:, None]) * _NEG + (~just_finished) * _NEG
        merged_scores = jnp.concatenate([state.scores, penalised], axis=1)
        best = jax.lax.top_k(merged_scores, W)[1]  # (B, W)

        def merge(old, new):
            both = jnp.concatenate([old, new], axis=1)
            index = best.reshape(best.shape + (1,) * (both.ndim - 2))
            return jnp.take_along_axis(both, index, axis=1)

        scores = merge(state.scores, penalised)
        sequences = merge(state.sequences, top_seqs)
        log_likelihoods = merge(state.log_likelihoods, top_scores)
        finished = merge(state.finished, just_finished)

        # transformers' heuristic: stop once the best live beam, scored at the current length,
        # cannot beat the worst finished hypothesis of a full set.
        cur_len = cur_len + 1
        best_live = running_scores[:, 0] / ((cur_len - 1) ** config.length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)  # (B, W)
        improvable = state.improvable & jnp.any(best_live[:, None] > worst, axis=1)
        return BeamState(
            cur_len=cur_len,
            running_sequences=running_sequences,
            running_scores=running_scores,
            sequences=sequences,
            scores=scores,
            log_likelihoods=log_likelihoods,
            finished=finished,
            improvable=improvable,
            all_stopped=jnp.all(hits),
            cache=cache,
        )

    state = jax.lax.while_loop(not_done, step, state)
    return state.sequences, state.scores, state.log_likelihoods


# --------------------------------------------------------------------------------------
# RAG-Token
# --------------------------------------------------------------------------------------


def _encode(generator: Bart, context_ids: Array, context_mask: Array):
    """Encoder memory of every (question, document) input, computed once: rows B·K."""
    B, K, S = context_ids.shape
    ids, mask = context_ids.reshape(B * K, S), context_mask.reshape(B * K, S)
    return generator.encoder_memory(generator.encode(ids, mask), mask)


def check_documents(doc_scores: Array) -> None:
    """Raises ValueError naming the questions without any document (all scores ``-inf``):
    decoding them has no distribution to follow.

    ``doc_scores``: ``(B, K)``. Needs concrete values: called on a tracer (inside a caller's
    own ``jit``) it checks nothing; the decode entry points call it before they trace.
    """
    if isinstance(doc_scores, jax.core.Tracer):
        return
    has_docs = has_documents(jnp.asarray(doc_scores))
    if not bool(jnp.all(has_docs)):
        missing = [int(i) for i in jnp.nonzero(~has_docs)[0]]
        raise ValueError(f"questions {missing} have no document (every doc_score is -inf)")


def rag_token_generate(
    generator: Bart,
    context_ids: Array,
    context_mask: Array,
    doc_scores: Array,
    config: DecodeConfig,
) -> tuple[Array, Array, Array]:
    """RAG-Token beam search: ``p'(y_t|x,y_<t) = Σ_z p(z|x) p(y_t|x,z,y_<t)`` at every step.

    Args:
      generator: the BART generator.
      context_ids, context_mask: ``(B, K, S)`` generator inputs ("title / text // question").
      doc_scores: ``(B, K)`` retriever scores, ``-inf`` for padded documents.
      config: DecodeConfig (static).

    Returns:
      ``(sequences (B, W, M), scores (B, W), log_likelihoods (B, W))`` as :func:`beam_search`;
      a log-likelihood is the RAG-Token ``log p(y|x)`` (eq. 2) of its sequence, with a forced
      BOS or EOS counted as probability 1.

    Raises:
      ValueError: a question without any document (:func:`check_documents`).
    """
    check_documents(doc_scores)
    return _rag_token_generate(generator, context_ids, context_mask, doc_scores, config=config)


@functools.partial(nnx.jit, static_argnames="config")
def _rag_token_generate(generator, context_ids, context_mask, doc_scores, config):
    B, K, _ = context_ids.shape
    W = config.beam_size
    memory = _encode(generator, context_ids, context_mask)  # rows (b, k)
    # Row (b, w, k) of the decoder streams reads memory row (b, k).
    rows = (jnp.arange(B)[:, None, None] * K + jnp.arange(K)[None, None, :]).repeat(W, axis=1)
    memory = memory.take(rows.reshape(-1))
    cache = generator.init_cache(B * W * K, config.max_length)
    scores_per_beam = jnp.repeat(doc_scores, W, axis=0)  # (B·W, K)

    def step_fn(tokens, cache):  # (B·W,)
        logits, cache = generator.decode_step(jnp.repeat(tokens, K)[:, None], cache, memory)
        logits = logits[:, 0].reshape(B * W, K, -1)  # (B·W, K, V)
        return rag_token_log_probs(logits, scores_per_beam), cache

    def reorder(cache, beam_rows):  # (B·W,) -> the K streams of each chosen beam
        return cache.take((beam_rows[:, None] * K + jnp.arange(K)[None]).reshape(-1))

    return beam_search(step_fn, reorder, cache, B, config)


# --------------------------------------------------------------------------------------
# RAG-Sequence
# --------------------------------------------------------------------------------------


def _per_document_beams(generator: Bart, memory, n_rows: int, config: DecodeConfig):
    """Beam search of the generator alone on each of ``n_rows`` (question, document) inputs."""
    W = config.beam_size
    beam_memory = memory.repeat(W)  # row (r, w) reads memory row r
    cache = generator.init_cache(n_rows * W, config.max_length)

    def step_fn(tokens, cache):
        logits, cache = generator.decode_step(tokens[:, None], cache, beam_memory)
        return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), cache

    return beam_search(step_fn, lambda cache, rows: cache.take(rows), cache, n_rows, config)


def _target_mask(sequences: Array, config: DecodeConfig) -> Array:
    """``(..., M) -> (..., M-1)``: the scored positions of ``sequences[..., 1:]``: up to and
    including the first EOS, a forced EOS included (transformers' rescoring scores it with the
    model's probability); a forced BOS is excluded, as transformers' ``exclude_bos_score``
    leaves out a first token equal to BOS (with BART's forced BOS, the BOS token, the same)."""
    targets = sequences[..., 1:]
    is_eos = targets == config.eos_token
    before_eos = jnp.cumsum(is_eos, axis=-1) - is_eos == 0  # positions up to the first EOS
    mask = before_eos & (targets != config.pad_token)
    if config.forced_bos_token is not None:
        mask = mask.at[..., 0].set(False)
    return mask


def _dedupe(candidates: Array, valid: Array) -> Array:
    """``(B, C, M), (B, C) -> (B, C)`` bool: valid and not equal to an earlier candidate."""
    same = jnp.all(candidates[:, :, None, :] == candidates[:, None, :, :], axis=-1)  # (B, C, C)
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
    duplicate = jnp.any(same & earlier[None] & valid[:, None, :], axis=-1)
    return valid & ~duplicate


def score_candidates(
    generator: Bart,
    memory,
    candidates: Array,
    doc_scores: Array,
    config: DecodeConfig,
    chunk: int = 4,
) -> Array:
    """RAG-Sequence ``log p(y|x)`` (eq. 1) of every candidate on every document.

    Args:
      generator: the generator; memory: its encoder memory, rows (b, k).
      candidates: ``(B, C, M)`` sequences (start token first, padded after EOS).
      doc_scores: ``(B, K)``.
      chunk: candidates per question scored in one batched pass (bounds memory to
        ``B·chunk·K·M·V`` logits).

    Returns:
      ``(B, C)`` float32 log-likelihoods; the scored positions are :func:`_target_mask`'s.

    Raises:
      ValueError: a question without any document (:func:`check_documents`).
    """
    check_documents(doc_scores)
    B, C, M = candidates.shape
    K = doc_scores.shape[1]
    doc_lp = doc_log_probs(doc_scores)  # (B, K)
    chunk = max(1, min(chunk, C))
    n_chunks = -(-C // chunk)
    padded = jnp.pad(
        candidates, ((0, 0), (0, n_chunks * chunk - C), (0, 0)), constant_values=config.pad_token
    )
    rows = (jnp.arange(B)[:, None, None] * K + jnp.arange(K)[None, None, :]).repeat(chunk, axis=1)
    chunk_memory = memory.take(rows.reshape(-1))  # row (b, c, k) reads (b, k)

    def one_chunk(sequences):  # (B, chunk, M)
        inputs = jnp.repeat(sequences[:, :, None, :-1], K, axis=2).reshape(-1, M - 1)
        cache = generator.init_cache(inputs.shape[0], M - 1)
        logits, _ = generator.decode_step(inputs, cache, chunk_memory)  # (B·chunk·K, M-1, V)
        targets = jnp.repeat(sequences[:, :, None, 1:], K, axis=2).reshape(-1, M - 1)
        token_lp = target_log_probs(logits, targets).reshape(B, chunk, K, M - 1)
        mask = _target_mask(sequences, config)[:, :, None, :]  # (B, chunk, 1, M-1)
        seq_lp = jnp.sum(jnp.where(mask, token_lp, 0.0), axis=-1)  # (B, chunk, K)
        return jax.nn.logsumexp(doc_lp[:, None, :] + seq_lp, axis=-1)  # (B, chunk)

    chunks = padded.reshape(B, n_chunks, chunk, M).transpose(1, 0, 2, 3)
    scores = jax.lax.map(one_chunk, chunks)  # (n_chunks, B, chunk)
    return scores.transpose(1, 0, 2).reshape(B, -1)[:, :C]


def rag_sequence_generate(
    generator: Bart,
    context_ids: Array,
    context_mask: Array,
    doc_scores: Array,
    config: DecodeConfig,
    mode: Literal["thorough", "fast"] = "thorough",
    n_return: int = 1,
    chunk: int = 4,
) -> tuple[Array, Array]:
    """RAG-Sequence decoding, batched over questions.

    Args:
      generator: the BART generator.
      context_ids, context_mask: ``(B, K, S)``.
      doc_scores: ``(B, K)``, ``-inf`` for padded documents.
      config: DecodeConfig (static); mode: "thorough" or "fast"; n_return: hypotheses per
        question; chunk: candidates scored per pass in "thorough".

    Returns:
      ``(sequences (B, n_return, M), log_likelihoods (B, n_return))``, best first.
      "thorough": the RAG-Sequence ``log p(y|x)`` of each output (eq. 1, a forced EOS scored,
      a forced BOS not); "fast": ``log Σ_z p(z|x) exp(beam score of y from z)`` over the
      documents z whose beams produced y (module docstring). Duplicates of a hypothesis
      (found from several documents) count once; slots beyond the distinct hypotheses have
      log-likelihood ``-inf``.

    Raises:
      ValueError: a question without any document (:func:`check_documents`), or an unknown
        ``mode``.
    """
    if mode not in ("thorough", "fast"):
        raise ValueError(f"mode must be 'thorough' or 'fast', got {mode!r}")
    check_documents(doc_scores)
    return _rag_sequence_generate(
        generator,
        context_ids,
        context_mask,
        doc_scores,
        config=config,
        mode=mode,
        n_return=n_return,
        chunk=chunk,
    )


@functools.partial(nnx.jit, static_argnames=("config", "mode", "n_return", "chunk"))
def _rag_sequence_generate(
    generator, context_ids, context_mask, doc_scores, config, mode, n_return, chunk
):
    B, K, _ = context_ids.shape
    W, M = config.beam_size, config.max_length
    memory = _encode(generator, context_ids, context_mask)  # rows (b, k)
    sequences, _, beam_lls = _per_document_beams(generator, memory, B * K, config)
    candidates = sequences.reshape(B, K * W, M)
    produced = (beam_lls > _NEG / 2).reshape(B, K * W)  # a finished hypothesis in that slot
    produced &= jnp.repeat(doc_scores > -jnp.inf, W, axis=1)  # padded documents propose nothing
    unique = _dedupe(candidates, produced)
    if mode == "thorough":
        lls = score_candidates(generator, memory, candidates, doc_scores, config, chunk)
    else:
        # Σ over the documents whose beams produced y of p(z|x) p(y|x,z), beam scores reused.
        doc_lp = jnp.repeat(doc_log_probs(doc_scores), W, axis=1)  # (B, K·W)
        joint = jnp.where(produced, doc_lp + beam_lls.reshape(B, K * W), -jnp.inf)
        same = jnp.all(candidates[:, :, None, :] == candidates[:, None, :, :], axis=-1)
        lls = jax.nn.logsumexp(jnp.where(same, joint[:, None, :], -jnp.inf), axis=-1)
    lls = jnp.where(unique, lls, -jnp.inf)
    best_lls, best = jax.lax.top_k(lls, n_return)
    return jnp.take_along_axis(candidates, best[..., None], axis=1), best_lls
