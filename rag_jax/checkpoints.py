"""Checkpoints and the workdir record: what a run saves, how it resumes, and how a trained
model is loaded for evaluation.

A workdir holds ``config.json`` (the config and the fingerprint a resume must match),
``checkpoints/`` (orbax: parameters, optimizer state, the model's RNG streams, the query
encoder the next batch is retrieved with, and the data position), ``metrics.jsonl`` and
``tensorboard/``. :func:`load_trained` restores only the parameters and RNG streams, straight
into an abstract model's shardings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from rag_jax import _files, builders, sharding
from rag_jax.data import DataPosition
from rag_jax.host_retrieval import Retriever
from rag_jax.index.manifest import Manifest
from rag_jax.models import partitioning
from rag_jax.rag import RagModel


def fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What must match for a checkpoint in the workdir to be resumable with this config."""
    return {"model": config.model.to_dict(), "rag": config.rag.to_dict(), "seed": config.seed}


def check_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError if ``workdir`` holds checkpoints of another model or config. Reads
    only: nothing is written before every input has been checked (:func:`record_config`)."""
    record = workdir / "config.json"
    expected = fingerprint(config)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != expected and (workdir / "checkpoints").exists():
            diff = sorted(
                f"{part}.{k}"
                for part in expected
                for k in set(expected[part] or {})
                | set((saved.get("fingerprint") or {}).get(part) or {})
                if isinstance(expected[part], dict)
                and (expected[part] or {}).get(k)
                != ((saved.get("fingerprint") or {}).get(part) or {}).get(k)
            ) or ["seed"]
            raise ValueError(
                f"{workdir} holds checkpoints of another model or config (differs in "
                f"{', '.join(diff)}); use a new --workdir, or delete {workdir / 'checkpoints'}"
            )


CONFIG_FILE = "config.json"


def record_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Creates ``workdir`` and writes ``config.json`` (atomically) once the inputs are good.

    It holds the fingerprint a resume must match, the config with its paths made absolute
    (``builders.resolve_paths``: the workdir opens from any directory, :func:`open_workdir`)
    and, unless closed-book, the ``document_encoder`` of the index trained with (name,
    weights SHA-256, dim): every index the trained model later answers from must have been
    built with it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    record = {
        "fingerprint": fingerprint(config),
        "config": builders.resolve_paths(config).to_dict(),
    }
    if config.rag.marginalization != "closed_book":
        manifest = Manifest.read(config.data.index)
        record["document_encoder"] = {
            "encoder_name": manifest.encoder_name,
            "encoder_sha256": manifest.encoder_sha256,
            "dim": manifest.dim,
        }
    _files.write_text(workdir / CONFIG_FILE, json.dumps(record, indent=2, default=str))


def read_record(workdir: str | Path) -> dict:
    """``workdir/config.json`` as :func:`record_config` wrote it (``"config"`` a dict).

    Raises:
      FileNotFoundError: ``workdir`` has no config.json (not a train.py workdir).
      ValueError: the file is not JSON or holds no config.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a train.py workdir (no {CONFIG_FILE})")
    record = _files.read_json(path, ValueError)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path}: no 'config' recorded")
    return record


def recorded_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config the run in ``workdir`` trained with. Its relative paths (a workdir recorded
    before paths were made absolute) are taken relative to the current directory, as they were
    before.

    Raises:
      FileNotFoundError, ValueError: as :func:`read_record`.
    """
    return builders.resolve_paths(ml_collections.ConfigDict(read_record(workdir)["config"]))


# The model and rag fields an evaluation may set differently from the training run, and why.
# Every other field of ``model`` and ``rag`` shapes the parameters, q(x), p(z|x) or the
# generator's inputs and must equal the recorded one (the other sections, data, optimizer,
# mesh, checkpoint, seed, ..., are the training's or the machine's and are not compared;
# an index given through ``data.index`` is checked against the model's encoder instead).
EVAL_MAY_DIFFER = {
    "rag.n_docs": "K, the documents read per question, is a decoding setting (recorded in "
    "eval_settings.json)",
    "rag.label_smoothing": "the training loss only",
    "model.bf16": "compute precision, not the parameters",
    "model.remat": "memory in the backward pass only",
    "model.generator_warm_start": "initialisation only: the checkpoint holds every weight",
}


def check_eval_config(
    config: ml_collections.ConfigDict, recorded: ml_collections.ConfigDict, workdir: str | Path
) -> None:
    """Raises ValueError, naming every differing field, unless ``config`` describes the model
    trained in ``workdir`` (``recorded``): its ``model`` and ``rag`` sections equal, but the
    fields of :data:`EVAL_MAY_DIFFER`. Paths are compared absolute (``config``'s relative to
    the current directory).
    """
    given, saved = builders.resolve_paths(config), builders.resolve_paths(recorded)
    differ = []
    for section in ("model", "rag"):
        now = _flat(given[section].to_dict(), f"{section}.")
        there = _flat(saved[section].to_dict(), f"{section}.")
        differ += [
            f"{key} {there.get(key)!r} there, {now.get(key)!r} now"
            for key in sorted(now.keys() | there.keys())
            if key not in EVAL_MAY_DIFFER and now.get(key) != there.get(key)
        ]
    if differ:
        raise ValueError(
            f"the config differs from the one {workdir} was trained with ({'; '.join(differ)}); "
            "omit --config to evaluate with the recorded one"
        )


def _flat(value: dict, prefix: str) -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained workdir opened for use (:func:`open_workdir`).

    Attributes:
      workdir: the workdir, absolute.
      config: the config the model is built with (the recorded one, or the caller's after
        :func:`check_eval_config`), paths absolute.
      model, question_tokenizer, generator_tokenizer: as :func:`load_trained` returns them.
      step: the checkpoint step restored.
      document_encoder: the recorded document encoder of the training index (None for a
        closed-book model, or a workdir recorded before it was).
    """

    workdir: Path
    config: ml_collections.ConfigDict
    model: RagModel
    question_tokenizer: Any
    generator_tokenizer: Any
    step: int
    document_encoder: dict | None


