"""The training loop: RAG's query encoder and generator learned jointly from QA pairs.

``train.py`` is a thin wrapper around :func:`train`. One jitted train step
(``nnx.value_and_grad`` -> optax update -> metrics) over a ``(data, fsdp)`` mesh; retrieval on
the host before each step (the question embedded with the current query encoder, no
gradient); the document encoder and the index are never touched. Parameters are created or
loaded directly into their shardings on the mesh. orbax saves the model, the optimizer, the
step and the data position, so a run resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rag_jax import device_retrieval
from rag_jax.data import BatchBuilder, QAExample, read_qa, tokenize_questions
from rag_jax.index import ExactIndex, IndexMismatchError, KnowledgeSource
from rag_jax.index.manifest import MANIFEST_FILE
from rag_jax.marginalize import has_documents
from rag_jax.models import (
    Bart,
    BartConfig,
    bart_from_bert,
    load_bart,
    load_bert_encoder,
    load_bert_tokenizer,
    partitioning,
)
from rag_jax.models.inputs import check_token_ids, check_tokenizer_vocab, tokenizer_sha256
from rag_jax.rag import RagBatch, RagConfig, RagModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Building the model, the optimizer and the pipeline from a config
# --------------------------------------------------------------------------------------


def rag_config(config: ml_collections.ConfigDict) -> RagConfig:
    return RagConfig(**config.rag.to_dict())


def param_rules(config: ml_collections.ConfigDict) -> partitioning.Rules:
    """Logical axes -> mesh axes for the parameters: FSDP-sharded if ``mesh.fsdp_params``,
    else whole on every device."""
    rules = partitioning.LOGICAL_RULES
    return rules if config.mesh.fsdp_params else partitioning.replicated_rules(rules)


def _generator_tokenizer_dir(model_config: ml_collections.ConfigDict) -> str:
    return (
        model_config.generator_tokenizer or model_config.generator or model_config.question_encoder
    )


def build_model(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> tuple[RagModel, Any, Any]:
    """``(model, question_tokenizer, generator_tokenizer)`` from ``config.model``.

    The query encoder loads from ``model.question_encoder``; the generator either loads from
    ``model.generator`` or, when that is empty, is initialised from ``model.generator_init``
    (a BartConfig's fields) on the generator tokenizer's vocabulary and special tokens:
    randomly, or from the BERT in ``model.generator_warm_start`` (``models.bart_from_bert``).

    With a ``mesh``, every parameter is loaded or initialised directly into its shards
    (:func:`param_rules`): the modules are built abstractly first, so no parameter is ever
    whole on one device or, with several processes, on one host. None: the default device.
    """
    model_config = config.model
    dtype = jnp.bfloat16 if model_config.bf16 else jnp.float32
    rules = param_rules(config)
    query_encoder = load_bert_encoder(
        model_config.question_encoder,
        dtype=dtype,
        remat=model_config.remat,
        mesh=mesh,
        rules=rules,
    )
    question_tokenizer = load_bert_tokenizer(model_config.question_encoder)
    generator_tokenizer_dir = _generator_tokenizer_dir(model_config)
    generator_tokenizer = load_bert_tokenizer(generator_tokenizer_dir)
    if model_config.generator:
        generator = load_bart(
            model_config.generator, dtype=dtype, remat=model_config.remat, mesh=mesh, rules=rules
        )
    else:
        tok = generator_tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        bart_config = BartConfig(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=bos,
            eos_token_id=eos,
            decoder_start_token_id=bos,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            **model_config.generator_init.to_dict(),
        )
        if model_config.generator_warm_start:
            # The BERT is only the source of the copies: each process loads its own.
            bert = load_bert_encoder(model_config.generator_warm_start).bert
            generator = bart_from_bert(
                bert,
                bart_config,
                dtype=dtype,
                remat=model_config.remat,
                rngs=nnx.Rngs(config.seed),
                mesh=mesh,
                rules=rules,
            )
        else:

            def make() -> Bart:
                rngs = nnx.Rngs(config.seed)
                return Bart(bart_config, dtype=dtype, remat=model_config.remat, rngs=rngs)

            generator = make() if mesh is None else partitioning.create_sharded(make, mesh, rules)
    # Ids >= vocab_size would read NaN embeddings: refuse such a tokenizer here.
    check_tokenizer_vocab(
        question_tokenizer,
        query_encoder.bert.config.vocab_size,
        f"query encoder {model_config.question_encoder}",
    )
    check_tokenizer_vocab(
        generator_tokenizer,
        generator.config.vocab_size,
        f"generator tokenizer {generator_tokenizer_dir}",
    )
    return (
        RagModel(query_encoder, generator, rag_config(config)),
        question_tokenizer,
        generator_tokenizer,
    )


def parameter_path(path) -> str:
    """A parameter's pytree path as "/"-joined keys, e.g. "generator/shared/embedding"."""
    path_string = jax.tree_util.keystr(path, simple=True, separator="/")
    return path_string.removesuffix("/value")  # the nnx.Variable's own field, not its name


def _module_labels(params, freeze: re.Pattern | None = None):
    """Labels each parameter "query_encoder" or "generator" by its top-level module, or
    "frozen" where its :func:`parameter_path` matches the compiled expression ``freeze``."""

    def label(path, _):
        if freeze is not None and freeze.search(parameter_path(path)):
            return "frozen"
        return "query_encoder" if getattr(path[0], "key", None) == "query_encoder" else "generator"

    return jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass(frozen=True)
class _PathMatches:
    """An NNX filter: the variables whose :func:`parameter_path` ``pattern`` finds."""

    pattern: re.Pattern

    def __call__(self, path, value) -> bool:
        return self.pattern.search("/".join(map(str, path))) is not None


def _freeze_pattern(freeze: str) -> re.Pattern | None:
    """``optimizer.freeze`` compiled (None when empty)."""
    try:
        return re.compile(freeze) if freeze else None
    except re.error as error:
        message = f"optimizer.freeze={freeze!r} is not a regular expression: {error}"
        raise ValueError(message) from None


def trainable(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
    """The parameters training changes: every ``nnx.Param`` but those whose path matches
    ``config.optimizer.freeze``, and but the query encoder of a closed-book model (which never
    reads it). The train step differentiates only these and the optimizer keeps moments only
    for them, so a frozen embedding table costs no weight gradient and no Adam state.

    Raises:
      ValueError: ``optimizer.freeze`` is not a regular expression.
    """
    patterns = [_freeze_pattern(config.optimizer.get("freeze", ""))]
    if config.rag.marginalization == "closed_book":
        patterns.append(re.compile("^query_encoder/"))
    frozen = [_PathMatches(pattern) for pattern in patterns if pattern is not None]
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen))) if frozen else nnx.Param


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: AdamW with linear warmup and linear decay, global-norm clipping,
    optional gradient accumulation, and non-finite updates skipped (and counted in the
    optimizer state). Parameters whose path matches ``config.optimizer.freeze`` (a regular
    expression, e.g. ``"^generator/shared/"``) never change: their gradients are dropped
    before clipping and their updates (weight decay included) are zero. Train with
    ``nnx.Optimizer(model, tx, wrt=trainable(config))``: they then have no moments either.

    Equal settings give the same objects: ``nnx.Optimizer`` keeps ``tx`` in its graph
    definition, the train step's cache key, so a new (equal but not identical) chain would make
    every :func:`train` in a process compile the step again (a resume, a test's second run).
    """
    settings = json.dumps(config.optimizer.to_dict(), sort_keys=True)
    return _make_optimizer(settings, config.train_steps)


@functools.lru_cache(maxsize=16)
def _make_optimizer(settings: str, train_steps: int):
    opt = ml_collections.ConfigDict(json.loads(settings))
    pattern = _freeze_pattern(opt.get("freeze", ""))
    labels = functools.partial(_module_labels, freeze=pattern)
    total_steps = opt.decay_steps or train_steps
    schedule = (
        optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt.learning_rate,
            warmup_steps=opt.warmup_steps,
            decay_steps=max(total_steps, opt.warmup_steps + 1),
            end_value=opt.learning_rate * opt.end_lr_factor,
        )
        if opt.schedule == "cosine"
        else optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1)),
                optax.linear_schedule(
                    opt.learning_rate,
                    opt.learning_rate * opt.end_lr_factor,
                    max(total_steps - opt.warmup_steps, 1),
                ),
            ],
            [max(opt.warmup_steps, 1)],
        )
    )
    drop_frozen = optax.multi_transform(
        {"frozen": optax.set_to_zero(), "query_encoder": optax.identity(),
         "generator": optax.identity()},
        labels,
    )  # fmt: skip
    tx = optax.chain(
        drop_frozen,  # frozen parameters' gradients count in no norm and no moment
        optax.clip_by_global_norm(opt.max_grad_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
        # Each module its own fraction of the schedule: a pretrained query encoder may want a
        # smaller step than a generator trained afresh, or a generator that already reads well
        # a smaller step than the retriever (0 freezes a module).
        optax.multi_transform(
            {
                "query_encoder": optax.scale(opt.get("query_encoder_lr_factor", 1.0)),
                "generator": optax.scale(opt.get("generator_lr_factor", 1.0)),
                "frozen": optax.set_to_zero(),  # AdamW's weight decay would move them
            },
            labels,
        ),
    )
    tx = optax.apply_if_finite(tx, max_consecutive_errors=opt.max_consecutive_nonfinite)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx, schedule


# --------------------------------------------------------------------------------------
# The train step
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


def _step(model: RagModel, optimizer: nnx.Optimizer, batch: RagBatch) -> dict:
    """One optimizer step; returns the step's measurements (device scalars)."""
    # Only what the optimizer trains is differentiated (frozen parameters get no gradient).
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
    (loss, (nll, doc_scores, counted)), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    n_tokens = jnp.sum(batch.target_mask * counted[:, None])
    return {
        "loss": loss,  # per sequence: mean over questions of -log p(y|x)
        "loss_per_token": jnp.sum(nll) / jnp.maximum(n_tokens, 1),
        "grad_norm": optax.tree.norm(grads),
        "doc_entropy": jnp.sum(jnp.where(counted, doc_entropy(doc_scores), 0.0))
        / jnp.maximum(jnp.sum(counted), 1),
        "questions_without_docs": jnp.sum(~has_documents(doc_scores)),
        "top_doc_prob": jnp.mean(jnp.max(jax.nn.softmax(doc_scores, axis=-1), axis=-1)),
    }


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: RagModel, optimizer: nnx.Optimizer, batch: RagBatch) -> dict:
    """One optimizer step on a batch retrieved on the host; the step's measurements."""
    return _step(model, optimizer, batch)


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
    stale, as on the host (see :class:`_Retrieval`). The measurements add the retrieved
    ``doc_ids`` (B, K) and ``n_cut`` (B,), the generator inputs cut, split like the batch.
    """
    query_encoder = nnx.merge(nnx.graphdef(model.query_encoder), retrieval_state)
    batch, doc_ids, n_cut = device_retrieval.retrieve(
        query_encoder, corpus, questions, model.config
    )
    # Split the batch over the mesh as the host path's batch is: the same partitioned step
    # (and each device computes its own rows, not all of them).
    by_row = PartitionSpec(partitioning.MESH_AXES)
    batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_row), batch)
    return _step(model, optimizer, batch) | {
        "doc_ids": jax.lax.with_sharding_constraint(doc_ids, by_row),
        "n_cut": jax.lax.with_sharding_constraint(n_cut, by_row),
    }


@nnx.jit
def embed_questions(model: RagModel, question_ids, question_mask):
    return model.embed_questions(question_ids, question_mask)


@functools.partial(jax.jit, static_argnums=0)
def _embed_on_mesh(graphdef, state, question_ids, question_mask):
    """``q(x)`` (B, H) from a query encoder's (graphdef, state), split over the mesh's batch
    axis like the input."""
    query_emb = nnx.merge(graphdef, state).embed(question_ids, question_mask)  # (B, H)
    return jax.lax.with_sharding_constraint(query_emb, PartitionSpec(partitioning.MESH_AXES))


def _skipped_updates(opt_state) -> int:
    """Total non-finite updates that optax.apply_if_finite skipped."""
    for leaf in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)
    ):
        if isinstance(leaf, optax.ApplyIfFiniteState):
            return int(leaf.total_notfinite)
    return 0


# --------------------------------------------------------------------------------------
# Data order, checkpoints, metrics
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataPosition:
    """Where the loop is in the data: a deterministic permutation per epoch, by seed."""

    epoch: int = 0
    index: int = 0

    def next_batch(
        self, examples: list[QAExample], batch_size: int, seed: int, process: tuple[int, int]
    ):
        """The next ``batch_size`` examples for this process (its slice of the global batch)."""
        n = len(examples)
        chosen = []
        while len(chosen) < batch_size * process[1]:
            order = np.random.default_rng([seed, self.epoch]).permutation(n)
            take = min(batch_size * process[1] - len(chosen), n - self.index)
            chosen.extend(order[self.index : self.index + take])
            self.index += take
            if self.index >= n:
                self.epoch, self.index = self.epoch + 1, 0
        mine = chosen[process[0] * batch_size : (process[0] + 1) * batch_size]
        return [examples[i] for i in mine]


def _fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What must match for a checkpoint in the workdir to be resumable with this config."""
    return {"model": config.model.to_dict(), "rag": config.rag.to_dict(), "seed": config.seed}


