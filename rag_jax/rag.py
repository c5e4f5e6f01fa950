"""The RAG model: a trainable query encoder ``BERT_q`` and a BART generator (paper section 2).

Retrieval is an *input*, not part of the model: a batch carries the retrieved documents'
stored vectors ``d(z)`` (frozen, from the index) and the tokenized (passage, question)
generator inputs, so the same model trains with host retrieval, device retrieval or
documents the user brings. The forward pass recomputes ``doc_scores = d(z)·q(x)`` with the
current query encoder, which is how the gradient reaches ``BERT_q`` (paper section 2.4,
"Training"), runs the generator over all B·K (passage, question) inputs in one batched call,
and marginalizes with :func:`rag_jax.marginalize.rag_sequence_nll` or ``rag_token_nll``.

Shapes: B batch, K documents per question (``n_docs``), L question length, S generator
input (context) length, T target length, V vocabulary, H hidden size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import safetensors.numpy
from flax import nnx, struct

from rag_jax.marginalize import rag_sequence_nll, rag_token_nll, retriever_scores
from rag_jax.models import (
    Bart,
    BertEncoder,
    load_bart,
    load_bert_encoder,
    partitioning,
    save_bart,
    save_bert_encoder,
    save_hf_checkpoint,
)
from rag_jax.models.hf_bart import generation_config_dict

Array = jax.Array
MARGINALIZATIONS = ("sequence", "token", "closed_book")


@dataclasses.dataclass(frozen=True)
class RagConfig:
    """What the RAG model and its input pipeline need beyond the two networks' configs.

    ``title_sep``, ``doc_sep`` and ``prefix`` build each generator input exactly as
    transformers' ``RagRetriever`` does (``prefix + title + title_sep + text + doc_sep +
    question``), so converted ``facebook/rag-*`` checkpoints see the inputs they were trained
    on. ``marginalization="closed_book"`` is the generator alone on the question (no
    retrieval): the comparison the paper makes against parametric-only models.
    """

    n_docs: int = 5  # K: documents per question
    # p(z|x) ∝ exp(doc_score_scale · d(z)·q(x)). 1 for DPR's unnormalised vectors; for unit
    # vectors (sentence-transformers) the cosine's range [-1, 1] would leave p(z|x) nearly
    # uniform, so they take the temperature of their contrastive training (scale 20).
    doc_score_scale: float = 1.0
    marginalization: Literal["sequence", "token", "closed_book"] = "sequence"
    label_smoothing: float = 0.0
    max_question_length: int = 64  # L: query-encoder input tokens (longer questions are cut)
    max_context_length: int = 300  # S: generator input tokens (the passage is cut first)
    max_target_length: int = 32  # T: answer tokens, with BOS/EOS
    title_sep: str = " / "
    doc_sep: str = " // "
    prefix: str = ""

    def __post_init__(self):
        if self.marginalization not in MARGINALIZATIONS:
            raise ValueError(
                f"marginalization must be one of {MARGINALIZATIONS}, got {self.marginalization!r}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for name in ("n_docs", "max_question_length", "max_context_length", "max_target_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RagConfig.{name} must be a positive int, got {value!r}")

    @property
    def closed_book(self) -> bool:
        return self.marginalization == "closed_book"


@struct.dataclass
class RagBatch:
    """One training or scoring batch, every array host- or device-resident.

    For ``closed_book`` models K = 1 and ``context_ids`` hold the question alone;
    ``doc_vectors`` are then unused.
    """

    question_ids: Array  # (B, L) int, query-encoder tokens
    question_mask: Array  # (B, L) bool
    doc_vectors: Array  # (B, K, H) float, d(z) of the retrieved documents (frozen)
    doc_mask: Array  # (B, K) bool, False for a padded (missing) document
    context_ids: Array  # (B, K, S) int, "title / text // question" generator inputs
    context_mask: Array  # (B, K, S) bool
    decoder_input_ids: Array  # (B, T) int, targets shifted right after decoder_start
    targets: Array  # (B, T) int, ids in [0, V); anything at masked positions
    target_mask: Array  # (B, T) bool
    # BERT_d tokens of the retrieved passages' (title, text), as the index build tokenizes them,
    # when the document encoder trains (rag_jax.doc_encoder); None: d(z) = doc_vectors.
    doc_token_ids: Array | None = None  # (B, K, Ld) int
    doc_token_mask: Array | None = None  # (B, K, Ld) bool


class RagModel(nnx.Module):
    """``BERT_q`` plus the generator; ``__call__`` gives ``-log p(y|x)`` per question.

    ``doc_encoder``: ``BERT_d`` when the document encoder trains (``config.model.
    train_doc_encoder``, :mod:`rag_jax.doc_encoder`), else None (the paper: frozen, outside the
    model). With it, a batch that carries the passages' ``doc_token_ids`` gets ``d(z)``
    recomputed by ``BERT_d``, so the gradient of ``-log p(y|x)`` reaches it.
    """

    def __init__(
        self,
        query_encoder: BertEncoder,
        generator: Bart,
        config: RagConfig,
        doc_encoder: BertEncoder | None = None,
    ):
        self.query_encoder = query_encoder
        self.generator = generator
        self.config = config
        self.doc_encoder = doc_encoder

    def embed_questions(self, question_ids: Array, question_mask: Array) -> Array:
        """``q(x) = BERT_q(x)``: ``(B, L), (B, L) -> (B, H)`` float32."""
        return self.query_encoder.embed(question_ids, question_mask)

    def doc_scores(self, batch: RagBatch) -> Array:
        """``scale · d(z)·q(x)``, recomputed with the current ``BERT_q``; ``-inf`` for padding,
        (B, K)."""
        query_emb = self.embed_questions(batch.question_ids, batch.question_mask)  # (B, H)
        scores = retriever_scores(query_emb, self.doc_vectors(batch))  # (B, K)
        return jnp.where(batch.doc_mask, self.config.doc_score_scale * scores, -jnp.inf)

    def doc_vectors(self, batch: RagBatch) -> Array:
        """``d(z)``, (B, K, H) float32: ``BERT_d(title, text)`` with the current document
        encoder when the batch carries ``doc_token_ids`` (B, K, Ld), else the index's stored
        ``doc_vectors``.

        Raises:
          ValueError: the batch carries document tokens but the model has no ``doc_encoder``.
        """
        if batch.doc_token_ids is None:
            return batch.doc_vectors.astype(jnp.float32)
        if self.doc_encoder is None:
            raise ValueError(
                "the batch carries document tokens but the model has no document encoder "
                "(config.model.train_doc_encoder is off)"
            )
        B, K, Ld = batch.doc_token_ids.shape
        vectors = self.doc_encoder.embed(
            batch.doc_token_ids.reshape(B * K, Ld),
            batch.doc_token_mask.reshape(B * K, Ld).astype(jnp.int32),  # as the index build
        )  # (B·K, H)
        return vectors.reshape(B, K, -1)

    def generator_logits(self, batch: RagBatch) -> Array:
        """Teacher-forced logits for every (document, question) input: (B, K, T, V)."""
        B, K, S = batch.context_ids.shape
        T = batch.decoder_input_ids.shape[1]
        decoder_input_ids = jnp.repeat(batch.decoder_input_ids, K, axis=0)  # (B·K, T)
        logits = self.generator(
            batch.context_ids.reshape(B * K, S),
            batch.context_mask.reshape(B * K, S),
            decoder_input_ids,
        )  # (B·K, T, V)
        return logits.reshape(B, K, T, -1)

    def __call__(self, batch: RagBatch) -> tuple[Array, Array]:
        """Returns ``(nll [B], doc_scores [B, K])``: the loss of eq. 1 or 2 per question.

        A question without any document has loss 0 and no gradient (see
        :func:`rag_jax.marginalize.has_documents`); closed-book models score the
        generator alone (K = 1, ``doc_scores`` all 0).
        """
        logits = self.generator_logits(batch)  # (B, K, T, V)
        if self.config.closed_book:
            doc_scores = jnp.zeros(logits.shape[:2], jnp.float32)  # (B, 1)
        else:
            doc_scores = self.doc_scores(batch)  # (B, K)
        nll_fn = rag_token_nll if self.config.marginalization == "token" else rag_sequence_nll
        nll = nll_fn(
            logits,
            doc_scores,
            batch.targets,
            batch.target_mask,
            label_smoothing=self.config.label_smoothing,
        )
        return nll, doc_scores


@functools.partial(jax.jit, static_argnums=0)
def embed_questions(
    graphdef: nnx.GraphDef, state: nnx.State, question_ids: Array, question_mask: Array
) -> Array:
    """``q(x)`` of a query encoder split as ``(graphdef, state)``: ``(B, L), (B, L) -> (B, H)``
    float32, without gradient. Under a training mesh (``jax.set_mesh``) the result is split
    over the mesh's batch axes like the questions."""
    query_emb = nnx.merge(graphdef, state).embed(question_ids, question_mask)  # (B, H)
    if not jax.sharding.get_abstract_mesh().empty:
        query_emb = jax.lax.with_sharding_constraint(
            query_emb, jax.sharding.PartitionSpec(partitioning.MESH_AXES)
        )
    return query_emb


