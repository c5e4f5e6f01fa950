"""bf16 compute: parameters and optimizer state stay float32; the loss stays near float32's."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax.builders import build_model
from rag_jax.data import read_qa
from rag_jax.host_retrieval import BatchBuilder
from rag_jax.index import KnowledgeSource
from rag_jax.optim import make_optimizer, trainable
from rag_jax.sharding import make_mesh, place_on_mesh, shard_batch
from rag_jax.training import train_step
from tests.test_training import tiny_config, toy  # noqa: F401 (fixture)


def first_steps(config, n_steps: int = 2, wrt=None):
    """Losses of the first steps on the same questions, and the state after them (``wrt``: the
    parameters trained, default ``trainable(config)``)."""
    mesh = make_mesh(config)
    model, question_tokenizer, generator_tokenizer = build_model(config)
    tx, _ = make_optimizer(config)
    optimizer = place_on_mesh(model, tx, mesh, config, trainable(config) if wrt is None else wrt)
    builder = BatchBuilder(
        model.config, question_tokenizer, generator_tokenizer, model.generator.config,
        knowledge=KnowledgeSource(config.data.index),
        embed_fn=model.embed_questions,
    )  # fmt: skip
    examples, _ = read_qa(config.data.train)
    losses = []
    with jax.set_mesh(mesh):
        for step in range(n_steps):
            host = builder(examples[step * config.batch_size : (step + 1) * config.batch_size])
            metrics = train_step(model, optimizer, shard_batch(host.batch, mesh))
            losses.append(float(metrics["loss"]))
    return losses, model, optimizer


def test_bf16_compute_keeps_float32_state_and_a_close_loss(toy):  # noqa: F811
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