def open_workdir(
    workdir: str | Path,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
) -> TrainedRun:
    """Opens the model trained in ``workdir``: the one way ``eval.py``, ``rag_jax.ask`` and
    ``rag_jax.export`` set up from a workdir.

    Args:
      workdir: a ``train.py`` workdir, from any current directory.
      config: default the recorded one; else checked against it (:func:`check_eval_config`).
      step: the checkpoint; default the latest finished one.

    Raises:
      FileNotFoundError: not a workdir, no checkpoint (or no such step), a path the config
        names is missing.
      ValueError: ``config`` differs from the recorded one in a field that matters (named),
        or the checkpoint does not fit the model.
    """
    workdir = Path(workdir).absolute()
    record = read_record(workdir)
    recorded = builders.resolve_paths(ml_collections.ConfigDict(record["config"]))
    if config is None:
        config = recorded
    else:
        check_eval_config(config, recorded, workdir)
        config = builders.resolve_paths(config)
    if step is None:
        step = latest_step(workdir)
    model, question_tokenizer, generator_tokenizer = load_trained(config, str(workdir), step)
    return TrainedRun(
        workdir, config, model, question_tokenizer, generator_tokenizer, step,
        record.get("document_encoder"),
    )  # fmt: skip


def latest_step(workdir: str | Path) -> int:
    """The latest finished checkpoint step of ``workdir``.

    Raises:
      FileNotFoundError: there is none.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no {directory})")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    return step


def manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``, keeping ``checkpoint.keep`` steps."""
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        # cleanup_tmp_directories: a save that a kill cut short left a temporary directory
        # (never read as a checkpoint); remove it instead of keeping it forever.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep, create=True, cleanup_tmp_directories=True
        ),
    )


def train_state(model: RagModel, optimizer: nnx.Optimizer, snapshot=None) -> nnx.State:
    """Everything a resume needs from the networks: parameters, optimizer state, and the
    query encoder the next batch is retrieved with (:class:`rag_jax.host_retrieval.Retriever`)."""
    snapshot = nnx.state(model.query_encoder) if snapshot is None else snapshot
    return nnx.State(
        {
            "params": nnx.state(model, nnx.Param),
            "model_rngs": nnx.state(model, nnx.Not(nnx.Param)),  # dropout's RNG streams
            "optimizer": nnx.state(optimizer),
            "retrieval_query_encoder": snapshot,
        }
    )


def save(
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
            state=ocp.args.StandardSave(nnx.to_pure_dict(train_state(model, optimizer, snapshot))),
            position=ocp.args.JsonSave(dataclasses.asdict(position)),
        ),
    )


def restore(
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
    snapshot = Retriever.snapshot(model) if snapshot is None else snapshot
    state = train_state(model, optimizer, snapshot)
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


def abstract_model(config: ml_collections.ConfigDict, mesh) -> tuple[RagModel, Any, Any]:
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
        model, *built = builders.build_model(config)
        tokenizers.extend(built)  # host objects: kept, not traced
        return model

    model = nnx.eval_shape(make)
    state = nnx.state(model)
    shardings = partitioning.param_shardings(state, mesh, sharding.param_rules(config))
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
    ``sharding.make_mesh(config)``; the optimizer state in the checkpoint is not read.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no {directory})")
    builders.check_paths(config, training=False)
    model, question_tokenizer, generator_tokenizer = abstract_model(
        config, sharding.make_mesh(config)
    )
    target = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "model_rngs": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))),
    }
    step = latest_step(workdir) if step is None else step
    with ocp.CheckpointManager(directory) as manager:
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
