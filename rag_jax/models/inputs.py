"""Checks where data enters the models: config fields, tokenizer files, token ids.

The jitted modules cannot raise on values: an embedding lookup with an id >= vocab_size reads NaN
(JAX's gather fills out-of-bounds rows with NaN) and a negative id wraps around to a row counted
from the end (-1 is the last row), where PyTorch would raise. So ids are checked before they
reach a model, here: the tokenizer's vocabulary against the model's ``vocab_size`` when both are
loaded, and concrete id arrays by :func:`check_token_ids` (``encode_texts``, the index build and
the input pipeline call it). Inside ``jit`` ids are not checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from rag_jax.models.hf_io import CONFIG_NAME, CheckpointError

# Files that define a Hugging Face tokenizer; a directory needs at least one vocabulary file.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")


def check_tokenizer_dir(directory: str | os.PathLike) -> Path:
    """Raises FileNotFoundError unless ``directory`` holds a tokenizer's vocabulary.

    Without one, transformers builds a 5-token vocabulary and turns every word into [UNK].
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if not any((directory / name).is_file() for name in _VOCABULARY_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {str(directory)!r}: expected one of {list(_VOCABULARY_FILES)}; "
            "copy the tokenizer files of the model into it"
        )
    return directory


def tokenizer_sha256(directory: str | os.PathLike) -> str:
    """SHA-256 over the names and bytes of the tokenizer files present in ``directory``."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            digest.update(f"{name}|{path.stat().st_size}|".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int, source: str) -> None:
    """Raises CheckpointError if the tokenizer can produce ids >= the model's ``vocab_size``."""
    n = len(tokenizer)
    if n > vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
            f"ids from {vocab_size} on would read NaN embeddings: use the model's own tokenizer"
        )


def check_token_ids(ids: Any, vocab_size: int, name: str = "input_ids") -> None:
    """Raises ValueError naming ``name`` and the first position holding an id outside [0, V).

    Args:
      ids: a concrete integer array of any shape (not a tracer).
      vocab_size: V.
      name: the parameter name for the message.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} id(s) outside [0, {vocab_size}), the first "
            f"{int(ids[where])} at position {where}"
        )


def _allowed(annotation: Any) -> tuple[type, ...] | None:
    """The Python types a config field accepts, or None when any value is (e.g. Any)."""
    if annotation is Any:
        return None
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts = [_allowed(a) for a in typing.get_args(annotation)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)
    if annotation is float:
        return (int, float)
    if annotation in (int, bool, str):
        return (annotation,)
    if annotation is type(None):
        return (type(None),)
    return None


def check_config_fields(
    hf_config: dict[str, Any],
    config_cls: type,
    directory: str | os.PathLike,
    *,
    positive: tuple[str, ...] = (),
    probabilities: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> None:
    """Checks the types and ranges of the fields ``config_cls`` reads from a config.json dict.

    Args:
      hf_config: the dict read from ``directory/config.json`` (or its RAG sub-config).
      config_cls: the dataclass built from it; its annotations give the types.
      directory: the checkpoint directory, for the message.
      positive: fields that must be > 0 (sizes, epsilons).
      probabilities: fields that must lie in [0, 1) (dropout rates).
      skip: fields read specially by the config class (not checked here).

    A ``*_token_id`` field may be null, as in transformers' own configs.

    Raises:
      CheckpointError: naming config.json and every bad field.
    """
    hints = typing.get_type_hints(config_cls)
    problems = []
    for field in dataclasses.fields(config_cls):
        if field.name not in hf_config or field.name in skip:
            continue
        value, allowed = hf_config[field.name], _allowed(hints.get(field.name, Any))
        if allowed is None or (value is None and field.name.endswith("_token_id")):
            continue  # transformers configs leave special tokens unset (e.g. mBART's start)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            wanted = " or ".join(sorted({t.__name__ for t in allowed}))
            problems.append(f"{field.name}: expected {wanted}, got {value!r}")
        elif field.name in positive and not (value > 0 and math.isfinite(value)):
            problems.append(f"{field.name}: must be > 0, got {value!r}")
        elif field.name in probabilities and not 0 <= value < 1:
            problems.append(f"{field.name}: must be in [0, 1), got {value!r}")
    if problems:
        path = Path(directory) / CONFIG_NAME
        raise CheckpointError(f"{path}: invalid field(s): " + "; ".join(problems))
