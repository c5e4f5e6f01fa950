"""make_optimizer: the query encoder's learning rate is a fraction of the generator's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from rag_jax.training import make_optimizer


class TwoParts(nnx.Module):
    def __init__(self):
        self.query_encoder = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.generator = nnx.Linear(3, 3, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("factor", [0.0, 0.1, 1.0])
def test_query_encoder_step_is_scaled(factor):
    config = tiny.get_config()
    config.optimizer.query_encoder_lr_factor = factor
    config.optimizer.warmup_steps = 0
    model = TwoParts()
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    tx, _ = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(2):  # the first step has learning rate 0 (warmup starts from 0)
        optimizer.update(model, grads)
    q_step = np.asarray(model.query_encoder.kernel[...]) - before["query_encoder"]["kernel"]
    g_step = np.asarray(model.generator.kernel[...]) - before["generator"]["kernel"]
    assert np.all(g_step < 0)  # a step against the gradient
    np.testing.assert_allclose(q_step, factor * g_step, rtol=1e-5, atol=1e-8)
