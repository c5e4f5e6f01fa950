"""rag_jax.models.precision: products that sum in float32 whatever the operands' dtype.

That the models use them for every product is checked in test_bert.py and test_bart.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models import precision


def test_float32_products_are_the_plain_ones():
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 5, 8), (8, 4)))
    dims = (((2,), (0,)), ((), ()))
    np.testing.assert_array_equal(
        precision.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims)
    )
    np.testing.assert_array_equal(
        precision.einsum("btk,kv->btv", a, b), jnp.einsum("btk,kv->btv", a, b)
    )


def test_bf16_products_sum_in_float32_and_return_the_asked_dtype():
    # 4096 terms of 1 and one of 256: a bf16 running sum stops growing at 256 (its spacing there
    # is 2, so + 1 rounds away); a float32 sum gives 4352 exactly, which bf16 can represent.
    lhs = jnp.concatenate([jnp.ones(4096), jnp.array([256.0])]).astype(jnp.bfloat16)[None]
    rhs = jnp.ones((4097, 1), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    out = precision.dot_general(lhs, rhs, dims)
    assert out.dtype == jnp.bfloat16 and float(out[0, 0]) == 4352.0
    wide = precision.einsum("ik,kj->ij", lhs, rhs, out_dtype=jnp.float32)
    assert wide.dtype == jnp.float32 and float(wide[0, 0]) == 4352.0
