"""Retrieval on the host: questions -> a :class:`~rag_jax.rag.RagBatch` for the train step.

:class:`BatchBuilder` embeds the questions with the current query encoder (no gradient),
searches the :class:`rag_jax.index.KnowledgeSource`, fetches the passages and tokenizes the
generator inputs (:mod:`rag_jax.tokenization`). :class:`Retriever` is the interface the
training loop sees, with the host implementation here (:class:`HostRetriever`) and the device
one in :mod:`rag_jax.device_retrieval`: ``submit`` prepares a batch (in a background thread
with prefetch), ``step`` runs the train step on it.

Shapes: B batch, K documents per question, L question length, S context length, T target
length, H hidden size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax.data import QAExample
from rag_jax.models.inputs import check_token_ids
from rag_jax.rag import RagBatch, RagConfig, embed_questions
from rag_jax.sharding import local_rows, shard_batch
from rag_jax.tokenization import (
    Targets,
    pad,
    tokenize_contexts,
    tokenize_questions,
    tokenize_targets,
)


@dataclasses.dataclass
class HostBatch:
    """A RagBatch (numpy) plus what the loop reports and evaluation prints."""

    batch: RagBatch
    doc_ids: np.ndarray  # (B, K) int64 passage ids, -1 for padding
    titles: list[list[str]]
    n_truncated: dict[str, int]


class BatchBuilder:
    """Questions (and answers) -> a :class:`HostBatch`: embed, search, fetch, tokenize.

    Args:
      config: the RagConfig (K, lengths, separators).
      question_tokenizer, generator_tokenizer: Hugging Face tokenizers.
      generator_config: the generator's BartConfig (special token ids).
      knowledge: a :class:`rag_jax.index.KnowledgeSource` (unused for closed-book models).
      embed_fn: ``(question_ids (B, L), question_mask (B, L)) -> (B, H)`` numpy/jax vectors
        from the current query encoder, without gradient; not needed when every call passes
        its ``query_emb``.
      question_vocab_size: the query encoder's vocabulary size; None: question ids unchecked.

    Every batch's token ids are checked against the vocabularies (questions against
    ``question_vocab_size``, generator inputs and targets against the generator's) before any
    model sees them: inside ``jit`` an id >= V would read a NaN embedding.
    """

    def __init__(
        self,
        config: RagConfig,
        question_tokenizer,
        generator_tokenizer,
        generator_config,
        knowledge=None,
        embed_fn: Callable | None = None,
        question_vocab_size: int | None = None,
    ):
        if not config.closed_book and knowledge is None:
            raise ValueError("a retrieval model needs a knowledge source")
        if knowledge is not None and config.n_docs > knowledge.manifest.count:
            n_passages = knowledge.manifest.count
            raise ValueError(
                f"n_docs {config.n_docs} is larger than the index's {n_passages} passages"
            )
        self.config = config
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.generator_config = generator_config
        self.knowledge = knowledge
        self.embed_fn = embed_fn
        self.question_vocab_size = question_vocab_size

    def __call__(
        self,
        examples: Sequence[QAExample],
        *,
        query_emb: np.ndarray | None = None,
        with_targets: bool = True,
    ) -> HostBatch:
        """The batch of ``examples``; ``query_emb`` (B, H): their ``q(x)`` if already computed
        (else ``embed_fn`` computes it)."""
        config = self.config
        questions = [e.question for e in examples]
        q = tokenize_questions(self.question_tokenizer, questions, config.max_question_length)
        if self.question_vocab_size is not None:
            check_token_ids(q.ids, self.question_vocab_size, "question_ids (query tokenizer)")
        B, K = len(examples), config.n_docs
        if config.closed_book:
            K = 1
            contexts = pad(
                self.generator_tokenizer(
                    questions, truncation=True, max_length=config.max_context_length
                )["input_ids"],
                config.max_context_length,
                self.generator_tokenizer.pad_token_id,
                0,
            )
            doc_vectors = np.zeros((B, 1, 1), np.float32)
            doc_ids = np.full((B, 1), -1, np.int64)
            titles = [[""] for _ in examples]
        else:
            if query_emb is None:
                if self.embed_fn is None:
                    raise ValueError("BatchBuilder needs an embed_fn or the batch's query_emb")
                query_emb = self.embed_fn(q.ids, q.mask)
            query_emb = np.asarray(query_emb, np.float32)
            result, passages = self.knowledge.retrieve(query_emb, K)
            doc_ids = np.asarray(result.ids, np.int64)
            doc_vectors = np.asarray(result.doc_vectors, np.float32)
            titles = [[p.title if p else "" for p in row] for row in passages]
            texts = [[p.text if p else "" for p in row] for row in passages]
            contexts = tokenize_contexts(
                self.generator_tokenizer,
                [t for row in titles for t in row],
                [t for row in texts for t in row],
                [question for question in questions for _ in range(K)],
                config,
            )
        S = config.max_context_length
        check_token_ids(
            contexts.ids, self.generator_config.vocab_size, "context_ids (generator tokenizer)"
        )
        if with_targets:
            targets = tokenize_targets(
                self.generator_tokenizer,
                [e.answers[0] for e in examples],
                self.generator_config,
                config.max_target_length,
            )
        else:
            T = config.max_target_length
            zeros = np.zeros((B, T), np.int32)
            targets = Targets(zeros, zeros, np.zeros((B, T), bool), 0)
        batch = RagBatch(
            question_ids=q.ids,
            question_mask=q.mask,
            doc_vectors=doc_vectors,
            doc_mask=doc_ids >= 0,
            context_ids=contexts.ids.reshape(B, K, S),
            context_mask=contexts.mask.reshape(B, K, S),
            decoder_input_ids=targets.decoder_input_ids,
            targets=targets.targets,
            target_mask=targets.target_mask,
        )
        truncated = {
            "question": q.n_truncated,
            "context": contexts.n_truncated,
            "target": targets.n_truncated,
        }
        return HostBatch(batch, doc_ids, titles, truncated)


@dataclasses.dataclass
class Prepared:
    """A batch ready for the train step, and what the loop reports of it."""

    inputs: Any  # on the mesh: a RagBatch (host retrieval) or a QuestionBatch (device)
    doc_ids: np.ndarray | None  # (B, K) this process's retrieved ids; None: known after the step
    n_truncated: dict[str, int]  # inputs cut, by part (this process's)
    n_target_tokens: int  # this process's
    retrieval_state: nnx.State | None = None  # device retrieval: the query encoder to use
    nonfinite_queries: int = 0  # host retrieval: rows whose q(x) held NaN or inf


class Retriever:
    """What the training loop sees of retrieval: questions -> a prepared batch -> a step.

    Retrieval for step n + 1 uses the query encoder from *before* step n, in every run: the
    batch can then be built (embedding, search, tokenization) in a background thread while
    step n runs on the device (``config.data.prefetch``), and a run with prefetch gives
    exactly the losses of one without. Retrieval is one optimizer step stale, never more; the
    snapshot is saved with each checkpoint, so a resumed run retrieves as an uninterrupted one.

    Subclasses implement ``_dispatch`` (main thread: starts device work, returns the
    arguments of ``_build``), ``_build`` (may run in the background) and ``step``.
    """

    def __init__(self, builder: BatchBuilder, mesh, step_fn: Callable, prefetch: bool):
        self.builder, self.mesh, self.step_fn = builder, mesh, step_fn
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        knowledge = builder.knowledge
        self.n_passages = None if knowledge is None else knowledge.manifest.count  # N

    @staticmethod
    def snapshot(model) -> nnx.State:
        """A copy of the query encoder's state (the train step donates the original)."""
        return jax.tree.map(jnp.copy, nnx.state(model.query_encoder))

    def before_step(self, model, step: int, snapshot) -> None:
        """Called between steps, after ``step`` steps, with the snapshot the next batch was
        retrieved with (a resumed run's, the first time): nothing here; a retriever whose
        index changes in training swaps it here (:mod:`rag_jax.doc_encoder`)."""

    def submit(self, examples: Sequence[QAExample], state: nnx.State) -> Future:
        """The batch of ``examples`` retrieved with query-encoder ``state``; ``.result()`` is
        ``(prepared, host_seconds)``."""
        args = self._dispatch(examples, state)
        if self.pool is not None:
            return self.pool.submit(self._timed_build, *args)
        future = Future()
        future.set_result(self._timed_build(*args))
        return future

    def _timed_build(self, *args) -> tuple[Prepared, float]:
        start = time.perf_counter()
        prepared = self._build(*args)
        return prepared, time.perf_counter() - start

    def _dispatch(self, examples, state) -> tuple:
        raise NotImplementedError

    def _build(self, *args) -> Prepared:
        raise NotImplementedError

    def step(self, model, optimizer, prepared: Prepared) -> tuple[dict, np.ndarray, dict]:
        """Runs the train step on ``prepared`` and waits for it; returns the measurements
        (device scalars), this process's retrieved ids (B, K) and its inputs cut, by part."""
        raise NotImplementedError

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostRetriever(Retriever):
    """Embeds the questions on the mesh, searches the index and tokenizes on the host; the
    step (``step_fn(model, optimizer, batch)``) gets a whole :class:`RagBatch`."""

    def __init__(self, builder: BatchBuilder, model, mesh, step_fn: Callable, prefetch: bool):
        super().__init__(builder, mesh, step_fn, prefetch)
        self.graphdef = nnx.graphdef(model.query_encoder)

    def _dispatch(self, examples, state) -> tuple:
        """Starts ``q(x)`` for ``examples`` on the mesh, from the calling (main) thread: every
        process then queues its device work in the same order (this embedding, then the step),
        which collectives over FSDP-sharded parameters need."""
        builder = self.builder
        if builder.config.closed_book:
            return examples, None
        questions = [e.question for e in examples]
        q = tokenize_questions(
            builder.question_tokenizer, questions, builder.config.max_question_length
        )
        if builder.question_vocab_size is not None:  # before the query encoder sees them
            check_token_ids(q.ids, builder.question_vocab_size, "question_ids (query tokenizer)")
        ids, mask = shard_batch((q.ids, q.mask), self.mesh)
        with jax.set_mesh(self.mesh):
            return examples, embed_questions(self.graphdef, state, ids, mask)  # asynchronous

    def _build(self, examples, query_emb) -> Prepared:
        bad = np.zeros(len(examples), bool)
        if query_emb is not None:
            query_emb = np.asarray(local_rows(query_emb), np.float32)  # this process's, (B, H)
            # A non-finite q(x) makes a non-finite step, as on the device path: the search
            # gets zeros (any documents), the step NaN document vectors, hence a NaN loss, an
            # update skipped and counted (training._check_finite names the query vectors).
            bad = ~np.isfinite(query_emb).all(axis=1)
            query_emb = np.where(bad[:, None], 0.0, query_emb)
        host = self.builder(examples, query_emb=query_emb)
        batch = host.batch
        if bad.any():
            doc_vectors = batch.doc_vectors.copy()
            doc_vectors[bad] = np.nan
            batch = dataclasses.replace(batch, doc_vectors=doc_vectors)
        return Prepared(
            shard_batch(batch, self.mesh),
            host.doc_ids,
            host.n_truncated,
            int(batch.target_mask.sum()),
            nonfinite_queries=int(bad.sum()),
        )

    def step(self, model, optimizer, prepared: Prepared) -> tuple[dict, np.ndarray, dict]:
        metrics = jax.block_until_ready(self.step_fn(model, optimizer, prepared.inputs))
        return metrics, prepared.doc_ids, prepared.n_truncated
