"""make_optimizer: each module's learning rate is its own fraction of the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from rag_jax.builders import build_model
from rag_jax.checkpoints import load_trained
from rag_jax.optim import make_optimizer, parameter_path, trainable
from tests.toy import first_steps, tiny_config


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


def test_frozen_parameters_never_change_and_count_in_no_norm():
    """``optimizer.freeze``: the matching parameters keep their values (AdamW's weight decay
    included), and their gradients do not shrink the others' step through the global norm."""

    def steps(freeze: str, generator_grad: float) -> dict:
        config = tiny.get_config()
        config.optimizer.freeze = freeze
        config.optimizer.warmup_steps = 0
        config.optimizer.weight_decay = 0.1
        config.optimizer.max_grad_norm = 1.0
        model = TwoParts()
        before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
        optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=nnx.Param)
        grads = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, generator_grad if "generator" in str(path) else 1.0),
            nnx.state(model, nnx.Param),
        )
        for _ in range(3):
            optimizer.update(model, grads)
        return {
            name: np.asarray(getattr(model, name).kernel[...]) - before[name]["kernel"]
            for name in ("query_encoder", "generator")
        }

    frozen = steps("^generator/", generator_grad=1e6)
    assert np.all(frozen["generator"] == 0)
    assert np.all(frozen["query_encoder"] < 0)
    # The query encoder moves as if the generator's (huge) gradients were not there at all.
    alone = steps("^generator/", generator_grad=0.0)
    np.testing.assert_array_equal(frozen["query_encoder"], alone["query_encoder"])
    # Without freezing, the same huge gradients scale the query encoder's gradient down 1e6-fold
    # in the global-norm clip; Adam's step is scale-free but for its epsilon, so it shows there.
    unfrozen = steps("", generator_grad=1e6)
    assert not np.allclose(unfrozen["query_encoder"], alone["query_encoder"], rtol=1e-3)


def test_freeze_must_be_a_regular_expression():
    config = tiny.get_config()
    config.optimizer.freeze = "generator/(shared"
    with pytest.raises(ValueError, match=r"optimizer\.freeze"):
        make_optimizer(config)


@pytest.mark.parametrize("marginalization", ["sequence", "closed_book"])
@pytest.mark.parametrize("freeze", ["", "^generator/"])
def test_trainable_leaves_out_frozen_parameters_and_a_closed_book_query_encoder(
    marginalization, freeze
):
    config = tiny.get_config()
    config.rag.marginalization = marginalization
    config.optimizer.freeze = freeze
    trained = {path[0] for path, _ in nnx.to_flat_state(nnx.state(TwoParts(), trainable(config)))}
    expected = {"query_encoder", "generator"}
    if freeze:
        expected.discard("generator")
    if marginalization == "closed_book":  # it never reads its query encoder
        expected.discard("query_encoder")
    assert trained == expected


def test_a_freeze_pattern_with_inline_flags_works_for_a_closed_book_model():
    config = tiny.get_config()
    config.rag.marginalization = "closed_book"
    config.optimizer.freeze = "(?i)^GENERATOR/"
    assert not nnx.to_flat_state(nnx.state(TwoParts(), trainable(config)))


# ``optimizer.freeze`` in the train step: frozen parameters are not differentiated and have
# no optimizer state, and the step is the one that computes every gradient and drops theirs.


FREEZE = "^generator/shared/"


def params(model) -> dict:
    state = nnx.state(model, nnx.Param)
    return {parameter_path(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(state)}


def test_frozen_parameters_have_no_gradient_and_no_moments(toy):
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


def test_a_checkpoint_lacking_variables_is_refused_by_load_trained(toy, tmp_path):
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
    with pytest.raises(ValueError, match=r"\d+ arrays of this model are not in it: model_rngs/"):
        load_trained(config, str(tmp_path))


def test_nonfinite_updates_are_never_applied_and_counted():
    """More non-finite gradients in a row than ``max_consecutive_nonfinite``: none changes a
    parameter or the optimizer's moments and schedule count (optax.apply_if_finite would apply
    the 6th); the counts say how many were skipped, in a row and in all; a finite update after
    them is applied and resets the streak."""
    from rag_jax.optim import applied_updates, nonfinite_updates, skipped_updates

    config = tiny.get_config()
    config.optimizer.warmup_steps = 0
    model = TwoParts()
    optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=nnx.Param)
    ones = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, ones)  # one finite update: moments and count not at their init
    params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    opt_state = jax.tree.map(np.array, nnx.state(optimizer.opt_state))
    n_bad = 3 * config.optimizer.max_consecutive_nonfinite
    for i in range(n_bad):
        bad = jnp.nan if i % 2 else jnp.inf  # one NaN or inf entry is enough
        poisoned = jax.tree_util.tree_map_with_path(
            lambda path, g, x=bad: g.at[(0,) * g.ndim].set(x) if "generator" in str(path) else g,
            ones,
        )
        optimizer.update(model, poisoned)
        assert nonfinite_updates(optimizer.opt_state) == (i + 1, i + 1)
    after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, params)
    moments = jax.tree.map(np.array, nnx.state(optimizer.opt_state))
    inner = lambda state: state["inner_state"]  # noqa: E731  the counters moved, nothing else
    jax.tree.map(np.testing.assert_array_equal, inner(moments), inner(opt_state))
    assert applied_updates(optimizer.opt_state) == 1
    optimizer.update(model, ones)
    assert nonfinite_updates(optimizer.opt_state) == (0, n_bad)
    assert skipped_updates(optimizer.opt_state) == n_bad
    assert applied_updates(optimizer.opt_state) == 2
    assert np.all(np.asarray(model.generator.kernel[...]) < params["generator"]["kernel"])