def _check_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if ``workdir`` holds checkpoints of another model or config. Reads
    only: nothing is written before every input has been checked (:func:`_record_config`)."""
    record = workdir / "config.json"
    fingerprint = _fingerprint(config)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != fingerprint and (workdir / "checkpoints").exists():
            diff = sorted(
                f"{part}.{k}"
                for part in fingerprint
                for k in set(fingerprint[part] or {})
                | set((saved.get("fingerprint") or {}).get(part) or {})
                if isinstance(fingerprint[part], dict)
                and (fingerprint[part] or {}).get(k)
                != ((saved.get("fingerprint") or {}).get(part) or {}).get(k)
            ) or ["seed"]
            raise ValueError(
                f"{workdir} holds checkpoints of another model or config (differs in "
                f"{', '.join(diff)}); use a new --workdir, or delete {workdir / 'checkpoints'}"
            )


def _record_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Creates ``workdir`` and writes ``config.json`` (atomically) once the inputs are good."""
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "config.json"
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"fingerprint": _fingerprint(config), "config": config.to_dict()}, indent=2, default=str
        )
    )
    tmp.replace(record)


def _query_preprocessing(model: RagModel, question_encoder_dir: str) -> dict:
    """What, besides the weights, makes ``q(x)``: compared with the index manifest's record of
    its document encoder (``max_length`` is not: questions and passages differ in length)."""
    directory = Path(question_encoder_dir)
    if (directory / "question_encoder_tokenizer").is_dir():
        directory = directory / "question_encoder_tokenizer"
    return {
        "pooling": model.query_encoder.pooling,
        "normalize": model.query_encoder.normalize,
        "tokenizer_sha256": tokenizer_sha256(directory),
    }


