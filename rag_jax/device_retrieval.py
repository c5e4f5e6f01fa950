"""Retrieval inside the jitted train step (``config.data.retrieval = "device"``).

The index's vectors stay on the device (an :class:`~rag_jax.index.ExactIndex`, rows sharded
over the mesh) beside the passages' tokens, tokenized once when training starts. Each step then
embeds the questions, takes the top K by inner product, gathers the documents' vectors and
tokens and assembles the generator inputs, all inside ``jit``: the same
:class:`~rag_jax.rag.RagBatch` that :class:`~rag_jax.host_retrieval.BatchBuilder` builds on
the host, with no host round trip. The host only tokenizes the questions and answers.

A generator input is ``[lead] passage suffix [trail]`` with ``passage = prefix + title +
title_sep + text`` and ``suffix = doc_sep + question`` (``lead``/``trail``: the tokenizer's
special tokens, ``[CLS]``/``[SEP]`` or ``<s>``/``</s>``); when it is too long the passage is cut,
never the question: :func:`rag_jax.tokenization.tokenize_contexts`'s rule. Tokenizing the two pieces
apart gives that function's ids only when the tokenizer splits the whole string at their
boundary (WordPiece and byte-level BPE do: ``doc_sep`` starts with a space), so
:func:`device_corpus` and :func:`question_batch` check it for every passage and question
against the host path's own strings, and refuse what differs.

Shapes: B batch, K documents per question, N passages (N' padded to the shards), P passage
tokens kept, Q question-suffix tokens kept (both S minus the special tokens), S context length,
L question length, T target length, H hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax.data import QAExample
from rag_jax.host_retrieval import Prepared, Retriever
from rag_jax.index.exact import ExactIndex, exact_search
from rag_jax.models.inputs import check_token_ids
from rag_jax.rag import RagBatch, RagConfig
from rag_jax.sharding import local_rows, shard_batch
from rag_jax.tokenization import (
    context_string,
    passage_text,
    question_suffix,
    special_tokens,
    tokenize_questions,
    tokenize_targets,
)


def _check_split(tokenizer, strings: Sequence[str], lefts, rights, what: Sequence[str]) -> None:
    """Raises ValueError unless ``tokenizer(strings[i])`` (the host path's inputs, special
    tokens included) equals ``lead + lefts[i] + rights[i] + trail`` (token lists)."""
    lead, trail = special_tokens(tokenizer)
    whole = tokenizer(list(strings), add_special_tokens=True)["input_ids"]
    for i, ids in enumerate(whole):
        if list(ids) != [*lead, *lefts[i], *rights[i], *trail]:
            raise ValueError(
                f"config.data.retrieval='device' tokenizes passages and questions apart, but "
                f"the generator tokenizer does not split {what[i]} at the passage/question "
                f"boundary ({strings[i]!r}); use config.data.retrieval='host'"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceCorpus:
    """The index's vectors and the passages' tokens on the device; a pytree for ``jit``.

    Attributes:
      index: the (N', H) vectors, rows sharded over the mesh (see :class:`ExactIndex`).
      passage_ids: (N', P) int32 tokens of :func:`passage_text`, rows sharded as the vectors.
      passage_lengths: (N',) int32 their lengths before the cut to P.
      lead, trail: the special tokens around every generator input.
      pad_id: the generator tokenizer's padding id.
      doc_token_ids: (N', Ld) int32 BERT_d tokens of each passage's (title, text), rows sharded
        as the vectors, when the document encoder trains (:mod:`rag_jax.doc_encoder`); else None.
      doc_token_lengths: (N',) int32 their lengths (>= 1), or None.
      rescore_candidates: L > K candidates searched and re-scored with the current BERT_d,
        the best K kept (:func:`rescore`); 0: the index's top K.
    """

    index: ExactIndex
    passage_ids: jax.Array
    passage_lengths: jax.Array
    lead: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    trail: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    pad_id: int = dataclasses.field(metadata={"static": True})
    doc_token_ids: jax.Array | None = None
    doc_token_lengths: jax.Array | None = None
    rescore_candidates: int = dataclasses.field(default=0, metadata={"static": True})


def device_corpus(
    index: ExactIndex,
    passages: Sequence,
    tokenizer,
    config: RagConfig,
    vocab_size: int,
    probe_question: str,
) -> DeviceCorpus:
    """Tokenizes ``passages`` (the index's, in row order) once and places them beside ``index``.

    Raises:
      ValueError: a passage whose tokens, apart from the question's, differ from the host
        path's (checked with ``probe_question``), or token ids outside ``[0, vocab_size)``.
    """
    lead, trail = special_tokens(tokenizer)
    texts = [passage_text(p.title, p.text, config) for p in passages]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    probe = tokenizer([question_suffix(probe_question, config)], add_special_tokens=False)
    _check_split(
        tokenizer,
        [context_string(p.title, p.text, probe_question, config) for p in passages],
        pieces,
        probe["input_ids"] * len(texts),
        [f"passage {i} ({p.id!r})" for i, p in enumerate(passages)],
    )
    width = max(config.max_context_length - len(lead) - len(trail), 1)  # P
    ids, lengths = _pad(pieces, width, tokenizer.pad_token_id)
    check_token_ids(ids, vocab_size, "passage tokens (generator tokenizer)")
    rows = index.embeddings.shape[0]  # N' >= N: the index pads its rows to the shards
    ids = np.pad(ids, ((0, rows - len(ids)), (0, 0)), constant_values=tokenizer.pad_token_id)
    lengths = np.pad(lengths, (0, rows - len(lengths)))
    return DeviceCorpus(
        index, _like_index(ids, index), _like_index(lengths, index), lead, trail,
        tokenizer.pad_token_id,
    )  # fmt: skip


def _pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``(n, width)`` int32 ids (cut, padded) and their full lengths ``(n,)``."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : min(len(row), width)] = row[:width]
    return ids, np.array([len(row) for row in rows], np.int32)


def _like_index(value: np.ndarray, index: ExactIndex) -> jax.Array:
    """``value`` (N', ...) on the device, rows sharded as ``index``'s vectors; each process
    places its own shards."""
    if index.mesh is None:
        return jnp.asarray(value)
    sharding = NamedSharding(index.mesh, PartitionSpec(index.doc_axes))
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


@struct.dataclass
class QuestionBatch:
    """What the host prepares for a device-retrieval step: questions and answers, tokenized."""

    question_ids: jax.Array  # (B, L) int, query-encoder tokens
    question_mask: jax.Array  # (B, L) bool
    suffix_ids: jax.Array  # (B, Q) int32, generator tokens of question_suffix, cut to Q
    suffix_lengths: jax.Array  # (B,) int32, their full lengths
    decoder_input_ids: jax.Array  # (B, T) int
    targets: jax.Array  # (B, T) int
    target_mask: jax.Array  # (B, T) bool


def question_batch(
    examples: Sequence[QAExample],
    builder,
    probe_passage,
) -> tuple[QuestionBatch, dict[str, int]]:
    """``examples`` -> a :class:`QuestionBatch` (numpy) and the questions and targets cut.

    ``builder`` is the run's :class:`rag_jax.host_retrieval.BatchBuilder` (tokenizers, configs);
    ``probe_passage`` one of the corpus's passages, to check that each question tokenizes
    apart from a passage as the host path tokenizes it (else ValueError).
    """
    config, tokenizer = builder.config, builder.generator_tokenizer
    questions = [e.question for e in examples]
    q = tokenize_questions(builder.question_tokenizer, questions, config.max_question_length)
    if builder.question_vocab_size is not None:
        check_token_ids(q.ids, builder.question_vocab_size, "question_ids (query tokenizer)")
    suffixes = [question_suffix(question, config) for question in questions]
    pieces = tokenizer(suffixes, add_special_tokens=False)["input_ids"]
    left = passage_text(probe_passage.title, probe_passage.text, config)
    _check_split(
        tokenizer,
        [context_string(probe_passage.title, probe_passage.text, x, config) for x in questions],
        tokenizer([left], add_special_tokens=False)["input_ids"] * len(questions),
        pieces,
        [f"question {x!r}" for x in questions],
    )
    lead, trail = special_tokens(tokenizer)
    width = max(config.max_context_length - len(lead) - len(trail), 1)  # Q
    suffix_ids, suffix_lengths = _pad(pieces, width, tokenizer.pad_token_id)
    check_token_ids(suffix_ids, builder.generator_config.vocab_size, "question tokens (generator)")
    targets = tokenize_targets(
        tokenizer,
        [e.answers[0] for e in examples],
        builder.generator_config,
        config.max_target_length,
    )
    batch = QuestionBatch(
        q.ids, q.mask, suffix_ids, suffix_lengths,
        targets.decoder_input_ids, targets.targets, targets.target_mask,
    )  # fmt: skip
    return batch, {"question": q.n_truncated, "target": targets.n_truncated}


def assemble_contexts(
    passage_ids: jax.Array,
    passage_lengths: jax.Array,
    suffix_ids: jax.Array,
    suffix_lengths: jax.Array,
    corpus: DeviceCorpus,
    S: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[lead] passage suffix [trail]`` per (question, document), the passage cut first.

    Args:
      passage_ids: (B, K, P) the retrieved passages' tokens; passage_lengths: (B, K).
      suffix_ids: (B, Q) the questions' suffix tokens; suffix_lengths: (B,).
      corpus: for the special tokens and the padding id.
      S: the generator input length.

    Returns:
      ``(context_ids (B, K, S) int32, context_mask (B, K, S) bool, n_cut (B,) int32)``:
      :func:`rag_jax.tokenization.tokenize_contexts`'s ids and its count of inputs cut, per
      question.
    """
    lead = jnp.asarray(corpus.lead or (corpus.pad_id,), jnp.int32)
    trail = jnp.asarray(corpus.trail or (corpus.pad_id,), jnp.int32)
    n_special = len(corpus.lead) + len(corpus.trail)
    q_len = jnp.minimum(suffix_lengths, S - n_special)[:, None, None]  # (B, 1, 1)
    p_len = jnp.minimum(passage_lengths[..., None], S - n_special - q_len)  # (B, K, 1)
    s = jnp.arange(S)  # positions (S,)
    # Segment starts at each position: passage, suffix, trail, padding.
    p_start = len(corpus.lead)
    q_start = p_start + p_len  # (B, K, 1)
    t_start = q_start + q_len
    end = t_start + len(corpus.trail)
    P, Q = passage_ids.shape[-1], suffix_ids.shape[-1]
    from_passage = passage_ids[..., jnp.clip(s - p_start, 0, P - 1)]  # (B, K, S)
    suffix = jnp.broadcast_to(suffix_ids[:, None, :], (*passage_ids.shape[:2], Q))
    from_suffix = jnp.take_along_axis(suffix, jnp.clip(s - q_start, 0, Q - 1), axis=-1)
    ids = jnp.select(
        [s < p_start, s < q_start, s < t_start, s < end],
        [
            lead[jnp.clip(s, 0, len(lead) - 1)],
            from_passage,
            from_suffix,
            trail[jnp.clip(s - t_start, 0, len(trail) - 1)],
        ],
        corpus.pad_id,
    ).astype(jnp.int32)
    cut = passage_lengths + suffix_lengths[:, None] + n_special > S  # (B, K)
    return ids, s < end, jnp.sum(cut, axis=-1, dtype=jnp.int32)


def _doc_tokens(corpus: DeviceCorpus, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BERT_d's inputs for passages ``ids`` (B, K): ``(token ids, mask)``, each (B, K, Ld)."""
    Ld = corpus.doc_token_ids.shape[-1]
    lengths = jnp.take(corpus.doc_token_lengths, ids, axis=0)  # (B, K)
    return jnp.take(corpus.doc_token_ids, ids, axis=0), jnp.arange(Ld) < lengths[..., None]


def rescore(
    doc_encoder, corpus: DeviceCorpus, query_emb: jax.Array, candidates, n_docs: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``n_docs`` (K) of the L candidates with the highest ``q(x)·d(z)``, ``d(z)`` by
    ``doc_encoder`` (the current BERT_d) from the passages' tokens: Atlas's re-ranking of an
    over-retrieved, stale index between refreshes. Selection only: no gradient flows here.

    Args:
      doc_encoder: a BERT encoder with ``embed(ids (M, Ld), mask (M, Ld)) -> (M, H)``.
      corpus: carries the BERT_d tokens (``doc_token_ids``).
      query_emb: (B, H) q(x).
      candidates: the index's top L (:class:`~rag_jax.index.SearchResult`: ids, scores,
        doc_vectors, each (B, L, ...)); slots it could not fill (score -inf) stay last.

    Returns:
      ``(ids (B, K), scores (B, K), doc_vectors (B, K, H))`` of the kept candidates, the
      scores and vectors the index's (as a search would give them).
    """
    B, L = candidates.ids.shape
    token_ids, mask = _doc_tokens(corpus, candidates.ids)  # (B, L, Ld)
    fresh = doc_encoder.embed(
        token_ids.reshape(B * L, -1), mask.reshape(B * L, -1).astype(jnp.int32)
    ).reshape(B, L, -1)  # (B, L, H)
    scores = jnp.einsum("bh,blh->bl", query_emb, fresh.astype(query_emb.dtype))
    scores = jax.lax.stop_gradient(jnp.where(candidates.scores == -jnp.inf, -jnp.inf, scores))
    _, best = jax.lax.top_k(scores, n_docs)  # (B, K)

    def keep(x):
        return jnp.take_along_axis(x, best.reshape(best.shape + (1,) * (x.ndim - 2)), axis=1)

    return keep(candidates.ids), keep(candidates.scores), keep(candidates.doc_vectors)


def retrieve(
    query_encoder,
    corpus: DeviceCorpus,
    questions: QuestionBatch,
    config: RagConfig,
    doc_encoder=None,
) -> tuple[RagBatch, jax.Array, jax.Array]:
    """Device retrieval, traceable inside ``jit``: ``q(x)`` with ``query_encoder`` (no
    gradient), the top K of ``corpus`` (with ``corpus.rescore_candidates``: the best K of its
    top L by ``doc_encoder``, :func:`rescore`), their vectors and tokens, the generator inputs.

    Returns:
      ``(batch, doc_ids (B, K) int32, n_cut (B,) int32)``: the :class:`RagBatch` the host path
      builds for the same questions, the passages' ids and the inputs cut per question.
    """
    query_emb = query_encoder.embed(questions.question_ids, questions.question_mask)  # (B, H)
    query_emb = jax.lax.stop_gradient(query_emb)
    n_searched = max(config.n_docs, corpus.rescore_candidates)
    result = exact_search(corpus.index, query_emb, n_searched)
    ids, scores, doc_vectors = result.ids, result.scores, result.doc_vectors
    if corpus.rescore_candidates:
        ids, scores, doc_vectors = rescore(doc_encoder, corpus, query_emb, result, config.n_docs)
    context_ids, context_mask, n_cut = assemble_contexts(
        jnp.take(corpus.passage_ids, ids, axis=0),  # (B, K, P)
        jnp.take(corpus.passage_lengths, ids, axis=0),  # (B, K)
        questions.suffix_ids,
        questions.suffix_lengths,
        corpus,
        config.max_context_length,
    )
    doc_tokens = {}
    if corpus.doc_token_ids is not None:  # BERT_d trains: its inputs for the K passages
        token_ids, mask = _doc_tokens(corpus, ids)
        doc_tokens = dict(doc_token_ids=token_ids, doc_token_mask=mask)  # (B, K, Ld) each
    batch = RagBatch(
        question_ids=questions.question_ids,
        question_mask=questions.question_mask,
        doc_vectors=doc_vectors,  # (B, K, H) float32
        # Exact search fills all K slots when K <= N; a NaN score (a non-finite q(x)) is kept, so
        # that the loss is NaN and the step is skipped, not counted as a question without docs.
        doc_mask=scores != -jnp.inf,
        context_ids=context_ids,
        context_mask=context_mask,
        decoder_input_ids=questions.decoder_input_ids,
        targets=questions.targets,
        target_mask=questions.target_mask,
        **doc_tokens,
    )
    return batch, ids, n_cut


def corpus_from_knowledge(knowledge, builder, probe_question: str) -> DeviceCorpus:
    """The index's vectors (already on the mesh) and its passages' tokens, for retrieval
    inside the train step.

    Raises:
      ValueError: naming ``data.retrieval``, for an index searched with ScaNN, or a generator
        tokenizer that would not give the host path's inputs.
    """
    if not isinstance(knowledge.index, ExactIndex):
        raise ValueError(
            f"config.data.retrieval='device' searches an exact index on the device, but "
            f"{knowledge.path} is opened with ScaNN: set config.data.index_backend='exact' (exact "
            f"search of its vectors) or config.data.retrieval='host'"
        )
    passages = knowledge.passages(np.arange(knowledge.manifest.count))
    return device_corpus(
        knowledge.index,
        passages,
        builder.generator_tokenizer,
        builder.config,
        builder.generator_config.vocab_size,
        probe_question=probe_question,
    )


class DeviceRetriever(Retriever):
    """Tokenizes questions and answers on the host; the step
    (``step_fn(model, optimizer, corpus, retrieval_state, questions)``) retrieves on the
    device, with the same one-step-stale query encoder as :class:`HostRetriever`."""

    def __init__(self, builder, corpus: DeviceCorpus, mesh, step_fn: Callable, prefetch: bool):
        super().__init__(builder, mesh, step_fn, prefetch)
        self.corpus = corpus
        # one passage, to check that questions tokenize apart from passages
        self.probe_passage = builder.knowledge.passages(0)

    def _dispatch(self, examples, state) -> tuple:
        return examples, state

    def _build(self, examples, state) -> Prepared:
        questions, n_truncated = question_batch(examples, self.builder, self.probe_passage)
        return Prepared(
            shard_batch(questions, self.mesh),
            None,
            n_truncated,
            int(questions.target_mask.sum()),
            retrieval_state=state,
        )

    def step(self, model, optimizer, prepared: Prepared) -> tuple[dict, np.ndarray, dict]:
        metrics = self.step_fn(
            model, optimizer, self.corpus, prepared.retrieval_state, prepared.inputs
        )
        metrics = jax.block_until_ready(metrics)
        doc_ids = local_rows(metrics.pop("doc_ids"))
        n_cut = int(local_rows(metrics.pop("n_cut")).sum())
        return metrics, doc_ids, {**prepared.n_truncated, "context": n_cut}
