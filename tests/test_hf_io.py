"""Hugging Face checkpoint I/O: reading configs and weights, filling modules, atomic saving."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from rag_jax.models import hf_io, layers, partitioning
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, BertEncoder
from rag_jax.models.hf_bart import load_bart, save_bart
from rag_jax.models.hf_bert import load_bert_encoder, save_bert_encoder
from rag_jax.models.hf_io import (
    CheckpointError,
    assign_params,
    module_params,
    read_hf_config,
    read_state_dict,
    save_hf_checkpoint,
)
from tests.oracles import TINY_BERT


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.dense.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "encoder.dense.bias": rng.normal(size=(3,)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 3)).astype(np.float32),
    }


def _assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value)


class TwoLayers(nnx.Module):
    def __init__(self):
        self.first = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.second = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(1))


# --- read_hf_config ------------------------------------------------------------------------------


def test_read_hf_config_and_rag_sub_config(tmp_path):
    config = {"model_type": "rag", "question_encoder": {"model_type": "dpr"}, "generator": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_hf_config(tmp_path) == config
    assert read_hf_config(tmp_path, part="question_encoder") == {"model_type": "dpr"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"no 'generator' sub-config.*model_type='bert'"):
        read_hf_config(tmp_path, part="generator")


def test_read_hf_config_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory '{tmp_path / 'nope'}'"):
        read_hf_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"no config.json in .*'{tmp_path}'"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert",')
    with pytest.raises(CheckpointError, match=r"config\.json' is not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        read_hf_config(tmp_path)


# --- read_state_dict -----------------------------------------------------------------------------


def test_read_safetensors_and_prefix(tmp_path):
    weights = _weights()
    save_file(weights, tmp_path / "model.safetensors")
    _assert_same(read_state_dict(tmp_path), weights)
    _assert_same(
        read_state_dict(tmp_path, prefix="encoder."),
        {
            "dense.weight": weights["encoder.dense.weight"],
            "dense.bias": weights["encoder.dense.bias"],
        },
    )
    with pytest.raises(
        CheckpointError, match=r"no weights under prefix 'generator\.'.*'encoder\.'"
    ):
        read_state_dict(tmp_path, prefix="generator.")


def test_prefix_also_matches_behind_rag_wrapper(tmp_path):
    # Rag*ForGeneration saves RagModel's weights under "rag.".
    weights = {"rag.question_encoder.x": np.ones(2, np.float32), "rag.generator.y": np.zeros(3)}
    save_file(weights, tmp_path / "model.safetensors")
    _assert_same(read_state_dict(tmp_path, prefix="generator."), {"y": np.zeros(3)})


def test_read_sharded_safetensors(tmp_path):
    weights = _weights()
    save_file(
        {"head.weight": weights["head.weight"]}, tmp_path / "model-00002-of-00002.safetensors"
    )
    rest = {k: v for k, v in weights.items() if k != "head.weight"}
    save_file(rest, tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in rest}
    weight_map["head.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(read_state_dict(tmp_path), weights)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"model-00002-of-00002\.safetensors' from the index"
    ):
        read_state_dict(tmp_path)


def test_read_pytorch_bin_with_bfloat16(tmp_path):
    weights = _weights()
    state_dict = {k: torch.from_numpy(v) for k, v in weights.items()}
    state_dict["half"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    loaded = read_state_dict(tmp_path)
    assert loaded["half"].dtype == np.float32
    _assert_same(loaded, {**weights, "half": np.array([1.5, -2.0], np.float32)})


def test_safetensors_preferred_over_pytorch_bin(tmp_path):
    save_file(_weights(0), tmp_path / "model.safetensors")
    torch.save(
        {k: torch.from_numpy(v) for k, v in _weights(1).items()}, tmp_path / "pytorch_model.bin"
    )
    _assert_same(read_state_dict(tmp_path), _weights(0))


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_pytorch_bin_never_runs_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as file:
        pickle.dump({"weight": _RunsCodeWhenUnpickled()}, file, protocol=2)
    with pytest.raises(CheckpointError, match=r"cannot read PyTorch file .*pytorch_model\.bin"):
        read_state_dict(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_read_state_dict_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*expected one of \('model.safe"):
        read_state_dict(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        read_state_dict(tmp_path)


# --- assign_params / module_params ---------------------------------------------------------------


def test_assign_params_sets_every_parameter_and_casts():
    model = TwoLayers()
    rng = np.random.default_rng(0)
    params = {
        "first.kernel": rng.normal(size=(4, 3)),  # float64: cast to the param's float32
        "first.bias": rng.normal(size=(3,)).astype(np.float32),
        "second.kernel": rng.normal(size=(3, 2)).astype(np.float32),
    }
    assign_params(model, params)
    loaded = module_params(model)
    assert {k: v.dtype for k, v in loaded.items()} == dict.fromkeys(params, np.float32)
    for key, value in params.items():
        np.testing.assert_allclose(loaded[key], value, rtol=1e-6)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    expected = (x @ params["first.kernel"] + params["first.bias"]) @ params["second.kernel"]
    np.testing.assert_allclose(model.second(model.first(x)), expected, rtol=1e-5)


def test_assign_params_reports_all_problems_at_once_and_changes_nothing():
    model = TwoLayers()
    before = module_params(model)
    params = {
        "first.kernel": np.zeros((3, 4), np.float32),  # transposed
        "second.kernel": np.zeros((3, 2), np.float32),
        "second.bias": np.zeros((2,), np.float32),  # the layer has no bias
    }
    with pytest.raises(CheckpointError) as error:
        assign_params(
            model, params, source="file.safetensors", source_names={"first.bias": "fc1.bias"}
        )
    message = str(error.value)
    assert "file.safetensors does not match TwoLayers (1 missing, 1 unexpected, 1 mis-shaped)" in (
        message
    )
    assert "missing parameters:\n  first.bias (checkpoint key 'fc1.bias')" in message
    assert "unexpected parameters:\n  second.bias" in message
    assert "first.kernel: module expects (4, 3), file.safetensors has (3, 4)" in message
    _assert_same(module_params(model), before)


# --- save_hf_checkpoint --------------------------------------------------------------------------


def test_save_then_read_back(tmp_path):
    target = tmp_path / "deep" / "ckpt"
    weights = _weights()
    save_hf_checkpoint(target, weights, {"model_type": "bert"}, extra_files={"a/b.json": "{}"})
    _assert_same(read_state_dict(target), weights)
    assert read_hf_config(target) == {"model_type": "bert"}
    assert (target / "a" / "b.json").read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700
    target.chmod(0o750)
    save_hf_checkpoint(target, weights, {"model_type": "bert"})
    assert target.stat().st_mode & 0o777 == 0o750  # an overwrite keeps the permissions
    assert sorted(p.name for p in tmp_path.joinpath("deep").iterdir()) == ["ckpt"]  # no temp left


def test_overwrite_keeps_tokenizer_files_and_drops_old_weights(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "vocab.txt").write_text("[PAD]\n")
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text("old")
    (target / "1_Pooling" / "other.json").write_text("kept")
    torch.save({"old": torch.zeros(1)}, target / "pytorch_model.bin")
    save_hf_checkpoint(
        target, _weights(), {"model_type": "bert"}, extra_files={"1_Pooling/config.json": "new"}
    )
    assert sorted(p.name for p in target.iterdir()) == [
        "1_Pooling",
        "config.json",
        "model.safetensors",
        "vocab.txt",
    ]
    assert (target / "vocab.txt").read_text() == "[PAD]\n"
    assert (target / "1_Pooling" / "config.json").read_text() == "new"
    assert (target / "1_Pooling" / "other.json").read_text() == "kept"
    _assert_same(read_state_dict(target), _weights())


def _existing_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_hf_checkpoint(target, _weights(0), {"model_type": "bert"})
    return target


def _assert_untouched(target):
    _assert_same(load_file(target / "model.safetensors"), _weights(0))
    assert read_hf_config(target) == {"model_type": "bert"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]  # no temp dirs left


def test_failed_save_keeps_existing_checkpoint(tmp_path, monkeypatch):
    target = _existing_checkpoint(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_hf_checkpoint(target, _weights(1), {"model_type": "bert"})
    _assert_untouched(target)


def test_failed_swap_restores_existing_checkpoint(tmp_path, monkeypatch):
    target = _existing_checkpoint(tmp_path)
    real_rename = hf_io.os.rename

    def rename(source, destination):
        if ".tmp" in str(source):  # moving the new checkpoint into place fails
            raise OSError("simulated crash")
        real_rename(source, destination)

    monkeypatch.setattr(hf_io.os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_hf_checkpoint(target, _weights(1), {"model_type": "bert"})
    _assert_untouched(target)


def test_refuses_non_finite_weights_and_bad_config(tmp_path):
    target = _existing_checkpoint(tmp_path)
    bad = {**_weights(1), "head.weight": np.array([[np.nan, 1.0]], np.float32)}
    with pytest.raises(CheckpointError, match=r"non-finite values in \['head.weight'\]"):
        save_hf_checkpoint(target, bad, {"model_type": "bert"})
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_hf_checkpoint(target, _weights(1), {"dtype": np.float32})
    _assert_untouched(target)


# --- loading into an abstract model ------------------------------------------------------------


def _saved_models(tmp_path):
    """A tiny BERT encoder and BART saved in the Hugging Face layout, and the loaders' args."""
    bert_config = BertConfig(
        vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, projection_dim=4,
    )  # fmt: skip
    bart_config = BartConfig(
        vocab_size=40, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=12, decoder_ffn_dim=12,
        max_position_embeddings=16,
    )  # fmt: skip
    save_bert_encoder(BertEncoder(bert_config, rngs=nnx.Rngs(1)), tmp_path / "bert")
    bart = Bart(bart_config, rngs=nnx.Rngs(2))
    bart.final_logits_bias.set_value(jnp.arange(40, dtype=jnp.float32))
    save_bart(bart, tmp_path / "bart")
    return [(load_bert_encoder, tmp_path / "bert"), (load_bart, tmp_path / "bart")]


