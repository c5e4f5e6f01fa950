"""Parameters are created or loaded directly into their shardings: ``build_model(config, mesh)``
gives every variable its ``param_shardings`` layout and the values ``build_model(config)`` gives
on one device; ``load_trained`` restores a checkpoint into the same layout."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from rag_jax.builders import build_model
from rag_jax.models import partitioning
from rag_jax.sharding import make_mesh, param_rules
from tests.toy import jitted, tiny_encoder

# 4 devices (tests/conftest.py) as (data=2, fsdp=2): kernels split in half over fsdp.
MESH = {"data": 2, "fsdp": 2}


def config_for(encoder, generator: str, fsdp_params: bool):
    config = tiny.get_config()
    config.model.question_encoder = str(encoder)
    config.mesh.update(**MESH, fsdp_params=fsdp_params)
    config.model.generator_init.update(
        d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64
    )
    if generator == "warm_start":
        config.model.generator_warm_start = str(encoder)
    return config


def flat(state) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("fsdp_params", [True, False])
@pytest.mark.parametrize("generator", ["random", "warm_start", "loaded"])
def test_build_model_on_a_mesh_creates_each_parameter_in_its_shards(
    tmp_path, caplog, generator, fsdp_params
):
    encoder = tiny_encoder(tmp_path / "encoder")  # hidden 16, 1 layer, ffn 32, 2 heads
    config = config_for(encoder, "random" if generator == "loaded" else generator, fsdp_params)
    if generator == "loaded":  # a BART checkpoint directory
        from rag_jax.models import save_bart

        save_bart(build_model(config)[0].generator, tmp_path / "bart")
        config.model.generator = str(tmp_path / "bart")
        config.model.generator_tokenizer = str(encoder)
    mesh = make_mesh(config)
    assert mesh.devices.shape == (2, 2)

    on_mesh, _, _ = build_model(config, mesh)
    reference, _, _ = build_model(config)  # the default device

    expected = flat(partitioning.param_shardings(nnx.state(on_mesh), mesh, param_rules(config)))
    got, values = flat(nnx.state(on_mesh, nnx.Param)), flat(nnx.state(reference, nnx.Param))
    assert got.keys() == values.keys()
    n_split = 0
    for name, array in got.items():
        assert array.sharding.is_equivalent_to(expected[name], array.ndim), name
        shard_shapes = {shard.data.shape for shard in array.addressable_shards}
        n_split += shard_shapes != {array.shape}
        value = np.asarray(values[name])
        if "embed_positions" in name and generator == "warm_start":
            # rows below BART's position offset are never read; each build draws its own
            value, array = value[2:], array[2:]
        # a random initialiser under jit may round its last bit differently from eager
        np.testing.assert_allclose(np.asarray(array), value, rtol=1e-6, atol=1e-9, err_msg=name)
    # FSDP: every kernel is split over the fsdp axis; replicated: every parameter whole
    assert n_split > len(got) // 2 if fsdp_params else n_split == 0
    if generator == "random":
        # Built again: the initialiser traced and compiled for the first build is reused, and
        # the new model has its own buffers (a train step donates them) with the same values.
        with jitted(caplog) as names:
            again = flat(nnx.state(build_model(config, mesh)[0], nnx.Param))
        assert "create" not in names
        for name, array in again.items():
            first = got[name].addressable_shards[0].data
            assert array.addressable_shards[0].data.unsafe_buffer_pointer() != (
                first.unsafe_buffer_pointer()
            ), name
            np.testing.assert_array_equal(np.asarray(array), np.asarray(got[name]), err_msg=name)


def test_the_suites_tiny_runs_use_the_devices_they_say(toy):
    """tests/toy.py: tiny_config trains on one device, ON_MESH on all four of conftest's, and
    devices_env(1)'s subprocesses see one device, compiled at the suite's XLA optimization
    level unless asked for XLA's default (the CI demo)."""
    import os
    import subprocess
    import sys

    from tests.toy import ON_MESH, devices_env, tiny_config

    assert jax.device_count() == 4
    assert make_mesh(tiny_config(toy)).devices.size == 1
    assert make_mesh(tiny_config(toy, **ON_MESH)).devices.size == 4
    level = "--xla_backend_optimization_level=0"
    assert level in os.environ["XLA_FLAGS"].split()
    assert level in devices_env(1)["XLA_FLAGS"].split()
    assert "optimization_level" not in devices_env(1, default_optimization=True)["XLA_FLAGS"]
    code = "import jax; print(jax.device_count())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=devices_env(1), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"