def check_paths(config: ml_collections.ConfigDict, training: bool = True) -> None:
    """Every file or directory the config names exists (the model's, and with ``training``
    the data's and, unless closed-book, the index's).

    Raises:
      FileNotFoundError: naming the config field and the path.
    """
    fields = [
        "model.question_encoder", "model.generator", "model.generator_tokenizer",
        "model.generator_warm_start",
    ]  # fmt: skip
    if training:
        fields.append("data.train")
        if config.rag.marginalization != "closed_book":
            fields.append("data.index")
    for field in fields:
        section, name = field.split(".")
        path = config[section].get(name, "")
        if path and not Path(path).exists():
            raise FileNotFoundError(f"config.{field}={str(path)!r} does not exist")
    index = config.data.get("index", "")
    if "data.index" in fields and not (Path(index) / MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"config.data.index={str(index)!r} is not an index directory (no {MANIFEST_FILE}); "
            "build one with `python -m rag_jax.index build`"
        )


def open_knowledge(
    config: ml_collections.ConfigDict, model: RagModel, mesh=None
) -> KnowledgeSource | None:
    """The index of ``config.data.index``, checked against the query encoder: the same vector
    size, pooling, normalisation and tokenizer files as the document encoder that built it.
    With ``mesh``, an exact index's vectors are sharded over its devices.

    Raises:
      IndexMismatchError: naming the index, its encoder and the query encoder.
    """
    if model.config.closed_book:
        return None
    question_encoder = config.model.question_encoder
    try:
        return KnowledgeSource(
            config.data.index,
            backend=config.data.index_backend or None,
            dim=model.query_encoder.output_dim,
            encoder_preprocessing=_query_preprocessing(model, question_encoder),
            mesh=mesh,
        )
    except IndexMismatchError as error:
        raise IndexMismatchError(
            f"query encoder {question_encoder} does not fit the index: {error}"
        ) from None


