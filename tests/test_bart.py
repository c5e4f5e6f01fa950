"""BART generator vs transformers' PyTorch (M)BartForConditionalGeneration.

Oracles: the PyTorch models on identical random weights and padded batches (logits, encoder
states, gradients), our own teacher-forced pass for cached decoding, and transformers'
from_pretrained for saved checkpoints.

Compilation dominates this file's runtime, so the tests share a few jitted entry points and
batch shapes: (3, 12) sources, (3, 7) targets, and the configs of CASES.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from rag_jax.models import CheckpointError, partitioning
from rag_jax.models.bart import Bart, BartConfig, EncoderMemory
from rag_jax.models.hf_bart import hf_state_dict, load_bart, save_bart
from tests.oracles import PAD, TINY_BART, bart_config, bert_config, random_model, torch_forward

TOL = 1e-4
VOCAB = TINY_BART["vocab_size"]

decode_step = nnx.jit(Bart.decode_step)


@nnx.jit
def _forward(model: Bart, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
    encoder_hidden = model.encode(input_ids, attention_mask)
    logits = model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    return encoder_hidden, logits  # XLA computes the encoder once


def forward(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
    """Jitted (encoder hidden states (B, S, H), logits (B, T, V))."""
    if decoder_attention_mask is None:
        decoder_attention_mask = jnp.ones(jnp.shape(decoder_input_ids), jnp.int32)
    return _forward(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)


@nnx.jit
def encoder_memory(model: Bart, input_ids, attention_mask) -> EncoderMemory:
    return model.encoder_memory(model.encode(input_ids, attention_mask), attention_mask)


def padded_batch(seed: int = 0):
    """Source (3, 12) with right and left padding; decoder inputs (3, 7) with right padding."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, VOCAB, (3, 12))
    attention_mask = np.ones((3, 12), np.int64)
    attention_mask[1, 8:] = 0
    attention_mask[2, :5] = 0  # left padding: BART's positions ignore padding either way
    input_ids[attention_mask == 0] = PAD
    decoder_input_ids = rng.integers(3, VOCAB, (3, 7))
    decoder_input_ids[:, 0] = 2
    decoder_attention_mask = np.ones((3, 7), np.int64)
    decoder_attention_mask[0, 5:] = 0
    return input_ids, attention_mask, decoder_input_ids, decoder_attention_mask


