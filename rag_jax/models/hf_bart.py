"""Hugging Face checkpoints of ``Bart``: names, tied embeddings, load and save.

``load_bart`` reads a ``BartForConditionalGeneration`` / ``MBartForConditionalGeneration``
directory or the generator half of a RAG checkpoint; ``save_bart`` writes one that transformers
loads with the same logits. NNX path ``encoder.layers.0.fc1.kernel`` is Hugging Face
``model.encoder.layers.0.fc1.weight``, transposed (PyTorch ``Linear`` is (out, in)); the token
embedding is stored once (``model.shared.weight``) and the LM head tied to it. Shapes: V
vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rag_jax.models import partitioning
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.hf_io import (
    CheckpointError,
    abstract_module,
    assign_params,
    module_params,
    param_paths,
    read_generation_config,
    read_hf_config,
    read_state_dict,
    save_hf_checkpoint,
)
from rag_jax.models.inputs import check_config_fields

# Copies of model.shared.weight that transformers may store; equal to it in a tied model.
_TIED_COPIES = (
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
)
# Stale fairseq entries that transformers ignores too (_keys_to_ignore_on_load_unexpected).
_IGNORED = ("model.encoder.version", "model.decoder.version")


def _hf_name(path: str) -> str:
    """NNX path -> HF name: 'encoder.layers.0.fc1.kernel' -> 'model.encoder.layers.0.fc1.weight'."""
    module, leaf = path.rsplit(".", 1)
    return f"model.{module}.{'bias' if leaf == 'bias' else 'weight'}"


def _to_hf(path: str, value: np.ndarray) -> np.ndarray:
    return value.T if path.endswith(".kernel") else value  # torch Linear stores (out, in)


def hf_state_dict(model: Bart) -> dict[str, np.ndarray]:
    """The model's weights under BartForConditionalGeneration names, torch layouts, float32."""
    state_dict = {_hf_name(p): _to_hf(p, v) for p, v in module_params(model).items()}
    state_dict["final_logits_bias"] = np.asarray(model.final_logits_bias[...])[None, :]  # (1, V)
    return {name: np.asarray(value, np.float32) for name, value in state_dict.items()}


def _untie(state_dict: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Drops stored copies of the tied embedding (after checking they are copies)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    copies = {k: state_dict.pop(k) for k in _TIED_COPIES if k in state_dict}
    if "model.shared.weight" not in state_dict and copies:
        state_dict["model.shared.weight"] = next(iter(copies.values()))
    shared = state_dict.get("model.shared.weight")
    for name, copy in copies.items():
        if shared is not None and not np.array_equal(copy, shared):
            raise CheckpointError(
                f"{source}: {name} differs from model.shared.weight; BART's embeddings and LM "
                "head must be tied"
            )
    return state_dict


# BartConfig fields that are generation settings in transformers: the forced tokens, and the
# special tokens decoding starts, stops and pads with.
_FORCED_TOKENS = ("forced_bos_token_id", "forced_eos_token_id")
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def with_generation_config(
    hf_config: dict[str, Any], generation: dict[str, Any] | None, source: str
) -> dict[str, Any]:
    """``hf_config`` (config.json's BART dict) with transformers' generation settings applied.

    transformers 5 generates from ``generation_config.json`` alone when a checkpoint has one
    (``GenerationMixin.adjust_generation_fn``), else from the non-null entries of the raw
    ``config.json``: so a forced BOS / EOS comes from the generation file when it exists (a key
    absent there is off, whatever config.json says), else from config.json (absent: off, not
    BartConfig's default). The special tokens (bos, eos, pad, decoder start) are taken from the
    generation file where it sets them and kept from config.json otherwise (transformers would
    leave them unset, i.e. decode without EOS; no real checkpoint's file lacks them).

    Raises:
      CheckpointError: a generation value that is not an int, a list of ints or null, naming
        ``source``.
    """
    chosen = hf_config if generation is None else generation
    settings = {name: chosen.get(name) for name in _FORCED_TOKENS}
    if generation is not None:
        settings |= {k: generation[k] for k in _SPECIAL_TOKENS if generation.get(k) is not None}
    for name, value in settings.items():
        values = value if isinstance(value, list) else [value]
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
            raise CheckpointError(f"{source}: {name} must be a token id or null, got {value!r}")
    return {**hf_config, **settings}


def generation_config_dict(config: BartConfig) -> dict[str, Any]:
    """The ``generation_config.json`` dict transformers reads the same generation settings from
    (its keys whose value is not null, as transformers writes them)."""
    return {
        name: getattr(config, name)
        for name in (*_SPECIAL_TOKENS, *_FORCED_TOKENS)
        if getattr(config, name) is not None
    }


# Config fields that must be > 0 (checked with their types when a checkpoint is loaded).
_POSITIVE_FIELDS = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
)


