"""Checkpoints and the workdir record: what a run saves, how it resumes, and how a trained
model is loaded for evaluation.

A workdir holds ``config.json`` (the config and the fingerprint a resume must match),
``checkpoints/`` (orbax: parameters, optimizer state, the model's RNG streams, the query
encoder the next batch is retrieved with, and the data position), ``metrics.jsonl`` and
``tensorboard/``; ``lock`` while a run writes it (:func:`locked`), and
``damaged_checkpoints/`` for steps found unreadable (:func:`resume`). :func:`load_trained`
restores only the parameters and RNG streams, straight into an abstract model's shardings.

A workdir is ours (absent, empty, or holding our ``config.json`` record) or refused, and a
checkpoint is restored only into a target of exactly its arrays (:func:`tree_mismatch`): the
refusal names the settings changed since the run that saved it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from rag_jax import _files, builders, sharding
from rag_jax.data import DataPosition
from rag_jax.host_retrieval import Retriever
from rag_jax.index.encode import weights_sha256
from rag_jax.index.manifest import Manifest
from rag_jax.models import partitioning
from rag_jax.rag import RagModel

log = logging.getLogger(__name__)


RECORD = "config.json"  # the run's record: {"fingerprint": ..., "config": ...}
LOCK = "lock"  # held (flock) by the one run writing the workdir; holds its pid and host


class WorkdirError(ValueError):
    """A workdir a run must not write: not ours, held by another run, or holding checkpoints
    of another model or optimizer."""


class DamagedCheckpointError(ValueError):
    """A checkpoint step whose files cannot be read back (truncated, or a part missing)."""


def fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What must match for a checkpoint in the workdir to be resumable with this config."""
    return {"model": config.model.to_dict(), "rag": config.rag.to_dict(), "seed": config.seed}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of nested dicts (a leaf: anything else)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_settings(recorded: dict, config: dict, limit: int = 6) -> str:
    """``"optimizer.grad_accum_steps 1 -> 2, seed 0 -> 1"``: the settings that differ between a
    recorded config and this one (at most ``limit`` named, then a count); "" if none."""
    old, new = _flat(recorded), _flat(json.loads(json.dumps(config, default=str)))
    changed = [
        f"{key} {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, "(unset)") != new.get(key, "(unset)")
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def find_record(workdir: Path) -> dict | None:
    """The record ``workdir/config.json`` a run wrote, or None where there is none.

    Raises:
      WorkdirError: the file is there but not a record of ours (e.g. a model's config.json).
    """
    path = workdir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not (isinstance(record, dict) and {"fingerprint", "config"} <= set(record)):
        raise WorkdirError(
            f"{workdir} is not a train.py workdir ({path} is not a run record: a model "
            "directory?): refusing to write there; choose a new or empty --workdir"
        )
    return record


def saved_steps(workdir: Path) -> list[int]:
    """The steps of ``workdir/checkpoints`` whose save finished (orbax renames a step's
    temporary directory to its number when done), oldest first."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, lock: bool = True) -> None:
    """Refuses a workdir this run must not write. Reads only: nothing is written before every
    input has been checked (:func:`record_config`).

    A workdir is ours when it is absent, empty, or holds a run record (``config.json``) of
    train.py; its checkpoints must be of this model (:func:`fingerprint`).

    Raises:
      WorkdirError: not a directory; a non-empty directory without our record (a model
        directory, say); another run holds its lock; its checkpoints are of another model or
        config (the changed settings named).
    """
    how = "choose a new or empty --workdir"
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} exists and is not a directory; {how}")
    if not workdir.is_dir():
        return
    # ``lock``: whether this process takes the lock (process 0); the others run beside it.
    holder = lock_holder(workdir) if lock else None
    if holder is not None:
        raise WorkdirError(
            f"another run ({holder}) is training in {workdir}; wait for it, or {how}"
        )
    record = find_record(workdir)
    if record is None:
        if any(p.name != LOCK for p in workdir.iterdir()):  # a stale lock: ours
            raise WorkdirError(
                f"{workdir} is not a train.py workdir (it holds files but no {RECORD}): "
                f"refusing to write there; {how}"
            )
        return
    if record["fingerprint"] != fingerprint(config) and saved_steps(workdir):
        changed = changed_settings(record["fingerprint"], fingerprint(config))
        raise WorkdirError(
            f"{workdir} holds checkpoints of another model or config (changed: {changed}); "
            f"{how}, or delete {workdir / 'checkpoints'}"
        )


def lock_holder(workdir: Path) -> str | None:
    """``"pid P on HOST"`` of the live run holding ``workdir``'s lock, else None (no lock file,
    or a stale one whose process is gone: flock locks end with their process)."""
    path = workdir / LOCK
    try:
        with open(path) as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, host = file.read().strip().partition(" ")
                return f"pid {pid or '?'} on {host or '?'}, holding {path}"
            fcntl.flock(file, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return None


@contextlib.contextmanager
def locked(workdir: Path):
    """Holds ``workdir/lock`` (flock, with this process's pid and host in it) while the run
    writes; a lock left by a dead process is taken over. The file is removed at the end.

    Raises:
      WorkdirError: another live run holds it.
    """
    path = workdir / LOCK
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder may have removed the file between our open and flock: then the lock
            # is on a name no one else sees, and a third run could hold the new file.
            same = os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
        except (BlockingIOError, FileNotFoundError):
            same = False
        if not same:
            raise WorkdirError(
                f"another run ({lock_holder(workdir) or 'just ending'}) is training in "
                f"{workdir}; wait for it, or choose a new --workdir"
            )
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()} {socket.gethostname()}\n")
        file.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def check_settings(config: ml_collections.ConfigDict) -> None:
    """One-line errors for run settings no run can use, before anything is built or written.

    Raises:
      ValueError: ``train_steps``, ``batch_size``, ``log_every``, ``checkpoint.every``,
        ``checkpoint.keep`` or ``optimizer.grad_accum_steps`` not a positive int, or
        ``batch_size`` not divisible by the number of processes.
    """
    fields = ("train_steps", "batch_size", "log_every", "checkpoint.every", "checkpoint.keep")
    for field in (*fields, "optimizer.grad_accum_steps"):
        value = config
        for part in field.split("."):
            value = value.get(part) if value is not None else None
        if field == "optimizer.grad_accum_steps" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive int, got {value!r}")
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )


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
    _files.write_text(workdir / RECORD, json.dumps(record, indent=2, default=str))


def read_record(workdir: str | Path) -> dict:
    """``workdir/config.json`` as :func:`record_config` wrote it (``"config"`` a dict).

    Raises:
      FileNotFoundError: ``workdir`` has no config.json (not a train.py workdir).
      ValueError: the file is not JSON or holds no config.
    """
    path = Path(workdir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a train.py workdir (no {RECORD})")
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
        now = _flat(given[section].to_dict(), section)
        there = _flat(saved[section].to_dict(), section)
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


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained workdir opened for use (:func:`open_workdir`).

    Attributes:
      workdir: the workdir, absolute.
      config: the config the model is built with (the recorded one, or the caller's after
        :func:`check_eval_config`), paths absolute.
      model, question_tokenizer, generator_tokenizer: as :func:`load_trained` returns them.
      step: the checkpoint step restored.
      document_encoder: the document encoder every index the model answers from must have
        been built with: the recorded one of the training index, or, for a run that trained
        ``BERT_d`` (``model.train_doc_encoder``), the trained ``BERT_d`` of ``step`` (its
        weights' SHA-256; ``rag_jax.export`` writes it as ``doc_encoder/`` for ``index
        build``). None for a closed-book model, or a workdir recorded before it was.
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
    document_encoder = record.get("document_encoder")
    if model.doc_encoder is not None:  # BERT_d trained: the index file's vectors are stale
        document_encoder = {
            "encoder_name": f"BERT_d trained in {workdir} (step {step}; python -m "
            "rag_jax.export writes it as OUT/doc_encoder for index build --encoder)",
            "encoder_sha256": weights_sha256(nnx.state(model.doc_encoder, nnx.Param)),
        }
    return TrainedRun(
        workdir, config, model, question_tokenizer, generator_tokenizer, step, document_encoder
    )  # fmt: skip


def latest_step(workdir: str | Path) -> int:
    """The latest finished checkpoint step of ``workdir``.

    Raises:
      FileNotFoundError: there is none.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoint (no {directory})")
    steps = saved_steps(Path(workdir))
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    return steps[-1]


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


def _path(keys) -> str:
    """``params/generator/decoder/layers/0/fc1/kernel``: a tree path, as orbax and nnx agree
    on it (list indices and dict keys alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Each array leaf's shape by path; a PRNG key array by its raw ``uint32`` data's shape,
    as orbax saves it."""

    def shape(leaf) -> tuple[int, ...]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.eval_shape(jax.random.key_data, leaf).shape
        return tuple(leaf.shape)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {_path(keys): shape(leaf) for keys, leaf in leaves if hasattr(leaf, "shape")}


def saved_shapes(step_dir: Path) -> dict[str, tuple[int, ...]]:
    """The arrays a checkpoint step saved under ``state/``, by path, from its metadata alone.

    Raises:
      DamagedCheckpointError: ``state/`` or its metadata is missing or unreadable.
    """
    if not (step_dir / "state").is_dir():
        raise DamagedCheckpointError(f"the checkpoint {step_dir} is damaged: it has no state/")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that a part (state/) has no step metadata
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata((step_dir / "state").absolute())
        shapes = _shapes(metadata.item_metadata)
        if not shapes:  # orbax reads a state/ without its metadata files as empty
            raise ValueError("no arrays recorded")
        return shapes
    except Exception as error:  # orbax raises many kinds for missing or cut files
        raise DamagedCheckpointError(
            f"the checkpoint {step_dir} is damaged: its state cannot be read ({_first_line(error)})"
        ) from None
    finally:
        absl.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).split(" See full TensorStore")[0].strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def tree_mismatch(
    saved: dict[str, tuple], expected: dict[str, tuple], parts: tuple[str, ...] | None = None
) -> list[str]:
    """The differences between a checkpoint's arrays and a target's, a line per kind (missing,
    extra, mis-shaped), naming a few paths each; [] when they fit. ``parts``: compare only
    the paths under these top-level names (the rest of the checkpoint is not read)."""
    if parts is not None:
        saved = {k: v for k, v in saved.items() if k.split("/", 1)[0] in parts}
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])

    def few(paths, describe=str) -> str:
        more = f", and {len(paths) - 3} more" if len(paths) > 3 else ""
        return ", ".join(describe(p) for p in paths[:3]) + more

    lines = []
    if missing:
        lines.append(f"{len(missing)} arrays of this model are not in it: {few(missing)}")
    if extra:
        lines.append(f"{len(extra)} arrays in it are not in this model: {few(extra)}")
    if reshaped:
        lines.append(
            f"{len(reshaped)} arrays differ in shape: "
            + few(reshaped, lambda k: f"{k} saved {saved[k]}, here {expected[k]}")
        )
    return lines


