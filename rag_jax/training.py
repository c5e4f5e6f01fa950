"""The training loop: RAG's query encoder and generator learned jointly from QA pairs.

``train.py`` is a thin wrapper around :func:`train`. One jitted train step
(``nnx.value_and_grad`` -> optax update -> metrics) over a ``(data, fsdp)`` mesh, with
retrieval on the host before the step or inside it on the device (:func:`make_retriever`
chooses); the question is embedded with the query encoder of one step before (no gradient);
the document encoder and the index are never touched. Parameters are created or loaded
directly into their shardings on the mesh. orbax saves the model, the optimizer, the step and
the data position, so a run resumes where it stopped (:mod:`rag_jax.checkpoints`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import signal
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from rag_jax import builders, checkpoints, device_retrieval, doc_encoder, optim, sharding
from rag_jax.data import DataPosition, QAExample, read_qa
from rag_jax.host_retrieval import BatchBuilder, HostRetriever, Retriever
from rag_jax.marginalize import has_documents
from rag_jax.metric_writer import MetricsWriter, watch_collapse
from rag_jax.models import partitioning
from rag_jax.rag import RagBatch, RagModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# The loss and the train steps
# --------------------------------------------------------------------------------------


def doc_entropy(doc_scores: jax.Array) -> jax.Array:
    """Entropy (nats) of ``p(z|x)`` over the K documents, per question: ``[B, K] -> [B]``.

    Falling towards 0 over training is retrieval collapse: every question trusts one document.
    """
    log_p = jax.nn.log_softmax(doc_scores, axis=-1)
    p = jnp.exp(log_p)
    return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def loss_fn(model: RagModel, batch: RagBatch):
    """Mean ``-log p(y|x)`` over the questions that have documents and targets."""
    nll, doc_scores = model(batch)  # (B,), (B, K)
    counted = has_documents(doc_scores) & jnp.any(batch.target_mask, axis=-1)  # (B,)
    n_counted = jnp.maximum(jnp.sum(counted), 1)
    loss = jnp.sum(nll) / n_counted
    return loss, (nll, doc_scores, counted)


def _step(model: RagModel, optimizer: nnx.Optimizer, batch: RagBatch, objective=loss_fn) -> dict:
    """One optimizer step; returns the step's measurements (device scalars), with
    ``finite_loss`` and ``finite_grad_<part>`` (the query encoder's and the generator's) that
    say what, if anything, was non-finite. A non-finite loss makes every gradient NaN, so that
    the optimizer skips the update (:func:`rag_jax.optim.skip_nonfinite`) even where the
    gradients stayed finite."""
    # Only what the optimizer trains is differentiated (frozen parameters get no gradient).
    grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
    (loss, (nll, doc_scores, counted)), grads = grad_fn(model, batch)
    finite_grads = {
        f"finite_grad_{part}": jnp.isfinite(optax.tree.norm(grads[part]))
        for part in ("query_encoder", "generator")
        if part in grads
    }
    grad_norm = optax.tree.norm(grads)
    finite_loss = jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(finite_loss, g, jnp.nan), grads)
    optimizer.update(model, grads)
    n_tokens = jnp.sum(batch.target_mask * counted[:, None])
    return {
        "loss": loss,  # per sequence: mean over questions of -log p(y|x)
        "loss_per_token": jnp.sum(nll) / jnp.maximum(n_tokens, 1),
        "grad_norm": grad_norm,
        "doc_entropy": jnp.sum(jnp.where(counted, doc_entropy(doc_scores), 0.0))
        / jnp.maximum(jnp.sum(counted), 1),
        "questions_without_docs": jnp.sum(~has_documents(doc_scores)),
        "top_doc_prob": jnp.mean(jnp.max(jax.nn.softmax(doc_scores, axis=-1), axis=-1)),
        "finite_loss": finite_loss,
        **finite_grads,
    }


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: RagModel, optimizer: nnx.Optimizer, batch: RagBatch) -> dict:
    """One optimizer step on a batch retrieved on the host; the step's measurements."""
    return _step(model, optimizer, batch)


