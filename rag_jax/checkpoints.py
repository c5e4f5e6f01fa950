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


def record_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Creates ``workdir`` and writes ``config.json`` (atomically) once the inputs are good."""
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": fingerprint(config), "config": config.to_dict()}
    _files.write_text(workdir / "config.json", json.dumps(record, indent=2, default=str))


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
