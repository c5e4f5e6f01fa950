"""Hugging Face checkpoint I/O shared by the models: read config and weights, fill modules, save.

(Training checkpoints are orbax's, in ``rag_jax.training``; nothing here is about them.)

A Hugging Face checkpoint directory holds ``config.json`` and the weights as ``model.safetensors``
(or sharded: ``model.safetensors.index.json`` + shards), or as ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``: no pickled code ever runs). A full RAG checkpoint
(facebook/rag-sequence-nq layout) keeps both halves in one directory: ``config.json`` has
``question_encoder`` and ``generator`` sub-configs, and the weights are stored under
``question_encoder.`` / ``generator.`` (behind ``rag.`` when saved from ``Rag*ForGeneration``).

Model files map Hugging Face names to NNX parameter paths (dotted strings such as
``"encoder.layers.0.attention.query.kernel"``), build the module abstractly
(:func:`abstract_module`: shapes only, no parameter is initialised) and call
:func:`assign_params`, which checks everything at once, raises a single :class:`CheckpointError`,
and places each value on the device (or straight into its shard of a mesh).
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from rag_jax import _files
from rag_jax.models import partitioning

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"  # transformers' generation settings
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)
RAG_WRAPPER_PREFIX = "rag."  # RagSequenceForGeneration / RagTokenForGeneration keep RagModel here


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used: bad config, missing/extra/mis-shaped weights."""


def _existing_dir(checkpoint_dir: str | os.PathLike) -> Path:
    path = Path(checkpoint_dir)
    _files.restore_replaced(path)  # a save interrupted between its two renames
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    return path


def read_hf_config(checkpoint_dir: str | os.PathLike, part: str | None = None) -> dict[str, Any]:
    """Reads ``config.json`` of a checkpoint directory.

    Args:
      checkpoint_dir: a Hugging Face checkpoint directory.
      part: for a RAG checkpoint, ``"question_encoder"`` or ``"generator"`` returns that sub-config.

    Returns:
      The config as a dict.
    """
    path = _existing_dir(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {str(path.parent)!r}")
    config = _read_json_object(path)
    if part is None:
        return config
    if not isinstance(config.get(part), dict):
        raise CheckpointError(
            f"{str(path)!r} has no {part!r} sub-config (model_type={config.get('model_type')!r}); "
            "sub-configs exist in RAG checkpoints only"
        )
    return config[part]


def read_generation_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Reads ``generation_config.json`` of a checkpoint directory; None if it has none.

    transformers (5.x) keeps generation settings (``forced_bos_token_id``,
    ``forced_eos_token_id``, ...) there and, when the file exists, generates from it alone,
    ignoring the same keys in ``config.json``.

    Raises:
      CheckpointError: the file is not a JSON object.
    """
    path = _existing_dir(checkpoint_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    return _read_json_object(path)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {error}") from error


def _load_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # lazy: rag_jax itself never needs torch
    except ImportError as error:
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch file and reading it needs torch; "
            "install torch or convert the checkpoint to model.safetensors"
        ) from error
    try:
        # weights_only=True: tensors and plain containers only, no pickled code is executed.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read PyTorch file {str(path)!r}: {error}") from error
    if not isinstance(state_dict, Mapping):
        kind = type(state_dict).__name__
        raise CheckpointError(f"{str(path)!r} holds a {kind}, not a state dict")
    # numpy has no bfloat16: upcast such tensors to float32.
    return {
        key: (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        for key, tensor in state_dict.items()
    }


def _load_sharded(index_path: Path, load_shard) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        message = f"{str(index_path)!r} is not a valid weight index: {error}"
        raise CheckpointError(message) from error
    state_dict: dict[str, np.ndarray] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard_name
        if not shard_path.is_file():
            raise FileNotFoundError(f"weight shard {str(shard_path)!r} from the index is missing")
        state_dict.update(load_shard(shard_path))
    return state_dict


def read_state_dict(
    checkpoint_dir: str | os.PathLike, prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Reads all weights of a checkpoint directory as numpy arrays, keyed by Hugging Face name.

    Looks for, in this order: model.safetensors, model.safetensors.index.json (sharded),
    pytorch_model.bin, pytorch_model.bin.index.json.

    Args:
      checkpoint_dir: a Hugging Face checkpoint directory.
      prefix: keep only the keys under this prefix and strip it, e.g. ``"question_encoder."`` for
        the query-encoder half of a RAG checkpoint. Keys saved by ``Rag*ForGeneration`` carry an
        extra leading ``"rag."``, which is matched too.

    Returns:
      ``{name: array}`` with the names as stored (minus ``prefix``).
    """
    directory = _existing_dir(checkpoint_dir)
    loaders = {
        SAFETENSORS_NAME: _load_safetensors,
        SAFETENSORS_INDEX_NAME: lambda path: _load_sharded(path, _load_safetensors),
        TORCH_NAME: _load_torch,
        TORCH_INDEX_NAME: lambda path: _load_sharded(path, _load_torch),
    }
    name = next((name for name in WEIGHT_NAMES if (directory / name).is_file()), None)
    if name is None:
        raise FileNotFoundError(
            f"no weights in checkpoint directory {str(directory)!r}: expected one of {WEIGHT_NAMES}"
        )
    state_dict = loaders[name](directory / name)
    if prefix is None:
        return state_dict
    for candidate in (prefix, RAG_WRAPPER_PREFIX + prefix):
        n = len(candidate)
        selected = {k[n:]: v for k, v in state_dict.items() if k.startswith(candidate)}
        if selected:
            return selected
    found = sorted({key.split(".")[0] + "." for key in state_dict})
    raise CheckpointError(
        f"no weights under prefix {prefix!r} in {str(directory / name)!r}; "
        f"top-level prefixes found: {found}"
    )


ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def abstract_module(make: Callable[[], ModuleT]) -> ModuleT:
    """The module ``make()`` builds, its parameters abstract (``jax.ShapeDtypeStruct``).

    No parameter is initialised: ``nnx.eval_shape`` only traces the constructor. The other
    variables (dropout RNG streams, buffers) are small and get the values ``make()`` would give
    them, from one jitted call whose parameter initialisers XLA drops as dead code. Fill the
    parameters with :func:`assign_params`.
    """
    module = nnx.eval_shape(make)
    nnx.update(module, jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))())
    return module


