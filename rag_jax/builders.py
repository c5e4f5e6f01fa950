"""From a config to the objects a run needs: the RAG model (loaded or initialised straight into
its shardings), the index it retrieves from (checked against its query encoder), and the
checks that every path the config names exists.

Everything here reads the config; nothing writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rag_jax import sharding
from rag_jax.index import IndexMismatchError, KnowledgeSource
from rag_jax.index.manifest import MANIFEST_FILE
from rag_jax.models import (
    Bart,
    BartConfig,
    bart_from_bert,
    load_bart,
    load_bert_encoder,
    load_bert_tokenizer,
    partitioning,
)
from rag_jax.models.hf_bert import tokenizer_dir
from rag_jax.models.inputs import check_tokenizer_vocab, tokenizer_sha256
from rag_jax.rag import RagConfig, RagModel


def rag_config(config: ml_collections.ConfigDict) -> RagConfig:
    return RagConfig(**config.rag.to_dict())


def generator_tokenizer_dir(model_config: ml_collections.ConfigDict) -> str:
    return (
        model_config.generator_tokenizer or model_config.generator or model_config.question_encoder
    )


_DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout")


def dropout_settings(model_config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """``(bert, bart)``: ``config.model``'s dropout probabilities as BertConfig and BartConfig
    fields (they replace the checkpoints' own).

    Raises:
      ValueError: a probability outside [0, 1), or ``generator_init`` setting one (which
        ``model.dropout`` & co. would silently replace).
    """
    for name in _DROPOUT_FIELDS:
        value = model_config[name]
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config.model.{name} must be in [0, 1), got {value}")
        if name in model_config.generator_init:
            raise ValueError(
                f"config.model.generator_init.{name} is not used: set config.model.{name}"
            )
    bert = {
        "hidden_dropout_prob": model_config.dropout,
        "attention_probs_dropout_prob": model_config.attention_dropout,
    }
    return bert, {name: model_config[name] for name in _DROPOUT_FIELDS}


@dataclasses.dataclass(frozen=True)
class _NewBart:
    """A randomly initialised BART; equal settings compare equal, so a second build on a mesh
    reuses the first one's compiled initialiser (``partitioning.create_sharded``)."""

    config: BartConfig
    dtype: Any
    remat: bool
    seed: int

    def __call__(self) -> Bart:
        return Bart(self.config, dtype=self.dtype, remat=self.remat, rngs=nnx.Rngs(self.seed))


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
    rules = sharding.param_rules(config)
    bert_dropout, bart_dropout = dropout_settings(model_config)
    placed = dict(dtype=dtype, remat=model_config.remat, mesh=mesh, rules=rules)
    query_encoder = load_bert_encoder(model_config.question_encoder, dropout=bert_dropout, **placed)
    question_tokenizer = load_bert_tokenizer(model_config.question_encoder)
    vocab_dir = generator_tokenizer_dir(model_config)
    generator_tokenizer = load_bert_tokenizer(vocab_dir)
    if model_config.generator:
        generator = load_bart(model_config.generator, dropout=bart_dropout, **placed)
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
            **bart_dropout,
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
            make = _NewBart(bart_config, dtype, bool(model_config.remat), config.seed)
            generator = make() if mesh is None else partitioning.create_sharded(make, mesh, rules)
    doc_encoder = None
    # .get: a workdir recorded before the field existed trained without BERT_d
    if model_config.get("train_doc_encoder", False):  # BERT_d trains (rag_jax.doc_encoder)
        doc_encoder = load_bert_encoder(  # with BERT_q's dropout, as configured
            model_config.doc_encoder or model_config.question_encoder,
            dropout=bert_dropout,
            **placed,
        )
    # Ids >= vocab_size would read NaN embeddings: refuse such a tokenizer here.
    check_tokenizer_vocab(
        question_tokenizer,
        query_encoder.bert.config.vocab_size,
        f"query encoder {model_config.question_encoder}",
    )
    check_tokenizer_vocab(
        generator_tokenizer,
        generator.config.vocab_size,
        f"generator tokenizer {vocab_dir}",
    )
    return (
        RagModel(query_encoder, generator, rag_config(config), doc_encoder),
        question_tokenizer,
        generator_tokenizer,
    )


def query_preprocessing(model: RagModel, question_encoder_dir: str) -> dict:
    """What, besides the weights, makes ``q(x)``: compared with the index manifest's record of
    its document encoder (``max_length`` is not: questions and passages differ in length)."""
    return {
        "pooling": model.query_encoder.pooling,
        "normalize": model.query_encoder.normalize,
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir(question_encoder_dir)),
    }