def load_bart(
    checkpoint_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    dtype=jnp.float32,
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_RULES,
    dropout: dict[str, float] | None = None,
) -> Bart:
    """Loads a Hugging Face BART/mBART ForConditionalGeneration checkpoint directory.

    The model is built abstractly and filled from the checkpoint: no random initialisation.

    Args:
      checkpoint_dir: config.json plus model.safetensors (or pytorch_model.bin, read with
        weights_only=True), and generation_config.json if any: transformers' generation
        settings, read as transformers reads them (:func:`with_generation_config`) into the
        config's forced and special tokens. A RAG checkpoint (model_type "rag",
        facebook/rag-sequence-nq layout) loads its generator: config["generator"], weights
        under "generator." (or "rag.generator."), the directory's generation_config.json.
      prefix: weight-name prefix to load from; default "generator." for RAG checkpoints.
      dtype: compute dtype (params are float32).
      remat: rematerialise each layer in the backward pass.
      mesh: a ``(data, fsdp)`` mesh (``partitioning.make_mesh``): each weight goes straight
        into its shards (``partitioning.param_shardings``); None: the default device.
      rules: logical axes -> mesh axes (``partitioning.replicated_rules()``: whole copies).
      dropout: BartConfig dropout fields (``dropout``, ``attention_dropout``,
        ``activation_dropout``) that replace config.json's.

    Raises:
      FileNotFoundError: no such directory, no config.json, or no weights file.
      CheckpointError: a config field of the wrong type or range (naming config.json and the
        field), a config of another architecture, or weights that do not fit it (one error
        naming every missing, unexpected and mis-shaped parameter).
    """
    config_path = Path(checkpoint_dir) / "config.json"
    hf_config = read_hf_config(checkpoint_dir)
    if prefix is None and hf_config.get("model_type") == "rag":
        prefix = "generator."
    if prefix is not None and isinstance(hf_config.get(prefix.rstrip(".")), dict):
        hf_config = hf_config[prefix.rstrip(".")]  # the RAG checkpoint's generator sub-config
    if hf_config.get("model_type") in ("bart", "mbart"):  # others: from_hf_config says which
        check_config_fields(
            hf_config,
            BartConfig,
            checkpoint_dir,
            positive=_POSITIVE_FIELDS,
            probabilities=("dropout", "attention_dropout", "activation_dropout"),
            skip=("eos_token_id", "forced_eos_token_id"),  # transformers allows a list there
        )
    hf_config = {**hf_config, **(dropout or {})}
    generation_path = Path(checkpoint_dir) / "generation_config.json"
    generation = read_generation_config(checkpoint_dir)
    hf_config = with_generation_config(
        hf_config, generation, str(generation_path if generation is not None else config_path)
    )
    try:
        config = BartConfig.from_hf_config(hf_config)
    except ValueError as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    source = f"weights in {str(Path(checkpoint_dir))!r}" + (f" under {prefix!r}" if prefix else "")
    state_dict = _untie(read_state_dict(checkpoint_dir, prefix), source)
    bias = state_dict.pop("final_logits_bias", np.zeros((1, config.vocab_size), np.float32))
    if np.shape(bias) != (1, config.vocab_size):  # checked before any parameter is assigned
        raise CheckpointError(
            f"{source}: final_logits_bias has shape {np.shape(bias)}, "
            f"expected (1, {config.vocab_size})"
        )

    model = abstract_module(lambda: Bart(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    model.final_logits_bias.set_value(jnp.asarray(bias[0], jnp.float32))
    path_of = {_hf_name(path): path for path in param_paths(model)}
    params, names = {}, {}
    for name, value in state_dict.items():
        path = path_of.get(name, name)  # an unknown name stays as is and is reported unexpected
        params[path] = value.T if path.endswith(".kernel") and value.ndim == 2 else value
        if path != name:
            names[path] = name
    assign_params(model, params, source=source, source_names=names, mesh=mesh, rules=rules)
    return model


def save_bart(model: Bart, checkpoint_dir: str | os.PathLike) -> None:
    """Writes model.safetensors + config.json that transformers' from_pretrained loads as
    (M)BartForConditionalGeneration with the same logits, and generation_config.json with the
    forced and special tokens (which transformers 5 reads them from; it also replaces a stale
    one of an existing directory). Atomic: a failure leaves an existing checkpoint in
    checkpoint_dir untouched.
    """
    generation = json.dumps(generation_config_dict(model.config), indent=2, sort_keys=True)
    save_hf_checkpoint(
        checkpoint_dir,
        hf_state_dict(model),
        model.config.to_hf_config(),
        extra_files={"generation_config.json": generation + "\n"},
    )