def check_fits(
    step_dir: Path, target, recorded: dict | None, config, what: str, parts=None
) -> None:
    """Raises :class:`WorkdirError` if the checkpoint at ``step_dir`` does not hold exactly the
    arrays of ``target`` (paths and shapes), naming the differences and the settings changed
    since the run that saved it (``recorded``: its ``config.json`` record)."""
    lines = tree_mismatch(saved_shapes(step_dir), _shapes(target), parts)
    if not lines:
        return
    changed = ""
    if recorded:  # the settings that shape the model and optimizer first, else any
        shaping = ("model", "rag", "seed", "optimizer")
        old, new = recorded["config"], config.to_dict()
        changed = changed_settings(
            {k: old.get(k) for k in shaping}, {k: new.get(k) for k in shaping}
        ) or changed_settings(old, new)
    because = f"changed since it was saved: {changed}" if changed else "no setting changed"
    raise WorkdirError(
        f"the checkpoint {step_dir} does not fit this {what} ({because}):\n  " + "\n  ".join(lines)
    )


def restore(
    manager,
    model: RagModel,
    optimizer: nnx.Optimizer,
    step: int | None = None,
    snapshot: nnx.State | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
    recorded: dict | None = None,
) -> tuple[int, DataPosition, nnx.State]:
    """Restores ``step`` (default: the latest) into ``model`` and ``optimizer``; returns the
    step, the data position and the query encoder the next batch is retrieved with
    (``snapshot``: a state of that structure to restore into, default a copy of the model's).

    The checkpoint's arrays are checked against the target first: nothing is restored into a
    model or optimizer of another layout.

    Raises:
      WorkdirError: the checkpoint holds other arrays (missing, extra or mis-shaped; the
        settings changed since ``recorded``, the run's record, are named).
      DamagedCheckpointError: its files cannot be read.
    """
    step = manager.latest_step() if step is None else step
    snapshot = Retriever.snapshot(model) if snapshot is None else snapshot
    state = train_state(model, optimizer, snapshot)
    target = nnx.to_pure_dict(state)
    step_dir = Path(manager.directory) / str(step)
    config = config or ml_collections.ConfigDict()
    check_fits(step_dir, target, recorded, config, "model and optimizer")
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()
            ),
        )
        position = DataPosition(**restored["position"])
    except Exception as error:  # the tree fits (checked above): its files are damaged
        raise DamagedCheckpointError(
            f"the checkpoint {step_dir} is damaged: it cannot be read ({_first_line(error)})"
        ) from None
    nnx.replace_by_pure_dict(state, restored["state"])
    nnx.update(model, state["params"])
    nnx.update(model, state["model_rngs"])
    nnx.update(optimizer, state["optimizer"])
    return step, position, state["retrieval_query_encoder"]


