"""BERT encoder (Devlin et al., 2019) in Flax NNX, as DPR's query/passage encoder (Karpukhin et al.,
2020) and as a sentence-transformers encoder (all-MiniLM-L6-v2).

Read top to bottom: config, embeddings, self-attention, layer, ``BertModel`` (hidden states and
pooled output), pooling functions, ``BertEncoder`` (one vector per text). Hugging Face
checkpoints are read and written by ``rag_jax.models.hf_bert``; the building blocks (dense,
LayerNorm, attention, remat) are ``rag_jax.models.layers``, shared with BART.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): B batch, S tokens of the
encoded text, H hidden size; here also n heads, d head size, F feed-forward size, P output size
of the encoder.

Numerics follow transformers' PyTorch ``BertModel`` (post-LN, exact-erf GELU, padding keys masked
with the float32 minimum). ``BertConfig`` is the architecture only (it round-trips to the Hugging
Face config); how to run it is up to the constructors, as for ``Bart``: parameters are float32,
``dtype`` sets the compute dtype (bfloat16 on accelerators; softmax, LayerNorm statistics and
pooling stay float32) and ``remat`` recomputes each layer in the backward pass.
"""

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from rag_jax.models import layers
from rag_jax.models.hf_io import CheckpointError
from rag_jax.models.partitioning import EMBED, HEADS, MLP, VOCAB