def _flat_params(module: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(module, nnx.Param)
    return {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def param_paths(module: nnx.Module) -> list[str]:
    """The dotted NNX paths of a module's ``nnx.Param``s (of an abstract module too)."""
    return list(_flat_params(module))


def module_params(module: nnx.Module) -> dict[str, np.ndarray]:
    """All ``nnx.Param`` values of a module as numpy arrays, keyed by dotted NNX path."""
    return {path: np.asarray(var.get_value()) for path, var in _flat_params(module).items()}


def assign_params(
    module: nnx.Module,
    params: Mapping[str, np.ndarray],
    *,
    source: str = "checkpoint",
    source_names: Mapping[str, str] | None = None,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_RULES,
) -> None:
    """Sets every ``nnx.Param`` of ``module`` from ``params`` (keyed by dotted NNX path), in place.

    Nothing is assigned unless the mapping matches the module exactly: otherwise one
    :class:`CheckpointError` lists every missing, unexpected and mis-shaped parameter. The module
    may be abstract (:func:`abstract_module`): only the shapes and dtypes of its parameters are
    read.

    Args:
      module: the NNX module to fill.
      params: ``{"encoder.layers.0.attention.query.kernel": array, ...}``; arrays already in the
        module's layout (e.g. PyTorch Linear weights transposed). Values are cast to each
        parameter's dtype.
      source: what the values come from (a file path), for the error message.
      source_names: optional ``{nnx path: checkpoint key}`` to show checkpoint names in errors.
      mesh: a ``(data, fsdp)`` mesh: each value goes straight into its shards
        (``partitioning.param_shardings``), never whole onto one device, and the module's other
        variables are moved onto the mesh too. None: the default device.
      rules: logical axes -> mesh axes (``partitioning.replicated_rules()``: whole copies).
    """
    names = source_names or {}
    targets = _flat_params(module)

    def shown(path: str) -> str:
        return f"{path} (checkpoint key {names[path]!r})" if path in names else path

    problems = {
        "missing": [shown(path) for path in targets if path not in params],
        "unexpected": [shown(path) for path in params if path not in targets],
        "mis-shaped": [
            f"{shown(path)}: module expects {tuple(var.get_value().shape)}, "
            f"{source} has {tuple(np.shape(params[path]))}"
            for path, var in targets.items()
            if path in params and tuple(np.shape(params[path])) != tuple(var.get_value().shape)
        ],
    }
    if any(problems.values()):
        counts = ", ".join(f"{len(items)} {kind}" for kind, items in problems.items() if items)
        details = "".join(
            f"\n{kind} parameters:\n  " + "\n  ".join(items)
            for kind, items in problems.items()
            if items
        )
        raise CheckpointError(
            f"{source} does not match {type(module).__name__} ({counts}):{details}"
        )
    shardings = {}
    if mesh is not None:
        flat = nnx.to_flat_state(partitioning.param_shardings(module, mesh, rules))
        shardings = {".".join(map(str, path)): var.get_value() for path, var in flat}
    for path, var in targets.items():
        value = np.asarray(params[path], dtype=var.get_value().dtype)
        if mesh is None:
            var.set_value(jax.device_put(value))
        else:
            var.set_value(partitioning.put(value, shardings[path]))
    if mesh is not None:
        partitioning.shard_module(module, mesh, rules)  # the rest: RNG streams, buffers


def save_hf_checkpoint(
    checkpoint_dir: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Writes ``model.safetensors`` + ``config.json``, the layout that from_pretrained reads.

    The new checkpoint is assembled in a temporary sibling directory and swapped in by
    ``rag_jax._files.replace_dir``: a failure at any point leaves an existing checkpoint as it
    was, and a crash between its two renames leaves the old one, which the next read or save
    puts back. Other files of an existing
    directory (tokenizer, sentence-transformers configs) are kept; its old weight files are not.

    A ``checkpoint_dir`` that is a file (or a link to one) is refused before anything is
    written: it is a user's file, not a checkpoint to replace.

    Args:
      checkpoint_dir: destination directory (created, with parents, if needed).
      state_dict: ``{Hugging Face name: array}``; every value must be finite.
      config: the Hugging Face config dict (JSON-serialisable).
      extra_files: ``{relative path: text}`` written alongside, e.g.
        ``{"1_Pooling/config.json": ...}`` or ``{"generation_config.json": ...}``.
    """
    target = Path(checkpoint_dir)
    _check_replaceable(target)
    config_text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"  # fails before any I/O
    arrays = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
    not_finite = [
        name
        for name, array in arrays.items()
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()
    ]
    if not_finite:
        raise CheckpointError(f"refusing to save non-finite values in {sorted(not_finite)}")
    with _files.staged_dir(target) as staging:
        save_file(arrays, staging / SAFETENSORS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(config_text)
        for relative_path, text in (extra_files or {}).items():
            (staging / relative_path).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative_path).write_text(text)
        _copy_extra_files(target, staging)


def _check_replaceable(target: Path) -> None:
    """Raises CheckpointError if ``target`` exists and is not a directory.

    (The files of an existing directory are carried over into the new checkpoint.)
    """
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError(
            f"{str(target)!r} exists and is not a directory: refusing to replace it with a "
            "checkpoint; choose another path"
        )


def _copy_extra_files(old: Path, new: Path) -> None:
    """Copies the files of an existing checkpoint that the new one does not replace."""
    if not old.is_dir():
        return
    superseded = {CONFIG_NAME, *WEIGHT_NAMES}
    for index_name in (SAFETENSORS_INDEX_NAME, TORCH_INDEX_NAME):  # old shards are superseded too
        if (old / index_name).is_file():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, AttributeError):
                superseded |= set(json.loads((old / index_name).read_text())["weight_map"].values())

    def copy_unless_written(source: str, destination: str) -> None:
        if not os.path.lexists(destination):  # files of the new checkpoint win
            shutil.copy2(source, destination, follow_symlinks=False)

    for entry in old.iterdir():
        if entry.name in superseded:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(
                entry, new / entry.name, copy_function=copy_unless_written, dirs_exist_ok=True
            )
        else:
            copy_unless_written(str(entry), str(new / entry.name))