# --------------------------------------------------------------------------------------
# Loading and saving: the facebook/rag-* directory layout, or two model directories.
# --------------------------------------------------------------------------------------

_RAG_CONFIG_FILE = "rag_jax_config.json"


def load_rag(
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    question_encoder_dir: str | os.PathLike | None = None,
    generator_dir: str | os.PathLike | None = None,
    config: RagConfig | None = None,
    dtype=jnp.float32,
    remat: bool = False,
) -> RagModel:
    """Loads a RagModel from a RAG checkpoint directory or two separate model directories.

    Args:
      checkpoint_dir: a RAG directory (transformers' ``RagSequenceForGeneration`` /
        ``RagTokenForGeneration`` layout, as :func:`save_rag` writes it).
      question_encoder_dir, generator_dir: instead of ``checkpoint_dir``, a DPR question
        encoder (or BERT / sentence-transformers) directory and a BART directory.
      config: the RagConfig; default: the one :func:`save_rag` stored, else RagConfig with
        ``n_docs`` etc. read from the RAG config.json when present, and the marginalization
        from its ``architectures`` (``RagTokenForGeneration`` -> "token",
        ``RagSequenceForGeneration`` -> "sequence"; neither: RagConfig's default).
      dtype: compute dtype (parameters stay float32); remat: per-layer rematerialisation.

    Raises:
      ValueError: neither or both of ``checkpoint_dir`` and the two directories given; a
        config.json whose ``architectures`` name both RAG-Token and RAG-Sequence.
      FileNotFoundError, CheckpointError: as the model loaders raise them.
    """
    if (checkpoint_dir is None) == (question_encoder_dir is None or generator_dir is None):
        raise ValueError(
            "give either checkpoint_dir (a RAG directory) or both question_encoder_dir and "
            "generator_dir"
        )
    if checkpoint_dir is not None:
        question_encoder_dir = generator_dir = Path(checkpoint_dir)
        config = config or _read_rag_config(Path(checkpoint_dir))
    query_encoder = load_bert_encoder(question_encoder_dir, dtype=dtype, remat=remat)
    generator = load_bart(generator_dir, dtype=dtype, remat=remat)
    return RagModel(query_encoder, generator, config or RagConfig())


