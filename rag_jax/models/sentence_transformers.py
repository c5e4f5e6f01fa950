"""What a sentence-transformers directory says about how its vectors are made, read in one place.

A sentence-transformers model (e.g. all-MiniLM-L6-v2) is a Hugging Face checkpoint plus
``modules.json``, a pipeline of modules: ``Transformer`` (the BERT), ``Pooling`` (its
``1_Pooling/config.json`` picks the pooling mode), optionally ``Dense`` and ``Normalize``; and
``sentence_bert_config.json`` with the token limit ``max_seq_length``. The query encoder
(``load_bert_encoder``) and the index's document encoder (``load_text_encoder``) both read them
here, so one directory always means one embedding function. What BertEncoder cannot compute
(max, mean-sqrt-len, weighted-mean or last-token pooling, a Dense layer, unknown modules) is
refused, never replaced by CLS pooling.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from rag_jax import _files
from rag_jax.models.hf_io import CheckpointError

MODULES_FILE = "modules.json"
POOLING_CONFIG = "1_Pooling/config.json"
ST_CONFIG = "sentence_bert_config.json"
_MODULE_TYPES = ("Transformer", "Pooling", "Normalize")
# 1_Pooling/config.json flags -> BertEncoder pooling; None: not supported.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
    "pooling_mode_lasttoken": None,
}


@dataclasses.dataclass(frozen=True)
class SentenceTransformersSpec:
    """How a sentence-transformers directory turns token vectors into one vector.

    Attributes:
      pooling: "cls" or "mean", or None when the directory does not say (no pooling config).
      normalize: whether ``modules.json`` lists a Normalize module (L2 normalisation).
      max_seq_length: its token limit, or None when it has no ``sentence_bert_config.json``.
    """

    pooling: str | None = None
    normalize: bool = False
    max_seq_length: int | None = None


def _pooling(path: Path) -> str:
    config = _files.read_json(path, CheckpointError)
    modes = [flag for flag in _POOLING_FLAGS if config.get(flag)]
    unknown = [k for k in config if k.startswith("pooling_mode") and k not in _POOLING_FLAGS]
    if unknown and any(config[k] for k in unknown):
        raise CheckpointError(f"{path}: unknown pooling mode(s) {unknown}")
    if len(modes) != 1:
        raise CheckpointError(
            f"{path}: expected exactly one pooling mode, got {modes or 'none'}; BertEncoder "
            "supports one of pooling_mode_cls_token, pooling_mode_mean_tokens"
        )
    pooling = _POOLING_FLAGS[modes[0]]
    if pooling is None:
        raise CheckpointError(
            f"{path}: {modes[0]} is not supported (BertEncoder pools by CLS or mean only); "
            "refusing to load it with another pooling"
        )
    return pooling


def _modules(directory: Path) -> list[str]:
    """The module type names of ``modules.json`` (e.g. ["Transformer", "Pooling"])."""
    path = directory / MODULES_FILE
    entries = _files.read_json(path, CheckpointError, expect=None)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CheckpointError(f"{path}: expected a JSON list of module objects")
    types = [str(entry.get("type", "")).rsplit(".", 1)[-1] for entry in entries]
    unsupported = [t for t in types if t not in _MODULE_TYPES]
    if unsupported:
        raise CheckpointError(
            f"{path}: module(s) {unsupported} are not supported (only {list(_MODULE_TYPES)}); "
            "refusing to load the model without them"
        )
    if types[:1] != ["Transformer"]:
        raise CheckpointError(f"{path}: the first module must be the Transformer, got {types}")
    return types


def read_sentence_transformers(directory: str | os.PathLike) -> SentenceTransformersSpec:
    """Reads a directory's sentence-transformers files; defaults when it has none (e.g. DPR).

    Raises:
      CheckpointError: naming the file, for invalid JSON, an unsupported module or pooling
        mode, or a module list without a pooling config.
    """
    directory = Path(directory)
    pooling_path = directory / POOLING_CONFIG
    pooling = _pooling(pooling_path) if pooling_path.is_file() else None
    normalize = False
    if (directory / MODULES_FILE).is_file():
        types = _modules(directory)
        if "Pooling" in types and pooling is None:
            raise CheckpointError(
                f"{directory / MODULES_FILE}: lists Pooling but {POOLING_CONFIG} is missing"
            )
        normalize = "Normalize" in types
    max_seq_length = None
    if (directory / ST_CONFIG).is_file():
        config = _files.read_json(directory / ST_CONFIG, CheckpointError, expect=None)
        value = config.get("max_seq_length") if isinstance(config, dict) else None
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise CheckpointError(
                f"{directory / ST_CONFIG}: max_seq_length must be an integer >= 1"
            )
        max_seq_length = value
    return SentenceTransformersSpec(pooling, normalize, max_seq_length)


def sentence_transformers_files(pooling: str, normalize: bool, hidden_size: int) -> dict[str, str]:
    """``modules.json`` and ``1_Pooling/config.json`` texts describing a BertEncoder's pipeline."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    flags = {flag: mode == pooling for flag, mode in _POOLING_FLAGS.items()}
    pooling_config = {"word_embedding_dimension": hidden_size, **flags}
    return {
        MODULES_FILE: json.dumps(modules, indent=2) + "\n",
        POOLING_CONFIG: json.dumps(pooling_config, indent=2) + "\n",
    }