Array = jax.Array
Pooling = Literal["cls", "mean"]
Architecture = Literal["BertModel", "DPRQuestionEncoder", "DPRContextEncoder"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder; fields are those of Hugging Face's ``BertConfig`` /
    ``DPRConfig`` that it reads, and ``from_hf_config(c.to_hf_config()) == c``."""

    vocab_size: int = 30522
    hidden_size: int = 768  # H
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # n; head size d = H / n
    intermediate_size: int = 3072  # F, feed-forward width
    hidden_act: str = "gelu"  # a key of layers.ACTIVATIONS
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    projection_dim: int = 0  # DPR's encode_proj output size; 0 = no projection

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in layers.ACTIVATIONS:
            choices = sorted(layers.ACTIVATIONS)
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {choices}")

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> "BertConfig":
        """Builds the config from a Hugging Face ``BertConfig`` or ``DPRConfig`` dict.

        Raises:
          CheckpointError: a config of another architecture, or invalid values.
        """
        model_type = hf_config.get("model_type")
        if model_type == "rag":
            raise CheckpointError(
                "this is a RAG config: build the encoder from its 'question_encoder' sub-config "
                "(load_bert_encoder does this for a RAG checkpoint directory)"
            )
        if model_type not in ("bert", "dpr"):
            raise CheckpointError(
                f"config of model_type {model_type!r} is not a BERT config (expected 'bert' or "
                "'dpr')"
            )
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"position_embedding_type {position_type!r} is not supported")
        names = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{name: hf_config[name] for name in names if name in hf_config})
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"invalid BERT config: {error}") from error

    def to_hf_config(self, model_type: Literal["bert", "dpr"] | None = None) -> dict[str, Any]:
        """The Hugging Face config dict (``BertConfig`` or ``DPRConfig``) of this architecture.

        ``model_type`` defaults to "dpr" with a projection, else "bert"; a "bert" config has no
        field for the projection, so asking for one then is a ValueError.
        """
        model_type = model_type or ("dpr" if self.projection_dim else "bert")
        if model_type == "bert" and self.projection_dim:
            raise ValueError("a 'bert' config cannot hold projection_dim; use 'dpr'")
        config = dataclasses.asdict(self)
        if model_type == "bert":
            del config["projection_dim"]  # a DPRConfig field
        return {**config, "model_type": model_type, "position_embedding_type": "absolute"}


def _layer_norm(config: BertConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layers.layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)


class BertEmbeddings(nnx.Module):
    """Token + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        H = config.hidden_size
        self.word = layers.embed(config.vocab_size, H, VOCAB, dtype, rngs)
        self.position = layers.embed(config.max_position_embeddings, H, None, dtype, rngs)
        self.token_type = layers.embed(config.type_vocab_size, H, None, dtype, rngs)
        self.norm = _layer_norm(config, dtype, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, deterministic=True, rngs=rngs)

    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        positions = jnp.arange(input_ids.shape[1])  # (S,)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))  # (B, S, H)


class BertSelfAttention(nnx.Module):
    """Multi-head scaled dot-product self-attention over the unpadded keys."""

    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        H = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.query = layers.dense(H, H, (EMBED, HEADS), dtype, rngs)
        self.key = layers.dense(H, H, (EMBED, HEADS), dtype, rngs)
        self.value = layers.dense(H, H, (EMBED, HEADS), dtype, rngs)
        self.out = layers.dense(H, H, (HEADS, EMBED), dtype, rngs)
        self.dropout = nnx.Dropout(
            config.attention_probs_dropout_prob, deterministic=True, rngs=rngs
        )

    def __call__(self, x: Array, mask: Array) -> Array:
        """x (B, S, H) attends to the keys where mask (B, 1, S) is True -> (B, S, H)."""
        B, S, H = x.shape
        n, d = self.n_heads, H // self.n_heads
        q = self.query(x).reshape(B, S, n, d)  # (B, S, n, d)
        k = self.key(x).reshape(B, S, n, d)  # (B, S, n, d)
        v = self.value(x).reshape(B, S, n, d)  # (B, S, n, d)
        context = layers.dot_product_attention(q, k, v, mask, self.dropout)  # (B, S, n, d)
        return self.out(context.reshape(B, S, H))  # (B, S, H)


class BertLayer(nnx.Module):
    """Post-LN transformer layer: x = LN(x + attention(x)); x = LN(x + MLP(x))."""

    def __init__(self, config: BertConfig, dtype: Any, rngs: nnx.Rngs):
        H, F = config.hidden_size, config.intermediate_size
        self.attention = BertSelfAttention(config, dtype, rngs)
        self.attention_norm = _layer_norm(config, dtype, rngs)
        self.mlp_in = layers.dense(H, F, (EMBED, MLP), dtype, rngs)
        self.mlp_out = layers.dense(F, H, (MLP, EMBED), dtype, rngs)
        self.mlp_norm = _layer_norm(config, dtype, rngs)
        self.activation = layers.ACTIVATIONS[config.hidden_act]
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, deterministic=True, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        h = self.attention(x, mask)  # (B, S, H)
        x = self.attention_norm(x + self.dropout(h))  # (B, S, H)
        h = self.mlp_out(self.activation(self.mlp_in(x)))  # (B, S, F) -> (B, S, H)
        return self.mlp_norm(x + self.dropout(h))  # (B, S, H)


class BertModel(nnx.Module):
    """BERT: embeddings and a stack of post-LN layers; same outputs as transformers' BertModel.

    ``add_pooling_layer``: the tanh pooler (transformers' argument of the same name; DPR
    checkpoints have none). Parameters are float32; ``dtype`` is the compute dtype, and
    ``remat=True`` recomputes each layer in the backward pass instead of storing its
    activations. Dropout is off until ``model.train()`` (it then draws from the ``dropout``
    stream of the ``rngs`` the model was built with); ``model.eval()`` turns it off again.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        add_pooling_layer: bool = True,
        dtype: Any = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        H = config.hidden_size
        self.config = config
        self.remat = remat
        self.embeddings = BertEmbeddings(config, dtype, rngs)
        self.layers = nnx.List(
            [BertLayer(config, dtype, rngs) for _ in range(config.num_hidden_layers)]
        )
        self.pooler = layers.dense(H, H, (EMBED, None), dtype, rngs) if add_pooling_layer else None

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        token_type_ids: Array | None = None,
    ) -> tuple[Array, Array]:
        """Encodes a padded batch.

        Args:
          input_ids: ``[batch, seq_len]`` token ids.
          attention_mask: ``[batch, seq_len]``, 1 for tokens, 0 for padding.
          token_type_ids: ``[batch, seq_len]`` segment ids; zeros when None.

        Returns:
          ``hidden [batch, seq_len, hidden_size]`` (last layer, compute dtype) and
          ``pooled [batch, hidden_size]``: tanh(W h_cls + b) with the pooler, else h_cls.
        """
        seq_len, limit = input_ids.shape[1], self.config.max_position_embeddings
        if seq_len > limit:
            raise ValueError(f"seq_len {seq_len} is longer than max_position_embeddings {limit}")
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = attention_mask.astype(bool)[:, None, :]  # (B, 1, S): every query sees the tokens
        x = self.embeddings(input_ids, token_type_ids)  # (B, S, H)
        apply_layer = layers.maybe_remat(BertLayer.__call__, self.remat)
        for layer in self.layers:
            x = apply_layer(layer, x, mask)  # (B, S, H)
        cls = x[:, 0]  # (B, H)
        pooled = jnp.tanh(self.pooler(cls)) if self.pooler is not None else cls  # (B, H)
        return x, pooled


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
    """Average of the token vectors, padding excluded (sentence-transformers' mean pooling).

    mean = sum_t m_t h_t / max(sum_t m_t, 1e-9)

    Args:
      hidden: ``[batch, seq_len, hidden]``.
      attention_mask: ``[batch, seq_len]``, 1 for tokens, 0 for padding.

    Returns:
      ``[batch, hidden]`` float32.
    """
    mask = attention_mask.astype(jnp.float32)[..., None]  # (B, S, 1)
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)  # (B, H)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # (B, H)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) along the last axis (torch.nn.functional.normalize)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


class BertEncoder(nnx.Module):
    """One vector per text: BertModel, then pooling, DPR's projection if any, L2 norm if asked.

    ``pooling="cls"`` takes the last-layer [CLS] vector (DPR; the BERT pooler is not used),
    ``"mean"`` the masked mean over tokens (sentence-transformers). ``add_pooling_layer``,
    ``dtype`` and ``remat`` are ``BertModel``'s. ``source_architecture``: the Hugging Face
    layout the weights come from (``load_bert_encoder`` sets it), fixed at construction; the
    layout ``save_bert_encoder`` writes by default.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        pooling: Pooling = "cls",
        normalize: bool = False,
        add_pooling_layer: bool = True,
        dtype: Any = jnp.float32,
        remat: bool = False,
        source_architecture: Architecture | None = None,
        rngs: nnx.Rngs,
    ):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        H, P = config.hidden_size, config.projection_dim
        self.bert = BertModel(
            config, add_pooling_layer=add_pooling_layer, dtype=dtype, remat=remat, rngs=rngs
        )
        self.projection = layers.dense(H, P, (EMBED, None), dtype, rngs) if P > 0 else None
        self.pooling = pooling
        self.normalize = normalize
        self._source_architecture = source_architecture

    @property
    def source_architecture(self) -> Architecture | None:
        """The Hugging Face layout the weights were loaded from (read-only), or None."""
        return self._source_architecture

    @property
    def output_dim(self) -> int:
        """P: the size of the vectors ``embed`` returns."""
        return self.bert.config.projection_dim or self.bert.config.hidden_size

    def embed(
        self,
        input_ids: Array,
        attention_mask: Array,
        token_type_ids: Array | None = None,
    ) -> Array:
        """``input_ids, attention_mask [batch, seq_len]`` -> ``[batch, output_dim]`` float32."""
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
        cls = hidden[:, 0]  # (B, H): DPR's text vector
        vectors = mean_pool(hidden, attention_mask) if self.pooling == "mean" else cls  # (B, H)
        if self.projection is not None:
            vectors = self.projection(vectors)  # (B, P)
        vectors = vectors.astype(jnp.float32)
        return l2_normalize(vectors) if self.normalize else vectors

    __call__ = embed