class MetricsWriter:
    """Each logged step as a JSON line in ``metrics.jsonl`` and as TensorBoard scalars.

    A run resumed from step ``resumed_from`` first drops the lines of later steps: an
    interrupted run logged them after its last checkpoint, and this run logs them again.
    """

    def __init__(self, workdir: Path, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        if resumed_from:
            _drop_lines_after(workdir / "metrics.jsonl", resumed_from)
        self.jsonl = (workdir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrites the JSONL file ``path`` (atomically) without the lines of steps after ``step``,
    and without a line a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _Preempted:
    """Set by SIGTERM: the loop saves a checkpoint and returns."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh of ``config.mesh``: ``data x fsdp`` devices (``fsdp`` 0: all
    the devices ``data`` leaves). One process may use fewer devices than it has (tests compare
    1 device with 4); a multi-process run uses them all.

    Raises:
      ValueError: the mesh does not fit the devices, or the batch does not split over it.
    """
    n_devices = jax.device_count()
    data = config.mesh.data
    fsdp = config.mesh.get("fsdp", 0) or n_devices // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp > n_devices:
        raise ValueError(
            f"config.mesh (data={data}, fsdp={config.mesh.get('fsdp', 0)}) does not fit the "
            f"{n_devices} devices"
        )
    if jax.process_count() > 1 and data * fsdp != n_devices:
        raise ValueError(
            f"config.mesh uses {data * fsdp} of {n_devices} devices: a multi-process run must "
            "use them all"
        )
    if config.batch_size % (data * fsdp) or config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size {config.batch_size} must be a multiple of the mesh's "
            f"{data * fsdp} devices and of the {jax.process_count()} processes"
        )
    if data * fsdp == n_devices:
        return partitioning.make_mesh(data=data, fsdp=fsdp)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (data, fsdp), partitioning.MESH_AXES, axis_types=auto, devices=jax.devices()[: data * fsdp]
    )