def _device_step(
    model: RagModel,
    optimizer: nnx.Optimizer,
    corpus: device_retrieval.DeviceCorpus,
    retrieval_state: nnx.State,
    questions: device_retrieval.QuestionBatch,
    objective=loss_fn,
) -> dict:
    """:func:`device_train_step`, unjitted (``objective``: the loss differentiated)."""
    query_encoder = nnx.merge(nnx.graphdef(model.query_encoder), retrieval_state)
    query_encoder.eval()  # retrieval without dropout, as on the host
    doc_encoder = None
    if corpus.rescore_candidates:  # the current BERT_d re-ranks the candidates, no dropout
        doc_encoder = nnx.merge(*nnx.split(model.doc_encoder))
        doc_encoder.eval()
    batch, doc_ids, n_cut = device_retrieval.retrieve(
        query_encoder, corpus, questions, model.config, doc_encoder
    )
    # Split the batch over the mesh as the host path's batch is: the same partitioned step
    # (and each device computes its own rows, not all of them).
    by_row = PartitionSpec(partitioning.MESH_AXES)
    batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_row), batch)
    return _step(model, optimizer, batch, objective) | {
        "doc_ids": jax.lax.with_sharding_constraint(doc_ids, by_row),
        "n_cut": jax.lax.with_sharding_constraint(n_cut, by_row),
    }


@nnx.jit(donate_argnums=(0, 1))
def device_train_step(
    model: RagModel,
    optimizer: nnx.Optimizer,
    corpus: device_retrieval.DeviceCorpus,
    retrieval_state: nnx.State,
    questions: device_retrieval.QuestionBatch,
) -> dict:
    """Retrieval on the device, then the same step as :func:`train_step`.

    ``retrieval_state`` is the query encoder the documents are retrieved with: one step
    stale, as on the host (see :class:`rag_jax.host_retrieval.Retriever`). The measurements
    add the retrieved ``doc_ids`` (B, K) and ``n_cut`` (B,), the generator inputs cut, split
    like the batch.
    """
    return _device_step(model, optimizer, corpus, retrieval_state, questions)


class NonFiniteError(RuntimeError):
    """The run stopped: ``optimizer.max_consecutive_nonfinite`` updates in a row were
    non-finite (none of them applied, nothing saved after the last finite one)."""


def _nonfinite_parts(metrics: dict) -> list[str]:
    """Pops the step's ``finite_*`` flags; the quantities that were not finite: the loss
    (whose gradients then are too), else the gradient norm of each part that was not."""
    flags = jax.device_get({k: metrics.pop(k) for k in list(metrics) if k.startswith("finite_")})
    if not flags.get("finite_loss", True):
        return ["loss"]
    return [
        f"gradient norm of the {part.replace('_', ' ')}"
        for part in ("query_encoder", "generator")
        if not flags.get(f"finite_grad_{part}", True)
    ]


class StoppedError(Exception):
    """A run stopped by SIGINT or SIGTERM after saving the current step: ``signal_name``,
    ``step`` (saved) and ``workdir`` (where the same command resumes)."""

    def __init__(self, signal_name: str, step: int, workdir: Path):
        self.signal_name, self.step, self.workdir = signal_name, step, workdir
        super().__init__(
            f"stopped by {signal_name} after saving step {step} in {workdir / 'checkpoints'}; "
            f"run the same command to resume from it"
        )


