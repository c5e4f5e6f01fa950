"""Hugging Face checkpoints of ``BertEncoder``: name tables, layout detection, load and save.

Layouts read and written: ``BertModel`` (keys with or without ``bert.``; a ``BertFor*`` task
model's heads are ignored), ``DPRQuestionEncoder`` (``question_encoder.bert_model.*`` plus
``encode_proj``), ``DPRContextEncoder`` (``ctx_encoder.*``), and the query-encoder half of a RAG
checkpoint. A sentence-transformers directory's pooling and normalisation are read too
(``rag_jax.models.sentence_transformers``). PyTorch ``Linear`` weights are (out, in): kernels
are transposed on the way in and out. Shapes: H hidden size, P output size of the encoder.
"""

import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rag_jax.models import partitioning
from rag_jax.models.bert import Architecture, BertConfig, BertEncoder, Pooling
from rag_jax.models.hf_io import (
    abstract_module,
    assign_params,
    module_params,
    param_paths,
    read_hf_config,
    read_state_dict,
    save_hf_checkpoint,
)
from rag_jax.models.inputs import check_config_fields, check_tokenizer_dir
from rag_jax.models.sentence_transformers import (
    read_sentence_transformers,
    sentence_transformers_files,
)

# NNX module path -> Hugging Face module path; "{i}" is a layer index.
_HF_MODULES = {
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "layers.{i}.attention.query": "encoder.layer.{i}.attention.self.query",
    "layers.{i}.attention.key": "encoder.layer.{i}.attention.self.key",
    "layers.{i}.attention.value": "encoder.layer.{i}.attention.self.value",
    "layers.{i}.attention.out": "encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attention_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layers.{i}.mlp_in": "encoder.layer.{i}.intermediate.dense",
    "layers.{i}.mlp_out": "encoder.layer.{i}.output.dense",
    "layers.{i}.mlp_norm": "encoder.layer.{i}.output.LayerNorm",
    "pooler": "pooler.dense",
}
_HF_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Where each layout keeps the BERT weights and DPR's projection.
_LAYOUTS = {
    "BertModel": ("", None),
    "DPRQuestionEncoder": ("question_encoder.bert_model.", "question_encoder.encode_proj"),
    "DPRContextEncoder": ("ctx_encoder.bert_model.", "ctx_encoder.encode_proj"),
}
# Buffers, not parameters, that some transformers versions save.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _hf_name(path: str, bert_prefix: str, projection_name: str | None) -> str:
    """NNX path of a BertEncoder parameter -> its Hugging Face key in the given layout."""
    module, leaf = path.rsplit(".", 1)
    if module == "projection":
        return f"{projection_name}.{_HF_LEAVES[leaf]}"
    module = module.removeprefix("bert.")
    layer = re.match(r"layers\.(\d+)\.", module)
    if layer:
        template = _HF_MODULES["layers.{i}." + module[layer.end() :]]
        hf_module = template.format(i=layer.group(1))
    else:
        hf_module = _HF_MODULES[module]
    return f"{bert_prefix}{hf_module}.{_HF_LEAVES[leaf]}"


def _detect_layout(state_dict: dict[str, np.ndarray]) -> tuple[str, str]:
    """(architecture, BERT key prefix) of a state dict, from where its word embeddings sit."""
    for architecture, (bert_prefix, _) in _LAYOUTS.items():
        if bert_prefix and f"{bert_prefix}embeddings.word_embeddings.weight" in state_dict:
            return architecture, bert_prefix
    if "bert.embeddings.word_embeddings.weight" in state_dict:
        return "BertModel", "bert."  # a BertFor* task model: its heads are ignored
    return "BertModel", ""


def _normalise_keys(state_dict: dict[str, np.ndarray], bert_prefix: str) -> dict[str, np.ndarray]:
    """Drops buffers and task heads, and renames TF-era LayerNorm gamma/beta."""
    renamed = {}
    for key, value in state_dict.items():
        if bert_prefix == "bert." and not key.startswith("bert."):
            continue  # a task head (cls.*, classifier.*) of a BertFor* model
        if key.removeprefix(bert_prefix) in _BUFFERS:
            continue
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        renamed[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)] = value
    return renamed


