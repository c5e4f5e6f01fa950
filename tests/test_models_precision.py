"""Under bf16 compute every matrix product of the models sums in float32.

(How close bf16 outputs stay to float32 is tested in test_bert.py and test_bart.py.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rag_jax.models import precision
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, BertEncoder


def _dot_output_types(fn, *args) -> list[str]:
    """preferred_element_type of every dot_general in fn's jaxpr, nested jaxprs included."""
    text = str(jax.make_jaxpr(fn)(*args))
    return re.findall(r"dot_general\[.*?preferred_element_type=(\w+)", text, flags=re.DOTALL)


def _bert_forward(dtype):
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        projection_dim=16,
        dtype=dtype,
    )
    model = BertEncoder(config, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 7), jnp.int32)
    return lambda: model.embed(ids, jnp.ones_like(ids))


def _bart_forward(dtype):
    config = BartConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
    )
    model = Bart(config, dtype=dtype, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 7), jnp.int32)
    return lambda: model(ids, jnp.ones_like(ids), ids[:, :5])


@pytest.mark.parametrize("make_forward", [_bert_forward, _bart_forward], ids=["bert", "bart"])
def test_bf16_matmuls_accumulate_in_float32(make_forward):
    output_types = _dot_output_types(make_forward(jnp.bfloat16))
    # BERT: 8 per layer (6 projections, 2 attention products) + DPR's projection; BART more.
    assert len(output_types) >= 17
    assert set(output_types) == {"float32"}, output_types


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
