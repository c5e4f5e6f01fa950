"""A BART generator warm-started from a BERT checkpoint (Rothe et al., 2020, "BERT2BERT").

When no pretrained seq2seq model is at hand, a BERT's weights still give a generator a head
start: BERT's post-LN layer is BART's encoder layer (self-attention, residual, LayerNorm,
GELU feed-forward, residual, LayerNorm), so a BART whose encoder layers are BERT's first layers
computes exactly BERT's hidden states (up to LayerNorm's epsilon). The decoder's self-attention
and feed-forward blocks come from the same BERT layers. Its cross-attention has no BERT
counterpart; Rothe et al. initialise it randomly, here it starts by default as a copy of the
same layer's self-attention: BERT's heads that attend to the next and previous positions then
serve as ready-made copy heads, and a generator that must copy titles from its input learns to
far sooner (the demo's warm-up, README). The token embeddings (tied to the LM head)
are BERT's word embeddings; the learned positions are BERT's position embeddings plus its
segment-0 embedding, which BERT adds to every token. Shapes: V vocabulary, H hidden size.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax import numpy as jnp
from jax.sharding import Mesh

from rag_jax.models import partitioning
from rag_jax.models.bart import POSITION_OFFSET, Bart, BartConfig
from rag_jax.models.bert import BertModel
from rag_jax.models.hf_io import module_params

# BART layer module <- BERT layer module (both post-LN, the same sublayer order).
_ATTENTION_MODULES = {
    "self_attn.q_proj": "attention.query",
    "self_attn.k_proj": "attention.key",
    "self_attn.v_proj": "attention.value",
    "self_attn.out_proj": "attention.out",
}
_LAYER_MODULES = {
    **_ATTENTION_MODULES,
    "self_attn_layer_norm": "attention_norm",
    "fc1": "mlp_in",
    "fc2": "mlp_out",
    "final_layer_norm": "mlp_norm",
}


def check_warm_start_shapes(bert: BertModel, config: BartConfig) -> None:
    """Raises ValueError naming the BartConfig field that BERT's weights cannot fill."""
    b = bert.config
    required = {
        "vocab_size": b.vocab_size,
        "d_model": b.hidden_size,
        "encoder_attention_heads": b.num_attention_heads,
        "decoder_attention_heads": b.num_attention_heads,
        "encoder_ffn_dim": b.intermediate_size,
        "decoder_ffn_dim": b.intermediate_size,
        "activation_function": b.hidden_act,
        "normalize_before": False,
        "scale_embedding": False,
    }
    for field, value in required.items():
        if getattr(config, field) != value:
            raise ValueError(
                f"generator {field}={getattr(config, field)!r} cannot be warm-started from a "
                f"BERT with {value!r}; set {field}={value!r}"
            )
    upper = {
        "encoder_layers": b.num_hidden_layers,
        "decoder_layers": b.num_hidden_layers,
        "max_position_embeddings": b.max_position_embeddings,
    }
    for field, limit in upper.items():
        if getattr(config, field) > limit:
            raise ValueError(
                f"generator {field}={getattr(config, field)} exceeds the BERT's {limit}"
            )


def warm_start_values(
    bert: BertModel, config: BartConfig, cross_attention_from_bert: bool = True
) -> dict[str, np.ndarray]:
    """{BART NNX path: value} for every BART parameter BERT's weights provide.

    Missing from the result (they keep their initialisation): the decoder's cross-attention
    LayerNorm, the cross-attention itself unless ``cross_attention_from_bert``, and the two
    position rows below ``POSITION_OFFSET``.
    """
    check_warm_start_shapes(bert, config)
    decoder_modules = dict(_LAYER_MODULES)
    if cross_attention_from_bert:
        decoder_modules.update(
            {k.replace("self_attn", "encoder_attn"): v for k, v in _ATTENTION_MODULES.items()}
        )
    src = module_params(bert)
    n = config.max_position_embeddings
    positions = src["embeddings.position.embedding"][:n] + src["embeddings.token_type.embedding"][0]
    values = {"shared.embedding": src["embeddings.word.embedding"]}
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        values[f"{stack}.embed_positions.embedding"] = positions  # rows from POSITION_OFFSET
        for leaf in ("scale", "bias"):
            values[f"{stack}.layernorm_embedding.{leaf}"] = src[f"embeddings.norm.{leaf}"]
        modules = decoder_modules if stack == "decoder" else _LAYER_MODULES
        for i in range(n_layers):
            for bart_module, bert_module in modules.items():
                for leaf in ("kernel", "bias", "scale"):
                    source = f"layers.{i}.{bert_module}.{leaf}"
                    if source in src:
                        values[f"{stack}.layers.{i}.{bart_module}.{leaf}"] = src[source]
    return values


def bart_from_bert(
    bert: BertModel,
    config: BartConfig,
    *,
    dtype=jnp.float32,
    remat: bool = False,
    cross_attention_from_bert: bool = True,
    rngs: nnx.Rngs,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_RULES,
) -> Bart:
    """A ``Bart(config)`` initialised from ``bert`` as the module docstring describes.

    Args:
      bert: the BERT to copy (``BertEncoder.bert``); it is not modified.
      config: the generator's shape. Must match BERT's vocabulary, hidden size, heads,
        feed-forward size and activation, be post-LN without embedding scaling, and use at
        most BERT's number of layers (encoder and decoder each take BERT's first layers) and
        positions.
      dtype, remat: as for ``Bart``.
      cross_attention_from_bert: the decoder's cross-attention starts as a copy of its
        self-attention (BERT's); False: randomly initialised, as in Rothe et al.
      rngs: initialises what BERT does not provide.
      mesh: a ``(data, fsdp)`` mesh: the BART is created directly into its shards
        (``partitioning.create_sharded``) and each copied weight goes into them; None: the
        default device. ``bert`` may be on the default device (each process's own copy).
      rules: logical axes -> mesh axes, as for ``partitioning.param_shardings``.

    Raises:
      ValueError: a ``config`` field BERT's weights cannot fill, named.
    """
    values = warm_start_values(bert, config, cross_attention_from_bert)
    if mesh is None:
        bart = Bart(config, dtype=dtype, remat=remat, rngs=rngs)
    else:
        key_data = np.asarray(jax.random.key_data(rngs.params()))  # equal on every process

        def make() -> Bart:
            key = jax.random.wrap_key_data(key_data)
            return Bart(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(key))

        bart = partitioning.create_sharded(make, mesh, rules)
    targets = {
        ".".join(map(str, path)): variable
        for path, variable in nnx.to_flat_state(nnx.state(bart, nnx.Param))
    }
    for path, value in values.items():
        variable = targets[path]
        old = variable.get_value()
        new = partitioning.put(np.asarray(value, old.dtype), old.sharding)
        if path.endswith("embed_positions.embedding"):  # rows from POSITION_OFFSET on
            new = jax.jit(
                lambda old, rows: old.at[POSITION_OFFSET:].set(rows), out_shardings=old.sharding
            )(old, new)
        variable.set_value(new)
    return bart