_READ_ONLY = ocp.CheckpointManagerOptions(create=False)  # (read_only=True warns each time)


def _record_or_none(workdir: Path) -> dict | None:
    try:
        return find_record(workdir)
    except WorkdirError:
        return None


def resume(
    workdir: Path,
    config: ml_collections.ConfigDict,
    model: RagModel,
    optimizer: nnx.Optimizer,
    snapshot: nnx.State,
) -> tuple[int, DataPosition, nnx.State, list[Path]]:
    """Restores the latest intact checkpoint of ``workdir`` (reading only); returns the step,
    the data position, the retrieval snapshot and the damaged later steps (to move aside
    with :func:`set_aside` once the run may write). No checkpoint: step 0, the start of the
    data, ``snapshot``. A damaged step is named in a warning and the one before it used.

    Raises:
      WorkdirError: a checkpoint of another layout (see :func:`restore`), or every
        checkpoint damaged.
    """
    steps = saved_steps(workdir)
    if not steps:
        return 0, DataPosition(), snapshot, []
    recorded = find_record(workdir)
    damaged = []
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=_READ_ONLY) as manager:
        for step in reversed(steps):
            try:
                restored = restore(
                    manager, model, optimizer, step, snapshot, config=config, recorded=recorded
                )
                return (*restored, damaged)
            except DamagedCheckpointError as error:
                log.warning("%s; trying the checkpoint before it", error)
                damaged.append(workdir / "checkpoints" / str(step))
    raise WorkdirError(
        f"every checkpoint in {workdir / 'checkpoints'} is damaged (steps "
        f"{', '.join(map(str, steps))}); move them away to train afresh there"
    )