class Preempted:
    """Set by SIGTERM or SIGINT (Ctrl-C): the loop saves the current step and stops. A second
    SIGINT stops at once, as Python's default does (KeyboardInterrupt), without a save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = ""

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s: saving at the end of this step, then stopping", self.signal_name)

    def __bool__(self) -> bool:
        return bool(self.signal_name)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def make_retriever(
    config: ml_collections.ConfigDict,
    model: RagModel,
    tokenizers: tuple,
    examples: list[QAExample],
    mesh,
) -> Retriever:
    """The run's retrieval, host or device (``config.data.retrieval``; read here only), each
    with its train step. Opens the index (checked against the query encoder) unless the model
    is closed-book."""
    question_tokenizer, generator_tokenizer = tokenizers
    on_device = builders.retrieval_mode(config, model) == "device"
    knowledge = builders.open_knowledge(config, model, mesh=mesh if on_device else None)
    builder = BatchBuilder(
        model.config,
        question_tokenizer,
        generator_tokenizer,
        model.generator.config,
        knowledge=knowledge,
        question_vocab_size=model.query_encoder.bert.config.vocab_size,
    )
    prefetch = config.data.prefetch
    if doc_encoder.enabled(config):  # BERT_d trains: device retrieval with its tokens, refreshes
        return doc_encoder.make_retriever(config, model, builder, examples, mesh, device_train_step)
    if not on_device:
        return HostRetriever(builder, model, mesh, train_step, prefetch)
    corpus = device_retrieval.corpus_from_knowledge(knowledge, builder, examples[0].question)
    return device_retrieval.DeviceRetriever(builder, corpus, mesh, device_train_step, prefetch)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as ``config`` says, checkpointing to ``workdir``; returns the last metrics."""
    workdir = Path(workdir)
    # Every check, down to the first batch's, before anything is written: a start refused
    # leaves the workdir as it was, and the corrected command is not refused for it.
    checkpoints.check_settings(config)
    builders.check_paths(config)
    if config.optimizer.max_consecutive_nonfinite < 1:
        raise ValueError(
            "config.optimizer.max_consecutive_nonfinite must be >= 1, got "
            f"{config.optimizer.max_consecutive_nonfinite}"
        )
    checkpoints.check_workdir(workdir, config, lock=jax.process_index() == 0)
    examples, n_bad = read_qa(config.data.train, skip_bad=config.data.skip_bad_lines)
    if n_bad:
        log.warning("skipped %d bad lines of %s", n_bad, config.data.train)
    mesh = sharding.make_mesh(config)
    model, *tokenizers = builders.build_model(config, mesh)
    retriever = make_retriever(config, model, tokenizers, examples, mesh)
    # Dropout on in the train step (off until now: the host retriever embeds questions with the
    # query encoder's graph as it was, in evaluation mode; the device step switches it off).
    model.train()
    tx, schedule = optim.make_optimizer(config)
    optimizer = sharding.place_on_mesh(model, tx, mesh, config, optim.trainable(config))
    process_0 = jax.process_index() == 0  # the one that writes the record and takes the lock

    with retriever, _workdir_lock(workdir, process_0), contextlib.ExitStack() as stack:
        step, position, snapshot, damaged = checkpoints.resume(
            workdir, config, model, optimizer, retriever.snapshot(model)
        )
        if step:
            log.info(
                "resumed from step %d (epoch %d, example %d)", step, position.epoch, position.index
            )
        # The first batch: retrieved with the snapshot a resumed run restored, else with
        # the initial query encoder; each next one while the step before it runs.
        pending = _submit(retriever, examples, position, snapshot, config)
        pending[0].result()  # its errors (e.g. a target length too short) before any write
        if process_0:
            checkpoints.record_config(workdir, config)
            checkpoints.set_aside(damaged)
        manager = stack.enter_context(checkpoints.manager(workdir, config))
        monitor = _Monitor(config, model, optimizer, schedule, retriever.n_passages)
        monitor.restore(position.running)
        with (
            MetricsWriter(workdir, process_0, resumed_from=step) as writer,
            _progress_bar(config, step) as bar,
            Preempted() as preempted,
            jax.set_mesh(mesh),
        ):
            n_micro = config.optimizer.grad_accum_steps  # micro-batches per update
            while step < config.train_steps:  # steps: optimizer updates
                t0 = time.perf_counter()
                micro, timing, n_target_tokens = [], collections.Counter(), 0
                nonfinite: list[str] = []
                for i in range(n_micro):
                    t_wait = time.perf_counter()
                    (prepared, host_seconds), position = pending[0].result(), pending[1]
                    timing["host_wait_seconds"] += time.perf_counter() - t_wait  # loop waited
                    timing["host_seconds"] += host_seconds  # retrieval + tokenization
                    if i == 0:  # between two updates: e.g. an index refresh
                        retriever.before_step(model, step, snapshot)
                    # q before this micro-batch (unchanged inside an update): the next one's
                    snapshot = retriever.snapshot(model)
                    if step + 1 < config.train_steps or i + 1 < n_micro:
                        pending = _submit(retriever, examples, position, snapshot, config)
                    t1 = time.perf_counter()
                    metrics, doc_ids, n_truncated = retriever.step(model, optimizer, prepared)
                    timing["device_seconds"] += time.perf_counter() - t1  # dispatch to result
                    parts = _nonfinite_parts(metrics)
                    if prepared.nonfinite_queries:
                        parts.append("query vectors of the retrieval")
                    nonfinite += [p for p in parts if p not in nonfinite]
                    micro.append(metrics)
                    n_target_tokens += prepared.n_target_tokens
                    monitor.add(doc_ids, n_truncated)
                step += 1
                _check_finite(step, nonfinite, optimizer, config, manager)
                if step % config.log_every == 0 or step == config.train_steps:
                    measured = monitor.measure(step, micro, n_target_tokens, dict(timing), t0)
                    writer.write(step, measured)
                    bar.set_postfix(
                        loss=f"{monitor.last['loss']:.3f}", H=f"{monitor.last['doc_entropy']:.2f}"
                    )
                bar.update(1)
                if step % config.checkpoint.every == 0 or step == config.train_steps or preempted:
                    saved = dataclasses.replace(position, running=monitor.state())
                    checkpoints.save(manager, step, model, optimizer, saved, snapshot)
                if preempted:
                    log.warning("%s: saved step %d and stopped", preempted.signal_name, step)
                    break
    if preempted:
        raise StoppedError(preempted.signal_name, step, workdir)
    return monitor.last


