"""The building blocks BERT and BART share, written once: activations, dense / embedding /
LayerNorm constructors, masked dot-product attention and per-layer rematerialisation.

Numerics follow PyTorch, so that both models match transformers: exact-erf GELU for "gelu",
LayerNorm's variance in two passes, masked keys at the float32 minimum. Parameters are float32
with logical axis names (``partitioning.axes``); ``dtype`` is the compute dtype. Shapes: B batch,
T query positions, S key positions, n heads, d head size.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rag_jax.models import precision
from rag_jax.models.partitioning import EMBED, axes, constrain_rows

Array = jax.Array

# Hugging Face names of the activation functions (``hidden_act``, ``activation_function``).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's exact erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

INIT = nnx.initializers.normal(0.02)  # BERT's initializer_range and BART's init_std


def dense(
    n_in: int, n_out: int, kernel_axes: tuple[str | None, str | None], dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    """``nnx.Linear`` with a float32 kernel (n_in, n_out) named by ``kernel_axes``, e.g.
    (EMBED, MLP), and a bias named by the output axis; products sum in float32."""
    return nnx.Linear(
        n_in,
        n_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=precision.dot_general,
        kernel_init=INIT,
        kernel_metadata=axes(*kernel_axes),
        bias_metadata=axes(kernel_axes[1]),
        rngs=rngs,
    )


def embed(
    n_rows: int, features: int, row_axis: str | None, dtype: Any, rngs: nnx.Rngs
) -> nnx.Embed:
    """``nnx.Embed`` with a float32 table (n_rows, features), rows named by ``row_axis``."""
    return nnx.Embed(
        n_rows,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=INIT,
        embedding_metadata=axes(row_axis, EMBED),
        rngs=rngs,
    )


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` whose input and output rows stay split over the batch axes of a
    training mesh (:func:`~rag_jax.models.partitioning.constrain_rows`): the same values."""

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        return constrain_rows(super().__call__(constrain_rows(x), mask=mask))


def layer_norm(features: int, epsilon: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis as ``torch.nn.LayerNorm`` computes it.

    The variance is E[(x - mean)²], a second pass over x. Flax's default E[x²] - mean² is one
    pass but cancels catastrophically when a row's mean is large against its spread: at 30x it
    is off by ~1e-4, above our parity tolerance, and pre-LN residual streams get there.
    Statistics are float32 whatever ``dtype``.
    """
    return LayerNorm(
        features,
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_metadata=axes(EMBED),
        bias_metadata=axes(EMBED),
        rngs=rngs,
    )


def dot_product_attention(
    query: Array, key: Array, value: Array, mask: Array, dropout: nnx.Dropout
) -> Array:
    """softmax(q kᵀ / sqrt(d), masked) v, per head.

    Args:
      query: (B, T, n, d).
      key, value: (B, S, n, d).
      mask: (B or 1, T or 1, S) bool, True where query t may attend to key s.
      dropout: on the attention probabilities (a no-op in eval mode).

    Returns:
      (B, T, n, d) in the compute dtype.
    """
    scale = query.shape[-1] ** -0.5
    # Scores and softmax in float32 even under bf16 compute: the row sums need it. Masked keys
    # get the float32 minimum, not -inf (as in torch), so a row with no key at all averages
    # the values uniformly instead of giving NaN.
    scores = precision.einsum("btnd,bsnd->bnts", query, key, out_dtype=jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)  # (B, n, T, S)
    probs = dropout(jax.nn.softmax(scores, axis=-1)).astype(value.dtype)  # (B, n, T, S)
    return precision.einsum("bnts,bsnd->btnd", probs, value)  # (B, T, n, d)


def maybe_remat(layer_call: Callable, enabled: bool) -> Callable:
    """``layer_call(layer, *args)``, recomputed in the backward pass when ``enabled`` (only the
    layer's inputs are kept between the passes).

    Tree mode (``graph=False``) also works when the model is ``nnx.merge``'d inside a plain
    ``jax.jit`` / ``jax.grad``, where graph-mode remat fails.
    """
    return nnx.remat(layer_call, graph=False) if enabled else layer_call
