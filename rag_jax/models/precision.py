"""Matrix products that accumulate in float32 whatever the compute dtype.

Under bf16 compute the models multiply bf16 operands but sum the products in float32, as GPUs
and TPUs do in hardware anyway. XLA has to be told (``preferred_element_type``): a plain bf16
``dot`` rounds to bf16 output, and on CPUs with AMX or AVX512-BF16 it takes a slower path
(figures: BENCHMARKS.md, Models). For float32 operands both functions are the plain product.
"""

import jax
import jax.numpy as jnp
from jax import Array


def dot_general(
    lhs: Array,
    rhs: Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> Array:
    """``jax.lax.dot_general`` summed in float32, returned in ``preferred_element_type`` or
    the operands' dtype. A drop-in ``dot_general`` for ``nnx.Linear``."""
    out = jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
        **kwargs,
    )
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def einsum(subscripts: str, *operands: Array, out_dtype=None) -> Array:
    """``jnp.einsum`` summed in float32, returned in ``out_dtype`` or the operands' dtype."""
    out = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or jnp.result_type(*operands))
