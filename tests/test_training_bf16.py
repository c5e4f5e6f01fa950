"""bf16 compute: parameters and optimizer state stay float32; the loss stays near float32's."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.toy import first_steps, tiny_config


def test_bf16_compute_keeps_float32_state_and_a_close_loss(toy):
    overrides = {"mesh.fsdp": 1, "rag.n_docs": 4}
    losses32, _, _ = first_steps(tiny_config(toy, **overrides))
    losses16, model, optimizer = first_steps(tiny_config(toy, **overrides, **{"model.bf16": True}))
    assert np.all(np.isfinite(losses16))
    np.testing.assert_allclose(losses16, losses32, rtol=1e-2)
    assert losses16 != losses32  # the compute did run in bf16
    dtypes = {
        leaf.dtype
        for leaf in jax.tree.leaves((nnx.state(model), nnx.state(optimizer)))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    assert dtypes == {jnp.dtype("float32")}