def load_bert_encoder(
    checkpoint_dir: str | os.PathLike,
    *,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_RULES,
    dropout: dict[str, float] | None = None,
) -> BertEncoder:
    """Loads a BertEncoder from a local Hugging Face checkpoint directory.

    The encoder is built abstractly and filled from the checkpoint: no random initialisation.

    Reads ``BertModel`` checkpoints (keys with or without ``bert.``), ``DPRQuestionEncoder``
    (``question_encoder.bert_model.*`` + ``encode_proj``), ``DPRContextEncoder``
    (``ctx_encoder.*``), and the query encoder of a full RAG checkpoint.

    Args:
      checkpoint_dir: directory with config.json and model.safetensors (or pytorch_model.bin).
      pooling: "cls" or "mean"; None reads the sentence-transformers ``1_Pooling/config.json``
        (see ``rag_jax.models.sentence_transformers``), else "cls" (DPR).
      normalize: L2-normalise the output vectors; None: iff ``modules.json`` lists a Normalize
        module (all-MiniLM-L6-v2 does, DPR does not), as the index's ``load_text_encoder``.
      dtype: compute dtype (parameters stay float32).
      remat: rematerialise each layer in the backward pass.
      mesh: a ``(data, fsdp)`` mesh (``partitioning.make_mesh``): each weight goes straight
        into its shards (``partitioning.param_shardings``); None: the default device.
      rules: logical axes -> mesh axes (``partitioning.replicated_rules()``: whole copies).
      dropout: BertConfig dropout fields (``hidden_dropout_prob``,
        ``attention_probs_dropout_prob``) that replace config.json's.

    Returns:
      The encoder, weights loaded, with ``source_architecture`` the layout it came from.

    Raises:
      CheckpointError: a config field of the wrong type or range (naming config.json and the
        field), an unsupported sentence-transformers module or pooling, or weights that do
        not fit.
    """
    directory = Path(checkpoint_dir)
    hf_config = read_hf_config(directory)
    prefix = None
    if hf_config.get("model_type") == "rag":
        hf_config, prefix = read_hf_config(directory, part="question_encoder"), "question_encoder."
    if hf_config.get("model_type") in ("bert", "dpr"):  # others: from_hf_config says which
        check_config_fields(
            hf_config,
            BertConfig,
            directory,
            positive=(
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "type_vocab_size",
                "layer_norm_eps",
            ),
            probabilities=("hidden_dropout_prob", "attention_probs_dropout_prob"),
        )
    hf_config = {**hf_config, **(dropout or {})}
    spec = read_sentence_transformers(directory)  # fails before the weights are read
    state_dict = read_state_dict(directory, prefix=prefix)
    architecture, bert_prefix = _detect_layout(state_dict)
    state_dict = _normalise_keys(state_dict, bert_prefix)
    config = BertConfig.from_hf_config(hf_config)
    pooling = pooling or spec.pooling or "cls"
    normalize = spec.normalize if normalize is None else normalize
    encoder = abstract_module(
        lambda: BertEncoder(
            config,
            pooling=pooling,
            normalize=normalize,
            add_pooling_layer=f"{bert_prefix}pooler.dense.weight" in state_dict,
            dtype=dtype,
            remat=remat,
            source_architecture=architecture,
            rngs=nnx.Rngs(0),
        )
    )
    projection_name = _LAYOUTS[architecture][1] or "encode_proj"
    hf_names = {path: _hf_name(path, bert_prefix, projection_name) for path in param_paths(encoder)}
    nnx_paths = {hf: path for path, hf in hf_names.items()}
    params = {  # unknown keys keep their checkpoint name and are reported as unexpected
        nnx_paths.get(key, key): value.T if nnx_paths.get(key, "").endswith("kernel") else value
        for key, value in state_dict.items()
    }
    source = f"checkpoint {str(directory)!r}"
    assign_params(encoder, params, source=source, source_names=hf_names, mesh=mesh, rules=rules)
    return encoder


def save_bert_encoder(
    encoder: BertEncoder,
    checkpoint_dir: str | os.PathLike,
    *,
    architecture: Architecture | None = None,
) -> None:
    """Saves ``encoder`` in the Hugging Face layout that transformers' ``from_pretrained`` reads.

    Args:
      encoder: the encoder to save.
      checkpoint_dir: destination; an existing checkpoint there is replaced atomically (its
        tokenizer files are kept).
      architecture: layout to write; defaults to the one the encoder was loaded from, else
        "DPRQuestionEncoder" for an encoder with a projection, else "BertModel". DPR layouts
        have no BERT pooler: the pooler (unused by the encoder) is not saved there.
    """
    if architecture is None:
        default = "DPRQuestionEncoder" if encoder.projection is not None else "BertModel"
        architecture = encoder.source_architecture or default
    if architecture not in _LAYOUTS:
        raise ValueError(f"architecture must be one of {sorted(_LAYOUTS)}, got {architecture!r}")
    if architecture == "BertModel" and encoder.projection is not None:
        raise ValueError("BertModel has no projection layer: save this encoder as a DPR encoder")
    bert_prefix, projection_name = _LAYOUTS[architecture]
    state_dict = {
        _hf_name(path, bert_prefix, projection_name): value.T if path.endswith("kernel") else value
        for path, value in module_params(encoder).items()
        if not (path.startswith("bert.pooler.") and architecture != "BertModel")
    }
    config = encoder.bert.config
    model_type = "bert" if architecture == "BertModel" else "dpr"
    hf_config = {**config.to_hf_config(model_type), "architectures": [architecture]}
    # The module list and pooling config, so that both loaders compute the same vectors again;
    # always written, so that stale ones of a replaced checkpoint never survive.
    extra_files = sentence_transformers_files(
        encoder.pooling, encoder.normalize, config.hidden_size
    )
    save_hf_checkpoint(checkpoint_dir, state_dict, hf_config, extra_files=extra_files)


def tokenizer_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """Where a query encoder's tokenizer files are: a RAG checkpoint keeps them in its
    ``question_encoder_tokenizer/``, a BERT / DPR / sentence-transformers directory beside the
    weights."""
    directory = Path(checkpoint_dir)
    nested = directory / "question_encoder_tokenizer"
    return nested if nested.is_dir() else directory


def load_bert_tokenizer(checkpoint_dir: str | os.PathLike):
    """The checkpoint's tokenizer via ``transformers.AutoTokenizer``, from local files only.

    For a RAG checkpoint directory, the tokenizer in its ``question_encoder_tokenizer/``. A
    directory without a vocabulary file is a FileNotFoundError.
    (transformers 5 imports torch itself when torch is installed; rag_jax does not need it.)
    """
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    directory = tokenizer_dir(checkpoint_dir)
    check_tokenizer_dir(directory)  # else transformers makes every word [UNK]
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