def _place_on_mesh(model: RagModel, tx, mesh, config, wrt=None) -> nnx.Optimizer:
    """Moves the model onto ``mesh`` (FSDP-sharded or replicated, :func:`param_rules`) where it
    is not there already (``build_model(config, mesh)`` puts it there), and creates the
    optimizer there, for the :func:`trainable` parameters (or ``wrt``): its moments follow the
    parameters' shardings, its counters are replicated."""
    state = nnx.state(model)
    shardings = partitioning.param_shardings(state, mesh, param_rules(config))
    nnx.update(model, jax.tree.map(partitioning.put, state, shardings))
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, tx, wrt=trainable(config) if wrt is None else wrt)
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return partitioning.put(x, replicated)  # counters created on the default device

    nnx.update(optimizer, jax.tree.map(on_mesh, nnx.state(optimizer)))
    return optimizer


def _batch_sharding(mesh) -> NamedSharding:
    """Batch axis split over the whole (data, fsdp) mesh; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(partitioning.MESH_AXES))


def _shard_batch(batch: RagBatch, mesh) -> RagBatch:
    """This process's rows of the batch (numpy) -> global device arrays, the batch axis split
    over the whole (data, fsdp) mesh; each process contributes its own rows."""
    sharding = _batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def _retrieval_mode(config: ml_collections.ConfigDict, model: RagModel) -> str:
    """``config.data.retrieval``, checked: "host" or "device" ("host" for closed-book models,
    which retrieve nothing)."""
    mode = config.data.get("retrieval", "host")
    if mode not in ("host", "device"):
        raise ValueError(f"config.data.retrieval must be 'host' or 'device', got {mode!r}")
    return "host" if model.config.closed_book else mode


def _device_corpus(
    knowledge: KnowledgeSource, builder: BatchBuilder, examples: list[QAExample]
) -> device_retrieval.DeviceCorpus:
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
    return device_retrieval.device_corpus(
        knowledge.index,
        passages,
        builder.generator_tokenizer,
        builder.config,
        builder.generator_config.vocab_size,
        probe_question=examples[0].question,
    )


@dataclasses.dataclass
class _Prepared:
    """A batch ready for the train step, and what the loop reports of it."""

    inputs: Any  # on the mesh: a RagBatch (host retrieval) or a QuestionBatch (device)
    doc_ids: np.ndarray | None  # (B, K) this process's retrieved ids; None: known after the step
    n_truncated: dict[str, int]  # inputs cut, by part (this process's)
    n_target_tokens: int  # this process's
    retrieval_state: nnx.State | None = None  # device retrieval: the query encoder to use


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded on its first axis, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of the same rows on other axes
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


class _Retrieval:
    """The host side of a step: questions -> a batch on the mesh, with the query encoder as it
    was when :meth:`snapshot` was taken.

    Retrieval for step n + 1 uses the query encoder from *before* step n, in every run: the
    batch can then be built (embedding, search, tokenization) in a background thread while
    step n runs on the device (``config.data.prefetch``), and a run with prefetch gives
    exactly the losses of one without. Retrieval is one optimizer step stale, never more; the
    snapshot is saved with each checkpoint, so a resumed run retrieves as an uninterrupted one.

    With device retrieval (``corpus`` given) the host only tokenizes questions and answers;
    the step retrieves, with the same one-step-stale query encoder.
    """

    def __init__(
        self,
        builder: BatchBuilder,
        model: RagModel,
        mesh,
        prefetch: bool,
        corpus: device_retrieval.DeviceCorpus | None = None,
    ):
        self.builder, self.mesh, self.corpus = builder, mesh, corpus
        self.graphdef = nnx.graphdef(model.query_encoder)
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        # one passage, to check that questions tokenize apart from passages (device_retrieval)
        self.probe_passage = builder.knowledge.passages(0) if corpus is not None else None

    @staticmethod
    def snapshot(model: RagModel) -> nnx.State:
        """A copy of the query encoder's state (the train step donates the original)."""
        return jax.tree.map(jnp.copy, nnx.state(model.query_encoder))

    def _dispatch_embedding(self, examples, state) -> jax.Array | None:
        """Starts ``q(x)`` for ``examples`` on the mesh, from the calling (main) thread: every
        process then queues its device work in the same order (this embedding, then the step),
        which collectives over FSDP-sharded parameters need."""
        builder = self.builder
        if builder.config.closed_book:
            return None
        questions = [e.question for e in examples]
        q = tokenize_questions(
            builder.question_tokenizer, questions, builder.config.max_question_length
        )
        if builder.question_vocab_size is not None:  # before the query encoder sees them
            check_token_ids(q.ids, builder.question_vocab_size, "question_ids (query tokenizer)")
        ids, mask = _shard_batch((q.ids, q.mask), self.mesh)
        with jax.set_mesh(self.mesh):
            return _embed_on_mesh(self.graphdef, state, ids, mask)  # (B, H), asynchronous

    def _build(self, examples, query_emb) -> tuple[_Prepared, float]:
        start = time.perf_counter()
        self.builder.embed_fn = lambda ids, mask: _local_rows(query_emb)
        host = self.builder(examples)
        prepared = _Prepared(
            _shard_batch(host.batch, self.mesh),
            host.doc_ids,
            host.n_truncated,
            int(host.batch.target_mask.sum()),
        )
        return prepared, time.perf_counter() - start

    def _build_questions(self, examples, state) -> tuple[_Prepared, float]:
        """Device retrieval: the host's part of the batch, questions and answers tokenized."""
        start = time.perf_counter()
        questions, n_truncated = device_retrieval.question_batch(
            examples, self.builder, self.probe_passage
        )
        prepared = _Prepared(
            _shard_batch(questions, self.mesh),
            None,
            n_truncated,
            int(questions.target_mask.sum()),
            retrieval_state=state,
        )
        return prepared, time.perf_counter() - start

    def submit(self, examples, state) -> Future:
        """The batch of ``examples`` retrieved with query-encoder ``state``: the embedding is
        dispatched now, search and tokenization run in the background with prefetch, else
        now (device retrieval: only tokenization); ``.result()`` is ``(prepared,
        host_seconds)``."""
        if self.corpus is None:
            build, args = self._build, (examples, self._dispatch_embedding(examples, state))
        else:
            build, args = self._build_questions, (examples, state)
        if self.pool is not None:
            return self.pool.submit(build, *args)
        future = Future()
        future.set_result(build(*args))
        return future

    def step(
        self, model: RagModel, optimizer: nnx.Optimizer, prepared: _Prepared
    ) -> tuple[dict, np.ndarray, dict[str, int]]:
        """Runs the train step on ``prepared`` and waits for it; returns the measurements
        (device scalars), this process's retrieved ids (B, K) and its inputs cut, by part."""
        if self.corpus is None:
            metrics = jax.block_until_ready(train_step(model, optimizer, prepared.inputs))
            return metrics, prepared.doc_ids, prepared.n_truncated
        metrics = device_train_step(
            model, optimizer, self.corpus, prepared.retrieval_state, prepared.inputs
        )
        metrics = jax.block_until_ready(metrics)
        doc_ids = _local_rows(metrics.pop("doc_ids"))
        n_cut = int(_local_rows(metrics.pop("n_cut")).sum())
        return metrics, doc_ids, {**prepared.n_truncated, "context": n_cut}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as ``config`` says, checkpointing to ``workdir``; returns the last metrics."""
    workdir = Path(workdir)
    check_paths(config)
    _check_workdir(workdir, config)
    # Every input is checked before anything is written to the workdir.
    examples, n_bad = read_qa(config.data.train, skip_bad=config.data.skip_bad_lines)
    if n_bad:
        log.warning("skipped %d bad lines of %s", n_bad, config.data.train)

    mesh = make_mesh(config)
    model, question_tokenizer, generator_tokenizer = build_model(config, mesh)
    on_device = _retrieval_mode(config, model) == "device"
    knowledge = open_knowledge(config, model, mesh=mesh if on_device else None)
    builder = BatchBuilder(
        model.config,
        question_tokenizer,
        generator_tokenizer,
        model.generator.config,
        knowledge=knowledge,
        embed_fn=lambda ids, mask: None,  # set per batch by _Retrieval
        question_vocab_size=model.query_encoder.bert.config.vocab_size,
    )
    corpus = _device_corpus(knowledge, builder, examples) if on_device else None
    tx, schedule = make_optimizer(config)
    optimizer = _place_on_mesh(model, tx, mesh, config)
    if jax.process_index() == 0:
        _record_config(workdir, config)

    position = DataPosition()
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        # cleanup_tmp_directories: a save that a kill cut short left a temporary directory
        # (never read as a checkpoint); remove it instead of keeping it forever.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True, cleanup_tmp_directories=True
        ),
    )
    retrieval = _Retrieval(
        builder, model, mesh, prefetch=config.data.get("prefetch", True), corpus=corpus
    )
    start_step, snapshot = 0, retrieval.snapshot(model)
    if manager.latest_step() is not None:
        start_step, position, snapshot = _restore(manager, model, optimizer, snapshot=snapshot)
        log.info(
            "resumed from step %d (epoch %d, example %d)",
            start_step,
            position.epoch,
            position.index,
        )

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resumed_from=start_step)
    process = (jax.process_index(), jax.process_count())
    per_process = config.batch_size // jax.process_count()

    def submit(position: DataPosition, snapshot) -> tuple[Future, DataPosition]:
        """The next batch from ``position``; returns it (pending) and the position after it."""
        after = copy.copy(position)
        examples_now = after.next_batch(examples, per_process, config.seed, process)
        return retrieval.submit(examples_now, snapshot), after

    window = deque(maxlen=config.collapse.window)
    truncated = {}  # inputs cut (this process's) since this run started, by part
    last = {}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.train_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not config.progress or jax.process_index() != 0,
    )
    try:
        with _Preempted() as preempted, jax.set_mesh(mesh):
            step = start_step
            # the first batch: retrieved with the snapshot a resumed run restored, else with
            # the initial query encoder
            pending = submit(position, snapshot) if step < config.train_steps else None
            while step < config.train_steps:
                t0 = time.perf_counter()
                (prepared, host_seconds), position = pending[0].result(), pending[1]
                waited = time.perf_counter() - t0
                snapshot = retrieval.snapshot(model)  # q before this step: the next batch's
                if step + 1 < config.train_steps:  # with prefetch, built while the step runs
                    pending = submit(position, snapshot)
                t1 = time.perf_counter()
                metrics, doc_ids, n_truncated = retrieval.step(model, optimizer, prepared)
                step += 1
                t2 = time.perf_counter()
                window.extend(doc_ids[doc_ids >= 0].tolist())
                for part, count in n_truncated.items():
                    truncated[part] = truncated.get(part, 0) + count
                if step % config.log_every == 0 or step == config.train_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    t3 = time.perf_counter()
                    metrics.update(
                        host_seconds=host_seconds,  # retrieval + tokenization of this batch
                        host_wait_seconds=waited,  # of which the loop waited for
                        device_seconds=t2 - t1,  # the step, dispatch to result
                        examples_per_second=config.batch_size / (t3 - t0),
                        target_tokens_per_second=prepared.n_target_tokens * process[1] / (t3 - t0),
                        learning_rate=float(schedule(step)),
                        skipped_updates=_skipped_updates(optimizer.opt_state),
                        distinct_docs_in_window=len(set(window)),
                        **{f"truncated_{k}": v for k, v in truncated.items()},
                    )
                    _watch_collapse(metrics, config, model.config)
                    writer.write(step, metrics)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}", H=f"{metrics['doc_entropy']:.2f}"
                    )
                    last = metrics
                bar.update(1)
                if (
                    step % config.checkpoint.every == 0
                    or step == config.train_steps
                    or preempted.flag
                ):
                    _save(manager, step, model, optimizer, position, snapshot)
                if preempted.flag:
                    log.warning("SIGTERM: saved step %d and stopped", step)
                    break
    finally:
        retrieval.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        bar.close()
    return last


def _watch_collapse(metrics: dict, config, model_config: RagConfig) -> None:
    if model_config.closed_book:
        return
    if metrics["doc_entropy"] < config.collapse.min_entropy:
        log.warning(
            "retrieval collapse? mean entropy of p(z|x) is %.3f nats (threshold %.3f)",
            metrics["doc_entropy"],
            config.collapse.min_entropy,
        )
    if 0 < metrics["distinct_docs_in_window"] < config.collapse.min_distinct_docs:
        log.warning(
            "retrieval collapse? only %d distinct documents over the last %d retrieved",
            metrics["distinct_docs_in_window"],
            config.collapse.window,
        )


def _train_state(model: RagModel, optimizer: nnx.Optimizer, snapshot=None) -> nnx.State:
    """Everything a resume needs from the networks: parameters, optimizer state, and the
    query encoder the next batch is retrieved with (see :class:`_Retrieval`)."""
    snapshot = nnx.state(model.query_encoder) if snapshot is None else snapshot
    return nnx.State(
        {
            "params": nnx.state(model, nnx.Param),
            "model_rngs": nnx.state(model, nnx.Not(nnx.Param)),  # dropout's RNG streams
            "optimizer": nnx.state(optimizer),
            "retrieval_query_encoder": snapshot,
        }
    )


def _save(
    manager,
    step: int,
    model: RagModel,
    optimizer: nnx.Optimizer,
    position: DataPosition,
    snapshot: nnx.State,
) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(_train_state(model, optimizer, snapshot))),
            position=ocp.args.JsonSave(dataclasses.asdict(position)),
        ),
    )


def _restore(
    manager,
    model: RagModel,
    optimizer: nnx.Optimizer,
    step: int | None = None,
    snapshot: nnx.State | None = None,
) -> tuple[int, DataPosition, nnx.State]:
    """Restores ``step`` (default: the latest) into ``model`` and ``optimizer``; returns the
    step, the data position and the query encoder the next batch is retrieved with
    (``snapshot``: a state of that structure to restore into, default a copy of the model's)."""
    step = manager.latest_step() if step is None else step
    snapshot = _Retrieval.snapshot(model) if snapshot is None else snapshot
    state = _train_state(model, optimizer, snapshot)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(nnx.to_pure_dict(state)),
                position=ocp.args.JsonRestore(),
            ),
        )
    except ValueError as error:  # orbax: the saved tree is not this model's and optimizer's
        raise ValueError(
            f"the checkpoint of step {step} in {manager.directory} does not fit this model and "
            f"optimizer (saved by an earlier version of rag_jax?); start in a new workdir: {error}"
        ) from None
    nnx.replace_by_pure_dict(state, restored["state"])
    nnx.update(model, state["params"])
    nnx.update(model, state["model_rngs"])
    nnx.update(optimizer, state["optimizer"])
    return step, DataPosition(**restored["position"]), state["retrieval_query_encoder"]