@contextlib.contextmanager
def _workdir_lock(workdir: Path, process_0: bool):
    """The workdir's lock (:func:`rag_jax.checkpoints.locked`), held by process 0 (the one
    that writes) while the run reads its checkpoints and writes; the workdir (and any missing
    parent) is created for it, and removed again if the run wrote nothing there."""
    if not process_0:
        yield
        return
    created = [p for p in (workdir, *workdir.parents) if not p.exists()]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with checkpoints.locked(workdir):
            yield
    finally:
        for directory in created:  # deepest first: a start refused leaves no directory
            if any(directory.iterdir()):
                break
            directory.rmdir()


def _check_finite(step: int, nonfinite: list[str], optimizer, config, manager) -> None:
    """Warns of a skipped (non-finite) update; raises :class:`NonFiniteError` at the
    ``optimizer.max_consecutive_nonfinite``-th in a row."""
    consecutive, _ = optim.nonfinite_updates(optimizer.opt_state)
    if not nonfinite and not consecutive:
        return
    what = ", ".join(nonfinite) or "gradient"
    limit = config.optimizer.max_consecutive_nonfinite
    if consecutive < limit:
        log.warning("step %d: non-finite %s; update skipped (%d in a row)", step, what, consecutive)
        return
    latest = manager.latest_step()
    saved = (
        f"the last checkpoint, step {latest} in {manager.directory}, is intact"
        if latest is not None
        else "no checkpoint was saved"
    )
    raise NonFiniteError(
        f"step {step}: non-finite {what}; {consecutive} updates in a row were non-finite "
        f"(optimizer.max_consecutive_nonfinite={limit}), none applied; stopped: {saved}"
    )


def _submit(retriever: Retriever, examples, position: DataPosition, snapshot, config):
    """``(pending batch, position after it)``: this process's share of the next global batch,
    submitted for retrieval with query-encoder ``snapshot``."""
    after = copy.copy(position)
    process = (jax.process_index(), jax.process_count())
    mine = after.next_batch(examples, config.batch_size // process[1], config.seed, process)
    return retriever.submit(mine, snapshot), after


def _progress_bar(config: ml_collections.ConfigDict, step: int):
    from tqdm.auto import tqdm

    disabled = not config.progress or jax.process_index() != 0
    return tqdm(total=config.train_steps, initial=step, desc="train", unit="step", disable=disabled)


class _Monitor:
    """What the loop measures between logged steps: documents retrieved (for the collapse
    watch) and inputs cut since the run started, and each logged step's figures."""

    def __init__(self, config, model: RagModel, optimizer: nnx.Optimizer, schedule, n_passages):
        self.config, self.model_config, self.n_passages = config, model.config, n_passages
        self.optimizer, self.schedule = optimizer, schedule
        self.window = collections.deque(maxlen=config.collapse.window)
        self.truncated: dict[str, int] = {}  # inputs cut (this process's), by part
        self.last: dict = {}

    def state(self) -> dict:
        """What :meth:`measure`'s figures depend on beyond the step (JSON-ready)."""
        return {"window": list(self.window), "truncated": dict(self.truncated)}

    def restore(self, state: dict) -> None:
        """The :meth:`state` a checkpoint saved (empty: a fresh start, or an older one)."""
        self.window.extend(state.get("window", ()))
        self.truncated.update(state.get("truncated", {}))

    def add(self, doc_ids, n_truncated: dict[str, int]) -> None:
        self.window.extend(doc_ids[doc_ids >= 0].tolist())
        for part, count in n_truncated.items():
            self.truncated[part] = self.truncated.get(part, 0) + count

    def measure(
        self, step: int, micro: list[dict], n_target_tokens: int, timing: dict, t0: float
    ) -> dict:
        """Update ``step``'s figures from its micro-batches' measurements: their mean (their
        sum for the question counts); the learning rate is the one the update applied."""
        micro = [{k: float(v) for k, v in jax.device_get(m).items()} for m in micro]
        metrics = {
            k: (sum if k.startswith("questions_") else statistics.fmean)(m[k] for m in micro)
            for k in micro[0]
        }
        seconds = time.perf_counter() - t0
        applied = optim.applied_updates(self.optimizer.opt_state)
        metrics.update(
            **timing,
            examples_per_second=self.config.batch_size * len(micro) / seconds,
            target_tokens_per_second=n_target_tokens * jax.process_count() / seconds,
            # the schedule's count before the last applied update (skipped ones do not count)
            learning_rate=float(self.schedule(max(applied - 1, 0))),
            skipped_updates=optim.skipped_updates(self.optimizer.opt_state),
            distinct_docs_in_window=len(set(self.window)),
            retrieved_in_window=len(self.window),
            **{f"truncated_{k}": v for k, v in self.truncated.items()},
        )
        watch_collapse(metrics, self.config, self.model_config, self.n_passages)
        self.last = metrics
        return metrics