def _read_rag_config(checkpoint_dir: Path) -> RagConfig:
    ours = checkpoint_dir / _RAG_CONFIG_FILE
    if ours.is_file():
        try:
            return RagConfig(**json.loads(ours.read_text()))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{ours}: not a valid RagConfig: {error}") from error
    hf_config = json.loads((checkpoint_dir / "config.json").read_text())
    fields = {
        "n_docs": "n_docs",
        "max_context_length": "max_combined_length",
        "title_sep": "title_sep",
        "doc_sep": "doc_sep",
        "label_smoothing": "label_smoothing",
    }
    known = {ours: hf_config[theirs] for ours, theirs in fields.items() if theirs in hf_config}
    marginalization = _marginalization_of(hf_config.get("architectures"), checkpoint_dir)
    if marginalization is not None:
        known["marginalization"] = marginalization
    return RagConfig(**known)


_ARCHITECTURES = {"RagTokenForGeneration": "token", "RagSequenceForGeneration": "sequence"}


def _marginalization_of(architectures, checkpoint_dir: Path) -> str | None:
    """ "token" / "sequence" from transformers' ``architectures`` list; None if it names
    neither (e.g. a bare ``RagModel``)."""
    found = {_ARCHITECTURES[a] for a in architectures or () if a in _ARCHITECTURES}
    if len(found) > 1:
        raise ValueError(
            f"{checkpoint_dir / 'config.json'}: architectures {architectures} name both "
            "RAG-Token and RAG-Sequence; pass config=RagConfig(marginalization=...)"
        )
    return found.pop() if found else None


def save_rag(model: RagModel, checkpoint_dir: str | os.PathLike) -> None:
    """Writes ``model`` in the layout transformers' ``Rag*ForGeneration.from_pretrained`` reads.

    ``config.json`` is transformers' RAG config with the two sub-configs, ``model.safetensors``
    holds the ``question_encoder.*`` (DPR question encoder layout) and ``generator.*`` weights,
    and ``rag_jax_config.json`` our RagConfig. Atomic, as every checkpoint save here.
    """
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        save_bert_encoder(model.query_encoder, staging / "q", architecture="DPRQuestionEncoder")
        save_bart(model.generator, staging / "g")
        state_dict, sub_configs = {}, {}
        for part, sub_dir in (("question_encoder", "q"), ("generator", "g")):
            weights = safetensors.numpy.load_file(staging / sub_dir / "model.safetensors")
            state_dict.update({f"{part}.{name}": value for name, value in weights.items()})
            sub_configs[part] = json.loads((staging / sub_dir / "config.json").read_text())
    config = model.config
    architecture = (
        "RagTokenForGeneration" if config.marginalization == "token" else "RagSequenceForGeneration"
    )
    hf_config = {
        "model_type": "rag",
        "architectures": [architecture],
        "is_encoder_decoder": True,
        **sub_configs,
        "n_docs": config.n_docs,
        "max_combined_length": config.max_context_length,
        "title_sep": config.title_sep,
        "doc_sep": config.doc_sep,
        "label_smoothing": config.label_smoothing,
    }
    # The generator's generation settings at the top, where transformers' RagTokenForGeneration
    # reads them (and where a stale file of an existing directory would otherwise survive).
    generation = generation_config_dict(model.generator.config)
    extra_files = {
        _RAG_CONFIG_FILE: json.dumps(dataclasses.asdict(config), indent=2) + "\n",
        "generation_config.json": json.dumps(generation, indent=2, sort_keys=True) + "\n",
    }
    save_hf_checkpoint(checkpoint_dir, state_dict, hf_config, extra_files=extra_files)