def torch_outputs(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
    """The torch model's (encoder hidden states (B, S, H), logits (B, T, V)) as numpy."""
    out = torch_forward(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved random post-LN BART checkpoint and its torch model."""
    torch_model = random_model(bart_config())
    directory = tmp_path_factory.mktemp("bart")
    torch_model.save_pretrained(directory)
    return directory, torch_model


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_bart(checkpoint[0])


CASES = {
    "bart-post-ln": dict(kind="bart"),
    "bart-scaled-relu": dict(kind="bart", scale_embedding=True, activation_function="relu"),
    "mbart-pre-ln": dict(kind="mbart", scale_embedding=True, activation_function="gelu_new"),
}


@pytest.mark.parametrize("case", CASES)
def test_encoder_states_and_logits_match_torch(case, tmp_path):
    torch_model = random_model(bart_config(**CASES[case]), seed=1)
    torch_model.save_pretrained(tmp_path)
    ours = load_bart(tmp_path)
    assert ours.config.normalize_before == (CASES[case]["kind"] == "mbart")
    batch = padded_batch()
    torch_encoder, torch_logits = torch_outputs(torch_model, *batch)
    encoder_hidden, logits = forward(ours, *map(jnp.asarray, batch))
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(encoder_hidden, torch_encoder, atol=TOL, rtol=0)
    np.testing.assert_allclose(logits, torch_logits, atol=TOL, rtol=0)
    assert np.abs(torch_logits).max() > 1  # the comparison is not between near-zero numbers


def test_config_reads_transformers_dict():
    hf = bart_config("mbart", scale_embedding=True, activation_function="relu").to_dict()
    config = BartConfig.from_hf_config(hf)
    assert (config.d_model, config.decoder_ffn_dim, config.decoder_attention_heads) == (32, 48, 2)
    assert config.normalize_before and config.scale_embedding
    assert config.activation_function == "relu" and config.forced_eos_token_id is None
    assert BartConfig.from_hf_config(config.to_hf_config()) == config


def sample_decode(model: Bart, memory: EncoderMemory, n_steps: int, start_token: int):
    """Sampling in one lax.while_loop, each token fed back; tokens (N, n_steps + 1), logits."""
    N = memory.batch_size
    cache = model.init_cache(N, n_steps)
    tokens = jnp.full((N, n_steps + 1), start_token, jnp.int32)
    step_logits = jnp.zeros((N, n_steps, model.config.vocab_size), jnp.float32)

    def body(state):
        step, tokens, step_logits, cache = state
        token = jax.lax.dynamic_slice_in_dim(tokens, step, 1, axis=1)  # (N, 1)
        logits, cache = model.decode_step(token, cache, memory)  # (N, 1, V)
        step_logits = jax.lax.dynamic_update_slice_in_dim(step_logits, logits, step, axis=1)
        key = jax.random.fold_in(jax.random.key(0), step)
        next_token = jax.random.categorical(key, logits[:, 0]).astype(jnp.int32)[:, None]
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token, step + 1, axis=1)
        return step + 1, tokens, step_logits, cache

    state = (jnp.int32(0), tokens, step_logits, cache)
    _, tokens, step_logits, cache = jax.lax.while_loop(lambda s: s[0] < n_steps, body, state)
    return tokens, step_logits, cache


def test_cached_decoding_loop_equals_full_forward(model, checkpoint):
    input_ids, attention_mask, _, _ = map(jnp.asarray, padded_batch())

    @nnx.jit
    def run(model, input_ids, attention_mask):
        memory = model.encoder_memory(model.encode(input_ids, attention_mask), attention_mask)
        return sample_decode(model, memory, n_steps=7, start_token=2)

    tokens, step_logits, cache = run(model, input_ids, attention_mask)
    assert int(cache.end_index) == 7
    # Teacher forcing on the generated prefix gives every step's logits at once, in ours and torch.
    _, full_logits = forward(model, input_ids, attention_mask, tokens[:, :-1])
    _, torch_logits = torch_outputs(checkpoint[1], input_ids, attention_mask, tokens[:, :-1])
    np.testing.assert_allclose(step_logits, full_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(step_logits, torch_logits, atol=TOL, rtol=0)
    assert len(set(np.asarray(tokens[0]).tolist())) > 4  # fed-back tokens vary


def test_chunked_and_scanned_steps_equal_full_forward(model):
    """A 3-token chunk, then single tokens under lax.scan, match teacher forcing."""
    input_ids, attention_mask, decoder_input_ids, _ = map(jnp.asarray, padded_batch(seed=2))
    memory = encoder_memory(model, input_ids, attention_mask)
    cache = model.init_cache(3, 8)
    first_logits, cache = decode_step(model, decoder_input_ids[:, :3], cache, memory)

    @nnx.jit
    def decode_rest(model, cache, tokens):  # tokens (N, T)
        def step(cache, token):  # token (N,)
            logits, cache = model.decode_step(token[:, None], cache, memory)
            return cache, logits[:, 0]

        return jax.lax.scan(step, cache, tokens.T)  # logits (T, N, V)

    cache, rest = decode_rest(model, cache, decoder_input_ids[:, 3:])
    step_logits = jnp.concatenate([first_logits, rest.transpose(1, 0, 2)], axis=1)
    _, full_logits = forward(model, input_ids, attention_mask, decoder_input_ids)
    np.testing.assert_allclose(step_logits, full_logits, atol=TOL, rtol=0)
    assert int(cache.end_index) == 7


def test_encoder_memory_reused_across_beams_and_reordered(model):
    """One encoder pass repeated over beams == encoding the repeated batch; cache.take reorders."""
    n_beams = 3
    input_ids, attention_mask, _, _ = map(jnp.asarray, padded_batch())
    source_memory = encoder_memory(model, input_ids, attention_mask)  # computed once, 3 rows
    memory = source_memory.repeat(n_beams)  # 9 rows: row r * n_beams + i is beam i of source r
    rows = jnp.repeat(jnp.arange(3), n_beams)
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, memory, source_memory.take(rows))))
    targets = jnp.asarray(np.random.default_rng(3).integers(3, VOCAB, (9, 4)))

    cache = model.init_cache(9, 4)
    logits_a, cache = decode_step(model, targets[:, :2], cache, memory)
    order = jnp.asarray([2, 0, 1, 3, 3, 4, 8, 6, 7])  # beam reordering within each source
    cache = cache.take(order)
    reordered = jnp.concatenate([targets[order, :2], targets[:, 2:]], axis=1)
    logits_b, cache = decode_step(model, reordered[:, 2:], cache, memory)

    # Reference: the encoder run on every repeated row, no cache.
    _, full = forward(model, input_ids[rows], attention_mask[rows], reordered)
    np.testing.assert_allclose(logits_a[order], full[:, :2], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits_b, full[:, 2:], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["bart-scaled-relu", "mbart-pre-ln"])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(case, tmp_path):
    config = BartConfig.from_hf_config(bart_config(**CASES[case]).to_dict())
    ours = Bart(config, rngs=nnx.Rngs(7))
    ours.final_logits_bias.set_value(jax.random.normal(jax.random.key(1), (VOCAB,)))
    save_bart(ours, tmp_path / "saved")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded).__name__ == config.to_hf_config()["architectures"][0]

    batch = padded_batch(seed=4)
    _, torch_logits = torch_outputs(reloaded, *batch)
    _, logits = forward(ours, *map(jnp.asarray, batch))
    np.testing.assert_allclose(logits, torch_logits, atol=TOL, rtol=0)
    _, reloaded_logits = forward(load_bart(tmp_path / "saved"), *map(jnp.asarray, batch))
    np.testing.assert_allclose(reloaded_logits, logits)


def tiny_rag(tmp_path):
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        bert_config("dpr"), bart_config(), n_docs=2
    )
    rag = transformers.RagSequenceForGeneration(config).eval()
    rag.rag.generator.load_state_dict(random_model(bart_config(), seed=5).state_dict())
    return rag


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_loads_generator_half_of_rag_checkpoint(weights_file, tmp_path):
    rag = tiny_rag(tmp_path)
    rag.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":  # the facebook/rag-sequence-nq file format
        (tmp_path / "model.safetensors").unlink()
        torch.save(rag.state_dict(), tmp_path / weights_file)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rag"

    ours = load_bart(tmp_path)
    batch = padded_batch(seed=5)
    _, torch_logits = torch_outputs(rag.rag.generator, *batch)
    _, logits = forward(ours, *map(jnp.asarray, batch))
    np.testing.assert_allclose(logits, torch_logits, atol=TOL, rtol=0)


def test_gradients_under_jit_and_remat_match_torch(checkpoint):
    directory, torch_model = checkpoint
    input_ids, attention_mask, decoder_input_ids, _ = padded_batch(seed=6)
    probe = np.random.default_rng(6).normal(size=(3, 7, VOCAB)).astype(np.float32)

    torch_model.zero_grad()
    logits = torch_model(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        decoder_input_ids=torch.from_numpy(decoder_input_ids),
    ).logits
    (logits * torch.from_numpy(probe)).sum().backward()
    torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}

    # The plain-JAX pattern (split, merge inside jax.grad) that training code may use.
    model = load_bart(directory, remat=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest):
        model = nnx.merge(graphdef, params, rest)
        logits = model(jnp.asarray(input_ids), jnp.asarray(attention_mask), decoder_input_ids)
        return jnp.sum(logits * probe)

    grads = jax.jit(jax.grad(loss))(params, rest)
    assert "final_logits_bias" not in nnx.to_pure_dict(grads)  # a buffer, as in torch: not trained
    nnx.update(model, grads)  # to read the gradients under Hugging Face names and layouts
    ours = hf_state_dict(model)
    # The tied embedding's gradient sums its encoder, decoder and LM-head uses, as in torch.
    assert "model.shared.weight" in torch_grads and len(torch_grads) == len(ours) - 1
    for name, torch_grad in torch_grads.items():
        np.testing.assert_allclose(ours[name], torch_grad, atol=TOL, rtol=1e-4, err_msg=name)


def test_bf16_compute_is_finite_and_close(checkpoint, model, dot_output_types):
    batch = tuple(map(jnp.asarray, padded_batch()))
    ours_bf16 = load_bart(checkpoint[0], dtype=jnp.bfloat16)
    assert ours_bf16.shared.embedding.dtype == jnp.float32  # params stay float32
    hidden = jax.eval_shape(lambda: ours_bf16.encode(*batch[:2]))
    assert hidden.dtype == jnp.bfloat16  # compute runs in bf16
    (_, logits), (_, reference) = forward(ours_bf16, *batch), forward(model, *batch)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.05 * scale
    # Greedy choices agree almost everywhere.
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9
    # Every product sums in float32: 8 per encoder layer, 14 per decoder layer (with the
    # cross-attention's), plus the LM head.
    output_types = dot_output_types(lambda: ours_bf16(*batch))
    config = ours_bf16.config
    assert len(output_types) == 8 * config.encoder_layers + 14 * config.decoder_layers + 1
    assert set(output_types) == {"float32"}, output_types


def test_dropout_only_in_train_mode(checkpoint):
    ours = load_bart(checkpoint[0])
    input_ids, attention_mask, _, _ = map(jnp.asarray, padded_batch())
    jit_encode = nnx.jit(Bart.encode)
    encode = lambda: jit_encode(ours, input_ids, attention_mask)  # noqa: E731
    eval_hidden = encode()
    ours.train()
    train_hidden = encode()
    assert np.isfinite(train_hidden).all() and np.abs(train_hidden - eval_hidden).max() > 1e-3
    assert np.abs(encode() - train_hidden).max() > 1e-3  # fresh masks each call
    ours.eval()
    np.testing.assert_allclose(encode(), eval_hidden, atol=1e-6)


def test_params_shard_over_data_fsdp_mesh(checkpoint, model):
    mesh = partitioning.make_mesh(data=2)  # (data, fsdp) = (2, 2) over conftest's 4 CPU devices
    shardings = partitioning.param_shardings(model, mesh)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(shardings)}
    assert flat["decoder.layers.0.fc1.kernel"].spec == PartitionSpec("fsdp", None)
    assert flat["decoder.layers.0.fc2.kernel"].spec == PartitionSpec(None, "fsdp")
    assert flat["shared.embedding"].spec == PartitionSpec(None, "fsdp")
    sharded = load_bart(checkpoint[0])
    partitioning.shard_module(sharded, mesh)
    batch = tuple(map(jnp.asarray, padded_batch()))
    kernel = sharded.decoder.layers[0].fc1.kernel.get_value()
    assert (
        kernel.sharding.spec == PartitionSpec("fsdp", None) and len(kernel.addressable_shards) == 4
    )
    np.testing.assert_allclose(forward(sharded, *batch)[1], forward(model, *batch)[1], atol=TOL)


def test_bad_checkpoints_raise_clear_errors(checkpoint, model, tmp_path):
    directory = checkpoint[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bart(tmp_path / "nowhere")

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(directory / "config.json", config_only)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_bart(config_only)

    bert = tmp_path / "bert"
    random_model(bert_config()).save_pretrained(bert)
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'bert'"):
        load_bart(bert)

    wrong_shapes = tmp_path / "wrong_shapes"
    shutil.copytree(directory, wrong_shapes)
    config = json.loads((directory / "config.json").read_text())
    config.update(decoder_ffn_dim=40, decoder_layers=3)
    (wrong_shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_bart(wrong_shapes)
    message = str(error.value)
    assert "mis-shaped" in message and "decoder.layers.0.fc1.kernel" in message
    assert "'model.decoder.layers.0.fc1.weight'" in message and "(32, 40)" in message
    assert "missing" in message and "decoder.layers.2.self_attn.q_proj.kernel" in message
    config.update(decoder_ffn_dim=48, decoder_layers=1)
    (wrong_shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"26 unexpected(.|\n)*\n  model\.decoder\.layers\.1\.fc1\.weight\n"
    ):
        load_bart(wrong_shapes)

    with pytest.raises(ValueError, match="exceeds max_position_embeddings 40"):
        model.encode(jnp.ones((1, 41), jnp.int32), jnp.ones((1, 41), jnp.int32))


def test_untied_lm_head_is_rejected(checkpoint, tmp_path):
    torch_model = checkpoint[1]
    state_dict = {k: v.clone() for k, v in torch_model.state_dict().items()}
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"] + 1
    shutil.copy(checkpoint[0] / "config.json", tmp_path)
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"lm_head\.weight differs from model\.shared\.weight"
    ):
        load_bart(tmp_path)
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        BartConfig.from_hf_config({**bart_config().to_dict(), "tie_word_embeddings": False})


def test_config_errors_are_checkpoint_errors_as_for_bert():
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        BartConfig.from_hf_config(bert_config().to_dict())
    with pytest.raises(CheckpointError, match="d_model 32 is not divisible by encoder_attention"):
        BartConfig.from_hf_config(bart_config(encoder_attention_heads=5).to_dict())
    with pytest.raises(CheckpointError, match="activation_function 'swiglu' is not supported"):
        BartConfig.from_hf_config(bart_config(activation_function="swiglu").to_dict())
    with pytest.raises(CheckpointError, match="add_final_layer_norm differently"):
        BartConfig.from_hf_config({**bart_config().to_dict(), "add_final_layer_norm": True})
