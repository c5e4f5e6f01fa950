"""``optimizer.freeze`` in the train step: frozen parameters are not differentiated and have
no optimizer state, and the step is the one that computes every gradient and drops theirs."""

import jax
import numpy as np
import pytest
from flax import nnx

from rag_jax.builders import build_model
from rag_jax.checkpoints import load_trained
from rag_jax.optim import parameter_path
from tests.test_training import tiny_config, toy  # noqa: F401 (fixture)
from tests.test_training_bf16 import first_steps

FREEZE = "^generator/shared/"


def params(model) -> dict:
    state = nnx.state(model, nnx.Param)
    return {parameter_path(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(state)}


def test_frozen_parameters_have_no_gradient_and_no_moments(toy):  # noqa: F811
    config = tiny_config(toy, **{"mesh.fsdp": 1, "rag.n_docs": 4, "optimizer.freeze": FREEZE})
    start = params(build_model(config)[0])
    losses, model, optimizer = first_steps(config, n_steps=2)

    # The oracle: every parameter differentiated and given moments; the chain drops the frozen
    # ones' gradients and updates (make_optimizer's own freeze).
    oracle_losses, oracle_model, oracle_optimizer = first_steps(config, n_steps=2, wrt=nnx.Param)

    np.testing.assert_allclose(losses, oracle_losses, rtol=1e-6)
    assert losses[-1] != losses[0]
    ours, oracle = params(model), params(oracle_model)
    frozen = [path for path in ours if path.startswith("generator/shared/")]
    assert frozen == ["generator/shared/embedding"]
    for path, value in oracle.items():
        np.testing.assert_allclose(ours[path], value, atol=1e-6, err_msg=path)
    np.testing.assert_array_equal(ours[frozen[0]], start[frozen[0]])
    trained = "query_encoder/bert/embeddings/word/embedding"
    assert not np.array_equal(ours[trained], start[trained])

    def moment_paths(optimizer) -> set[str]:
        leaves = jax.tree.leaves_with_path(nnx.state(optimizer, nnx.OptState))
        return {parameter_path(p) for p, x in leaves if np.ndim(x) > 0}

    shape = ours[frozen[0]].shape
    assert not any("shared" in path for path in moment_paths(optimizer))
    assert any("shared" in path for path in moment_paths(oracle_optimizer))
    n_ours = sum(np.size(x) for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
    n_oracle = sum(np.size(x) for x in jax.tree.leaves(nnx.state(oracle_optimizer, nnx.OptState)))
    assert n_oracle - n_ours == 2 * np.prod(shape)  # Adam's two moments of the embedding


def test_a_checkpoint_lacking_variables_is_refused_by_load_trained(toy, tmp_path):  # noqa: F811
    """A checkpoint of an earlier layout (parameters only, no "model_rngs"): orbax's partial
    restore would hand back abstract leaves; load_trained names what is missing instead."""
    import orbax.checkpoint as ocp

    config = tiny_config(toy, **{"rag.n_docs": 4})
    model = build_model(config)[0]
    state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                position=ocp.args.JsonSave({"epoch": 0, "index": 0}),
            ),
        )
        manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"lacks \d+ of this model's variables.*model_rngs"):
        load_trained(config, str(tmp_path))
