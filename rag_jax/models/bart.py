"""BART (Lewis et al., 2019, arXiv:1910.13461), the RAG generator, as a Flax NNX module.

Computes what transformers' PyTorch ``BartForConditionalGeneration`` computes (and, with
``normalize_before=True``, ``MBartForConditionalGeneration``): token embeddings shared by
encoder, decoder and the tied LM head; learned positions looked up at ``position + 2`` (BART's
offset); ``layernorm_embedding``; post-LN layers (BART) or pre-LN layers with a final LayerNorm
(mBART); logits ``h @ shared.T + final_logits_bias``.

Two ways to run the decoder:

* ``model(input_ids, attention_mask, decoder_input_ids)`` -- teacher forcing, logits (B, T, V).
* incremental decoding with a fixed-size key/value cache (the flax ``examples/gemma`` layout)::

      encoder_hidden = model.encode(input_ids, attention_mask)        # (R, S, H), once
      memory = model.encoder_memory(encoder_hidden, attention_mask)  # cross-attention K/V, once
      memory = memory.repeat(n_beams)                                 # rows b * n_beams + i
      cache = model.init_cache(memory.batch_size, max_len)
      logits, cache = model.decode_step(token_ids, cache, memory)    # (R, 1) -> (R, 1, V)

  ``DecodeCache`` and ``EncoderMemory`` are plain pytrees, so ``decode_step`` runs inside
  ``jax.lax.while_loop`` / ``lax.scan``; ``take(rows)`` reorders either one for beam search.

Hugging Face checkpoints are read and written by ``rag_jax.models.hf_bart`` (``load_bart``,
``save_bart``); the building blocks (dense, LayerNorm, attention, remat) are
``rag_jax.models.layers``, shared with BERT.

Shapes (the project's legend: B batch, K docs per question, W beams, S source length, T target
length, V vocabulary, H hidden, N corpus size, R flattened rows): decoding works on R rows, e.g.
B·K question-document pairs, times W beams; here also n heads, hd head size, L cache length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rag_jax.models import layers, precision
from rag_jax.models.hf_io import CheckpointError
from rag_jax.models.partitioning import EMBED, HEADS, MLP, VOCAB, axes

Array = jax.Array

# BART looks up position p at row p + 2 of its position table (a fairseq leftover).
POSITION_OFFSET = 2
# torch.nn.LayerNorm's default; HF BART configs have no field for it.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Shape and behaviour of a BART model; defaults are facebook/bart-base's."""

    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    normalize_before: bool = False  # pre-LN layers plus a final LayerNorm (mBART)
    dropout: float = 0.1  # on embeddings and every residual branch, in training only
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2

    def __post_init__(self):
        if self.activation_function not in layers.ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"choose one of {sorted(layers.ACTIVATIONS)}"
            )
        for name in ("encoder", "decoder"):
            heads = getattr(self, f"{name}_attention_heads")
            if self.d_model % heads:
                raise ValueError(
                    f"d_model {self.d_model} is not divisible by {name}_attention_heads {heads}"
                )

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> BartConfig:
        """Reads a transformers ``config.json`` dict of model_type "bart" or "mbart".

        Raises:
          CheckpointError: a config of another architecture, or invalid values.
        """
        model_type = hf_config.get("model_type")
        if model_type not in ("bart", "mbart"):
            architectures = hf_config.get("architectures")
            raise CheckpointError(
                f"config has model_type {model_type!r} (architectures {architectures}); "
                "BartConfig reads only 'bart' or 'mbart' configs"
            )
        if not hf_config.get("tie_word_embeddings", True):
            raise CheckpointError(
                "config has tie_word_embeddings=false; BART's LM head must be tied"
            )
        normalize_before = hf_config.get("normalize_before", model_type == "mbart")
        if hf_config.get("add_final_layer_norm", normalize_before) != normalize_before:
            raise CheckpointError(
                "config sets normalize_before and add_final_layer_norm differently; only "
                "post-LN BART or pre-LN mBART (both true) are supported"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"normalize_before"}
        known = {k: v for k, v in hf_config.items() if k in fields}
        for name in ("eos_token_id", "forced_eos_token_id"):  # HF allows a list here
            if isinstance(known.get(name), list):
                known[name] = known[name][0]
        try:
            return cls(normalize_before=bool(normalize_before), **known)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"invalid BART config: {error}") from error

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads back into the same model."""
        model_type, architecture = ("bart", "BartForConditionalGeneration")
        if self.normalize_before:
            model_type, architecture = ("mbart", "MBartForConditionalGeneration")
        fields = dataclasses.asdict(self)
        del fields["normalize_before"]
        return {
            "architectures": [architecture],
            "model_type": model_type,
            "is_encoder_decoder": True,
            "tie_word_embeddings": True,
            **fields,
        }


# --------------------------------------------------------------------------------------------
# Pytrees passed through jitted decoding loops.


@struct.dataclass
class KeyValue:
    """Attention keys and values, heads split: key, value (R, L, n_heads, head_dim)."""

    key: Array
    value: Array

    def write(self, new: KeyValue, index: Array) -> KeyValue:
        """Stores new (R, T, n, hd) at positions [index, index + T) of this (R, L, n, hd) cache."""
        write = lambda old, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            old, x.astype(old.dtype), index, axis=1
        )
        return jax.tree.map(write, self, new)


@struct.dataclass
class EncoderMemory:
    """What the decoder reads of the encoder: cross-attention K/V per decoder layer, and the mask.

    layers[i].key / .value: (R, S, n_heads, head_dim); mask: (R, S) bool, True on real tokens.
    Computed once per source (``Bart.encoder_memory``) and reused by every decoding step.
    """

    layers: tuple[KeyValue, ...]
    mask: Array

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def take(self, rows: Array) -> EncoderMemory:
        """Rows ``rows`` (M,) of every array: (R, ...) -> (M, ...)."""
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), self)

    def repeat(self, n: int) -> EncoderMemory:
        """Each row n times in a row (row r -> rows r*n ... r*n + n-1), e.g. once per beam."""
        return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)


@struct.dataclass
class DecodeCache:
    """Decoder self-attention keys/values of the positions decoded so far, fixed size.

    layers[i].key / .value: (R, max_len, n_heads, head_dim); positions >= end_index are unused.
    end_index: () int32, how many positions are filled (= position of the next token).
    """

    layers: tuple[KeyValue, ...]
    end_index: Array

    def take(self, rows: Array) -> DecodeCache:
        """Reorders rows (beam search): (R, ...) -> (M, ...) with row m = old row rows[m]."""
        layers = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), self.layers)
        return DecodeCache(layers=layers, end_index=self.end_index)


# --------------------------------------------------------------------------------------------
# Layers, in the order data flows through them.


class Buffer(nnx.Variable):
    """A saved, non-trained array (torch's register_buffer), e.g. final_logits_bias."""


def _layer_norm(d_model: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layers.layer_norm(d_model, LAYER_NORM_EPS, dtype, rngs)


class Attention(nnx.Module):
    """Multi-head attention with four biased projections: q_proj, k_proj, v_proj, out_proj."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.q_proj = layers.dense(d_model, d_model, (EMBED, HEADS), dtype, rngs)
        self.k_proj = layers.dense(d_model, d_model, (EMBED, HEADS), dtype, rngs)
        self.v_proj = layers.dense(d_model, d_model, (EMBED, HEADS), dtype, rngs)
        self.out_proj = layers.dense(d_model, d_model, (HEADS, EMBED), dtype, rngs)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def _split_heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], self.n_heads, -1)  # (B, L, H) -> (B, L, n, hd)

    def keys_values(self, source: Array) -> KeyValue:
        """source (B, S, H) -> keys and values (B, S, n_heads, head_dim)."""
        return KeyValue(
            self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source))
        )

    def __call__(self, x: Array, kv: KeyValue, mask: Array) -> Array:
        """x (B, T, H) attends to kv (B, S, n, hd) where mask (B|1, T|1, S) -> (B, T, H)."""
        query = self._split_heads(self.q_proj(x))  # (B, T, n, hd)
        context = layers.dot_product_attention(query, kv.key, kv.value, mask, self.dropout)
        return self.out_proj(context.reshape(x.shape))  # (B, T, H)


class _Layer(nnx.Module):
    """What encoder and decoder layers share: the feed-forward block and LayerNorm placement.

    Every sublayer f is wrapped as ``norm(x + f(x))`` (post-LN, BART) or ``x + f(norm(x))``
    (pre-LN, mBART); ``pre_norm`` and ``add_residual`` are the two halves of that wrapper.
    """

    def __init__(self, config: BartConfig, ffn_dim: int, dtype, rngs: nnx.Rngs):
        d_model = config.d_model
        self.normalize_before = config.normalize_before
        self.activation = layers.ACTIVATIONS[config.activation_function]
        self.fc1 = layers.dense(d_model, ffn_dim, (EMBED, MLP), dtype, rngs)
        self.fc2 = layers.dense(ffn_dim, d_model, (MLP, EMBED), dtype, rngs)
        self.final_layer_norm = _layer_norm(d_model, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.activation_dropout = nnx.Dropout(
            config.activation_dropout, deterministic=True, rngs=rngs
        )

    def pre_norm(self, x: Array, norm: nnx.LayerNorm) -> Array:
        return norm(x) if self.normalize_before else x

    def add_residual(self, x: Array, update: Array, norm: nnx.LayerNorm) -> Array:
        x = x + self.dropout(update)
        return x if self.normalize_before else norm(x)

    def feed_forward(self, x: Array) -> Array:
        """x (B, T, H) -> (B, T, H), residual included."""
        h = self.pre_norm(x, self.final_layer_norm)
        h = self.activation_dropout(self.activation(self.fc1(h)))  # (B, T, ffn)
        return self.add_residual(x, self.fc2(h), self.final_layer_norm)


class EncoderLayer(_Layer):
    def __init__(self, config: BartConfig, dtype, rngs: nnx.Rngs):
        super().__init__(config, config.encoder_ffn_dim, dtype, rngs)
        heads = config.encoder_attention_heads
        self.self_attn = Attention(config.d_model, heads, config.attention_dropout, dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(config.d_model, dtype, rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        """x (B, S, H), mask (B, 1, S) -> (B, S, H)."""
        h = self.pre_norm(x, self.self_attn_layer_norm)
        h = self.self_attn(h, self.self_attn.keys_values(h), mask)  # (B, S, H)
        x = self.add_residual(x, h, self.self_attn_layer_norm)
        return self.feed_forward(x)


class _Stack(nnx.Module):
    """Positions, layernorm_embedding and (mBART) the final layer_norm around a layer stack."""

    def __init__(self, config: BartConfig, dtype, remat: bool, rngs: nnx.Rngs):
        n_positions = config.max_position_embeddings + POSITION_OFFSET
        self.embed_positions = layers.embed(n_positions, config.d_model, None, dtype, rngs)
        self.layernorm_embedding = _layer_norm(config.d_model, dtype, rngs)
        # mBART normalises the output of the last pre-LN layer; BART's post-LN layers already do.
        self.layer_norm = (
            _layer_norm(config.d_model, dtype, rngs) if config.normalize_before else None
        )
        self.dropout = nnx.Dropout(config.dropout, deterministic=True, rngs=rngs)
        self.max_positions = config.max_position_embeddings
        self.remat = remat

    def embed(self, token_embeddings: Array, positions: Array) -> Array:
        """token_embeddings (B, T, H) + learned positions (T,) -> normalised (B, T, H)."""
        x = token_embeddings + self.embed_positions(positions + POSITION_OFFSET)  # (B, T, H)
        return self.dropout(self.layernorm_embedding(x))

    def final_norm(self, x: Array) -> Array:
        return x if self.layer_norm is None else self.layer_norm(x)

    def run(self, layer_call: Callable) -> Callable:
        """The layer's __call__, rematerialised in the backward pass when remat=True."""
        return layers.maybe_remat(layer_call, self.remat)

    def check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings {self.max_positions}"
            )


class Encoder(_Stack):
    def __init__(self, config: BartConfig, dtype, remat: bool, rngs: nnx.Rngs):
        super().__init__(config, dtype, remat, rngs)
        self.layers = nnx.List(
            [EncoderLayer(config, dtype, rngs) for _ in range(config.encoder_layers)]
        )

    def __call__(self, token_embeddings: Array, attention_mask: Array) -> Array:
        """token_embeddings (B, S, H), attention_mask (B, S) bool -> hidden states (B, S, H)."""
        S = token_embeddings.shape[1]
        self.check_length(S)
        x = self.embed(token_embeddings, jnp.arange(S))  # (B, S, H)
        mask = attention_mask[:, None, :]  # (B, 1, S): every query sees the real keys
        for layer in self.layers:
            x = self.run(EncoderLayer.__call__)(layer, x, mask)
        return self.final_norm(x)


class DecoderLayer(_Layer):
    def __init__(self, config: BartConfig, dtype, rngs: nnx.Rngs):
        super().__init__(config, config.decoder_ffn_dim, dtype, rngs)
        d, heads, p = config.d_model, config.decoder_attention_heads, config.attention_dropout
        self.self_attn = Attention(d, heads, p, dtype, rngs)
        self.self_attn_layer_norm = _layer_norm(d, dtype, rngs)
        self.encoder_attn = Attention(d, heads, p, dtype, rngs)
        self.encoder_attn_layer_norm = _layer_norm(d, dtype, rngs)

    def __call__(
        self,
        x: Array,
        self_mask: Array,
        memory: KeyValue,
        memory_mask: Array,
        cache: KeyValue | None,
        end_index: Array | None,
    ) -> tuple[Array, KeyValue | None]:
        """x (B, T, H) -> (B, T, H) and the cache with this step's keys/values written in.

        self_mask: (B|1, T, T) without cache, (1, T, max_len) with one; memory: cross-attention
        K/V (B, S, n, hd) with memory_mask (B, 1, S); cache: (B, max_len, n, hd) or None.
        """
        h = self.pre_norm(x, self.self_attn_layer_norm)
        kv = self.self_attn.keys_values(h)  # (B, T, n, hd)
        if cache is not None:
            kv = cache = cache.write(kv, end_index)  # (B, max_len, n, hd)
        x = self.add_residual(x, self.self_attn(h, kv, self_mask), self.self_attn_layer_norm)
        h = self.pre_norm(x, self.encoder_attn_layer_norm)
        h = self.encoder_attn(h, memory, memory_mask)  # (B, T, H)
        x = self.add_residual(x, h, self.encoder_attn_layer_norm)
        return self.feed_forward(x), cache


class Decoder(_Stack):
    def __init__(self, config: BartConfig, dtype, remat: bool, rngs: nnx.Rngs):
        super().__init__(config, dtype, remat, rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype, rngs) for _ in range(config.decoder_layers)]
        )

    def __call__(
        self,
        token_embeddings: Array,
        positions: Array,
        self_mask: Array,
        memory: EncoderMemory,
        cache: DecodeCache | None = None,
    ) -> tuple[Array, DecodeCache | None]:
        """token_embeddings (B, T, H) at positions (T,) -> hidden states (B, T, H), new cache."""
        x = self.embed(token_embeddings, positions)  # (B, T, H)
        memory_mask = memory.mask[:, None, :]  # (B, 1, S)
        end_index = None if cache is None else cache.end_index
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache = self.run(DecoderLayer.__call__)(
                layer, x, self_mask, memory.layers[i], memory_mask, layer_cache, end_index
            )
            new_layers.append(layer_cache)
        if cache is not None:
            cache = DecodeCache(tuple(new_layers), cache.end_index + token_embeddings.shape[1])
        return self.final_norm(x), cache