def test_loading_runs_no_random_initialisation(tmp_path, monkeypatch):
    loads = _saved_models(tmp_path)
    concrete_calls = []
    initializer = layers.INIT

    def counting_init(key, shape, dtype=jnp.float32):
        if not isinstance(key, jax.core.Tracer):  # computed, not only traced
            concrete_calls.append(shape)
        return initializer(key, shape, dtype)

    monkeypatch.setattr(layers, "INIT", counting_init)
    BertEncoder(BertConfig(**TINY_BERT), rngs=nnx.Rngs(0))
    assert concrete_calls, "the counter sees a random initialisation"
    concrete_calls.clear()
    for load, directory in loads:
        load(directory)
    assert concrete_calls == []


def test_load_into_a_mesh_equals_the_unsharded_load(tmp_path):
    mesh = partitioning.make_mesh(data=2)  # (data, fsdp) = (2, 2) over the 4 CPU devices
    for load, directory in _saved_models(tmp_path):
        unsharded, sharded = load(directory), load(directory, mesh=mesh)
        expected = nnx.to_flat_state(nnx.state(unsharded))
        actual = dict(nnx.to_flat_state(nnx.state(sharded)))
        split = 0
        for path, variable in expected:
            value, expected_value = actual[path].get_value(), variable.get_value()
            assert value.sharding.mesh == mesh, path
            split += "fsdp" in jax.tree.leaves(tuple(value.sharding.spec))
            if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
                value, expected_value = map(jax.random.key_data, (value, expected_value))
            np.testing.assert_array_equal(value, expected_value, err_msg=str(path))
        assert split >= 4  # the kernels are split over fsdp, not merely replicated
        assert jax.tree.map(lambda v: v.shape, nnx.state(sharded)) == jax.tree.map(
            lambda v: v.shape, nnx.state(unsharded)
        )
