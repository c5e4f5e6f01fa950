"""make_optimizer: each module's learning rate is its own fraction of the schedule."""

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
@pytest.mark.parametrize("module", ["query_encoder", "generator"])
def test_module_step_is_scaled(module, factor):
    config = tiny.get_config()
    config.optimizer[f"{module}_lr_factor"] = factor
    config.optimizer.warmup_steps = 0
    model = TwoParts()
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    tx, _ = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(2):  # the first step has learning rate 0 (warmup starts from 0)
        optimizer.update(model, grads)
    steps = {
        name: np.asarray(getattr(model, name).kernel[...]) - before[name]["kernel"]
        for name in ("query_encoder", "generator")
    }
    other = steps["generator" if module == "query_encoder" else "query_encoder"]
    assert np.all(other < 0)  # a full step against the gradient
    # atol: one float32 ulp of a weight near 1 (the step is read back as after - before)
    np.testing.assert_allclose(steps[module], factor * other, rtol=1e-5, atol=2e-7)