# Every config field that names a file or directory: resolved to absolute paths when a run
# records its config (checkpoints.record_config), so a workdir opens from any directory.
PATH_FIELDS = (
    "model.question_encoder", "model.generator", "model.generator_tokenizer",
    "model.generator_warm_start", "model.doc_encoder", "data.train", "data.index",
)  # fmt: skip


def resolve_paths(
    config: ml_collections.ConfigDict, base: str | Path | None = None
) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose :data:`PATH_FIELDS` are absolute: a relative path is taken
    relative to ``base`` (default: the current directory); empty fields stay empty."""
    config = ml_collections.ConfigDict(config.to_dict())
    base = Path.cwd() if base is None else Path(base)
    for field in PATH_FIELDS:
        section, name = field.split(".")
        path = config[section].get(name, "")
        if path:
            config[section][name] = str((base / Path(path)).absolute())
    return config


def check_paths(config: ml_collections.ConfigDict, training: bool = True) -> None:
    """Every file or directory the config names exists (the model's, and with ``training``
    the data's and, unless closed-book, the index's).

    Raises:
      FileNotFoundError: naming the config field and the path.
    """
    fields = [field for field in PATH_FIELDS if field.startswith("model.")]
    if training:
        fields.append("data.train")
        if config.rag.marginalization != "closed_book":
            fields.append("data.index")
    for field in fields:
        section, name = field.split(".")
        path = config[section].get(name, "")  # a field newer than a recorded config: unset
        if path and not Path(path).exists():
            raise FileNotFoundError(f"config.{field}={str(path)!r} does not exist")
    index = config.data.index
    if "data.index" in fields and not (Path(index) / MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"config.data.index={str(index)!r} is not an index directory (no {MANIFEST_FILE}); "
            "build one with `python -m rag_jax.index build`"
        )


def open_knowledge(
    config: ml_collections.ConfigDict,
    model: RagModel,
    mesh=None,
    *,
    index_dir: str | Path | None = None,
    document_encoder: dict | None = None,
    min_passages: int = 1,
) -> KnowledgeSource | None:
    """The index of ``config.data.index`` (or ``index_dir``), checked against the query
    encoder: the same vector size, pooling, normalisation and tokenizer files as the document
    encoder that built it. With ``mesh``, an exact index's vectors are sharded over its devices.

    Args:
      document_encoder: the document encoder the model was trained with, as
        :func:`rag_jax.checkpoints.record_config` recorded it (``encoder_sha256``,
        ``encoder_name``): the index must have been built with those weights (None: not
        checked). Swaps into the returned source are held to the same encoder.
      min_passages: the fewest passages the index (and any swapped in) must hold: K.

    Raises:
      IndexMismatchError: naming the index, its encoder and the query encoder; or an index
        with fewer than ``min_passages`` passages.
    """
    if model.config.closed_book:
        return None
    question_encoder = config.model.question_encoder
    document_encoder = document_encoder or {}
    try:
        return KnowledgeSource(
            config.data.index if index_dir is None else index_dir,
            backend=config.data.index_backend or None,
            dim=model.query_encoder.output_dim,
            encoder_sha256=document_encoder.get("encoder_sha256"),
            encoder_name=document_encoder.get("encoder_name"),
            encoder_preprocessing=query_preprocessing(model, question_encoder),
            mesh=mesh,
            min_passages=min_passages,
        )
    except IndexMismatchError as error:
        raise IndexMismatchError(
            f"the model (query encoder {question_encoder}) does not fit the index: {error}"
        ) from None


def retrieval_mode(config: ml_collections.ConfigDict, model: RagModel) -> str:
    """``config.data.retrieval``, checked: "host" or "device" ("host" for closed-book models,
    which retrieve nothing)."""
    mode = config.data.retrieval
    if mode not in ("host", "device"):
        raise ValueError(f"config.data.retrieval must be 'host' or 'device', got {mode!r}")
    return "host" if model.config.closed_book else mode