class Bart(nnx.Module):
    """BartForConditionalGeneration: encoder, decoder, LM head tied to the token embeddings.

    Params are float32; ``dtype`` is the compute dtype (e.g. jnp.bfloat16; softmax, LayerNorm
    statistics and logits stay float32). ``remat=True`` recomputes each layer in the backward
    pass instead of storing its activations. Dropout is off until ``model.train()``.
    """

    def __init__(
        self, config: BartConfig, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs
    ):
        self.config = config
        self.shared = layers.embed(config.vocab_size, config.d_model, VOCAB, dtype, rngs)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.encoder = Encoder(config, dtype, remat, rngs)
        self.decoder = Decoder(config, dtype, remat, rngs)
        self.final_logits_bias = Buffer(jnp.zeros((config.vocab_size,), jnp.float32), **axes(VOCAB))

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
    ) -> Array:
        """Teacher-forced logits.

        Args:
          input_ids, attention_mask: source tokens and 1/True on real ones, (B, S).
          decoder_input_ids: decoder inputs (B, T) (targets shifted right, starting with
            decoder_start_token_id); decoder_attention_mask: (B, T), default all ones.

        Returns:
          logits (B, T, V) float32.
        """
        encoder_hidden = self.encode(input_ids, attention_mask)  # (B, S, H)
        memory = self.encoder_memory(encoder_hidden, attention_mask)
        T = decoder_input_ids.shape[1]
        self.decoder.check_length(T)
        positions = jnp.arange(T)
        self_mask = (positions[None, :] <= positions[:, None])[None]  # (1, T, T) causal
        if decoder_attention_mask is not None:
            self_mask = self_mask & decoder_attention_mask.astype(bool)[:, None, :]  # (B, T, T)
        hidden, _ = self.decoder(self.embed(decoder_input_ids), positions, self_mask, memory)
        return self.logits(hidden)

    def embed(self, token_ids: Array) -> Array:
        """(B, T) int -> (B, T, H), scaled by sqrt(d_model) when scale_embedding."""
        return self.shared(token_ids) * self.embed_scale

    def logits(self, hidden: Array) -> Array:
        """(B, T, H) -> (B, T, V) float32: the tied LM head plus final_logits_bias."""
        embedding = self.shared.embedding[...].astype(hidden.dtype)  # (V, H)
        logits = precision.einsum("bth,vh->btv", hidden, embedding, out_dtype=jnp.float32)
        return logits + self.final_logits_bias[...]

    def encode(self, input_ids: Array, attention_mask: Array) -> Array:
        """input_ids, attention_mask (R, S) -> encoder hidden states (R, S, H)."""
        return self.encoder(self.embed(input_ids), attention_mask.astype(bool))

    def encoder_memory(self, encoder_hidden: Array, attention_mask: Array) -> EncoderMemory:
        """Cross-attention keys/values of every decoder layer, computed once per source.

        encoder_hidden (R, S, H), attention_mask (R, S) -> EncoderMemory with K/V
        (R, S, n_heads, head_dim) per layer. Repeat or gather its rows for beams/documents.
        """
        layers = tuple(
            layer.encoder_attn.keys_values(encoder_hidden) for layer in self.decoder.layers
        )
        return EncoderMemory(layers=layers, mask=attention_mask.astype(bool))

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> DecodeCache:
        """An empty cache for up to max_len decoder positions, K/V (R, max_len, n, hd) zeros."""
        self.decoder.check_length(max_len)
        config = self.config
        heads = config.decoder_attention_heads
        shape = (batch_size, max_len, heads, config.d_model // heads)
        dtype = dtype or self.shared.dtype or jnp.float32
        layers = tuple(
            KeyValue(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(config.decoder_layers)
        )
        return DecodeCache(layers=layers, end_index=jnp.zeros((), jnp.int32))

    def decode_step(
        self, token_ids: Array, cache: DecodeCache, memory: EncoderMemory
    ) -> tuple[Array, DecodeCache]:
        """Decodes token_ids (R, T) at positions end_index .. end_index+T-1 (usually T = 1).

        Returns logits (R, T, V) float32 and the cache with these positions written in. Equal
        to the teacher-forced logits at the same positions. Writing past max_len is not checked
        (positions are traced); size the cache for the longest output.
        """
        T = token_ids.shape[1]
        max_len = cache.layers[0].key.shape[1]
        positions = cache.end_index + jnp.arange(T)  # (T,)
        self_mask = (jnp.arange(max_len)[None, :] <= positions[:, None])[None]  # (1, T, max_len)
        hidden, cache = self.decoder(self.embed(token_ids), positions, self_mask, memory, cache)
        return self.logits(hidden), cache