def set_aside(damaged: list[Path]) -> None:
    """Moves damaged checkpoint steps to ``WORKDIR/damaged_checkpoints/`` (kept, not deleted),
    so that the run saves those steps again."""
    for step_dir in damaged:
        aside = step_dir.parent.parent / "damaged_checkpoints" / step_dir.name
        aside.parent.mkdir(exist_ok=True)
        step_dir.rename(aside)
        log.warning("moved the damaged checkpoint %s to %s", step_dir, aside)


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
      WorkdirError: the checkpoint's parameters or RNG streams are not this model's (an array
        missing, extra or of another shape; the settings changed since the run are named).
      DamagedCheckpointError: its files cannot be read (the earlier steps are named).
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
    steps = saved_steps(Path(workdir))
    step = (steps[-1] if steps else None) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    if step not in steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint of step {step} (steps: {steps})")
    step_dir = directory / str(step)
    try:
        # The whole tree of what is read (parameters, RNG streams): a checkpoint of another
        # model (a layer more or less, another width) is refused, never partly restored.
        check_fits(step_dir, target, _record_or_none(Path(workdir)), config, "model", tuple(target))
        with ocp.CheckpointManager(directory, options=_READ_ONLY) as manager:
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
    except WorkdirError:
        raise
    except Exception as error:  # the tree fits (checked first): its files are damaged
        if not isinstance(error, DamagedCheckpointError):
            reason = _first_line(error)
            error = f"the checkpoint {step_dir} is damaged: it cannot be read ({reason})"
        earlier = [s for s in steps if s < step]
        offer = f"; earlier checkpoints: steps {', '.join(map(str, earlier))}" if earlier else ""
        raise DamagedCheckpointError(f"{error}{offer}") from None
    for part, variables in (("params", nnx.Param), ("model_rngs", nnx.Not(nnx.Param))):
        state = nnx.state(model, variables)
        nnx.replace_by_pure_dict(state, restored[part])
        nnx.update(model, state)
    return model, question_tokenizer, generator_tokenizer