def _abstract_model(config: ml_collections.ConfigDict, mesh) -> tuple[RagModel, Any, Any]:
    """:func:`build_model`'s ``(model, question_tokenizer, generator_tokenizer)``, every variable
    of the model a ``jax.ShapeDtypeStruct`` with its sharding on ``mesh``: a target to restore a
    checkpoint into. The pretrained checkpoints'
    weight files are still read on the host (``build_model`` runs under ``nnx.eval_shape``), but
    nothing is placed on a device, and no warm start is done (the checkpoint holds every
    weight)."""
    config = copy.deepcopy(config)
    config.model.generator_warm_start = ""
    tokenizers = []

    def make() -> RagModel:
        model, *built = build_model(config)
        tokenizers.extend(built)  # host objects: kept, not traced
        return model

    model = nnx.eval_shape(make)
    state = nnx.state(model)
    shardings = partitioning.param_shardings(state, mesh, param_rules(config))
    nnx.update(
        model,
        jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            state,
            shardings,
        ),
    )
    return model, *tokenizers


def load_trained(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """``(model, question_tokenizer, generator_tokenizer)`` restored from ``workdir``'s
    checkpoint (the latest, or ``step``), for evaluation and decoding.

    The model is built abstractly and its variables are read straight into their shardings on
    ``make_mesh(config)``; the optimizer state in the checkpoint is not read.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no {directory})")
    check_paths(config, training=False)
    model, question_tokenizer, generator_tokenizer = _abstract_model(config, make_mesh(config))
    target = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "model_rngs": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))),
    }
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,  # the parameters, not the optimizer's moments
                )
            ),
        )["state"]
    # A partial restore returns the target's own leaf where the checkpoint lacks one.
    missing = [
        f"{part}{jax.tree_util.keystr(path)}"
        for part in target
        for path, leaf in jax.tree_util.tree_leaves_with_path(restored.get(part, target[part]))
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if missing:
        raise ValueError(
            f"the checkpoint of step {step} in {directory} lacks {len(missing)} of this model's "
            f"variables (saved by an earlier version of rag_jax, or another model?): "
            f"{', '.join(missing[:5])}"
        )
    for part, variables in (("params", nnx.Param), ("model_rngs", nnx.Not(nnx.Param))):
        state = nnx.state(model, variables)
        nnx.replace_by_pure_dict(state, restored[part])
        nnx.update(model, state)
    return model, question_tokenizer, generator_tokenizer
