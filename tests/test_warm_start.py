"""A BART warm-started from BERT (models.warm_start): BERT's forward pass is the oracle."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from rag_jax.builders import build_model
from rag_jax.models import BartConfig, BertConfig, BertModel, bart_from_bert
from rag_jax.models.hf_io import module_params
from tests.toy import tiny_encoder

BERT = BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=24, layer_norm_eps=1e-5,  # BART's epsilon
)  # fmt: skip


def _bart_config(**changes) -> BartConfig:
    fields = dict(
        vocab_size=40, d_model=16, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=20, dropout=0.0, pad_token_id=0,
    )  # fmt: skip
    return BartConfig(**{**fields, **changes})


def test_encoder_computes_berts_hidden_states():
    bert = BertModel(BERT, rngs=nnx.Rngs(0))
    bart = bart_from_bert(bert, _bart_config(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(1, 40, size=(3, 11))
    mask = np.ones((3, 11), bool)
    mask[1, 7:] = False  # padding, seen by neither
    expected, _ = bert(input_ids, mask)
    got = bart.encode(input_ids, mask)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(expected)[mask], atol=2e-5)


def test_decoder_layers_and_embeddings_come_from_bert():
    bert = BertModel(BERT, rngs=nnx.Rngs(0))
    bart = bart_from_bert(bert, _bart_config(), rngs=nnx.Rngs(1))
    src, got = module_params(bert), module_params(bart)
    np.testing.assert_array_equal(got["shared.embedding"], src["embeddings.word.embedding"])
    for i in range(2):
        np.testing.assert_array_equal(
            got[f"decoder.layers.{i}.self_attn.q_proj.kernel"],
            src[f"layers.{i}.attention.query.kernel"],
        )
        np.testing.assert_array_equal(
            got[f"decoder.layers.{i}.fc2.bias"], src[f"layers.{i}.mlp_out.bias"]
        )
        np.testing.assert_array_equal(
            got[f"decoder.layers.{i}.final_layer_norm.scale"], src[f"layers.{i}.mlp_norm.scale"]
        )
    # Positions: BERT's position p plus its segment-0 vector, at BART's row p + 2.
    np.testing.assert_array_equal(
        got["decoder.embed_positions.embedding"][2:],
        src["embeddings.position.embedding"][:20] + src["embeddings.token_type.embedding"][0],
    )
    # Cross-attention: BERT's self-attention by default, else a plain Bart's random init.
    key = "decoder.layers.1.encoder_attn.k_proj.kernel"
    np.testing.assert_array_equal(got[key], src["layers.1.attention.key.kernel"])
    rothe = bart_from_bert(bert, _bart_config(), cross_attention_from_bert=False, rngs=nnx.Rngs(1))
    plain = module_params(bart.__class__(_bart_config(), rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(module_params(rothe)[key], plain[key])
    np.testing.assert_array_equal(
        module_params(rothe)["decoder.layers.1.fc1.kernel"], src["layers.1.mlp_in.kernel"]
    )


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32), "d_model"),
        (dict(vocab_size=41), "vocab_size"),
        (dict(decoder_ffn_dim=64), "decoder_ffn_dim"),
        (dict(encoder_layers=4), "encoder_layers"),
        (dict(max_position_embeddings=30), "max_position_embeddings"),
        (dict(normalize_before=True), "normalize_before"),
    ],
)
def test_shapes_bert_cannot_fill_are_refused_by_name(change, field):
    bert = BertModel(BERT, rngs=nnx.Rngs(0))
    config = dataclasses.replace(_bart_config(), **change)
    with pytest.raises(ValueError, match=field):
        bart_from_bert(bert, config, rngs=nnx.Rngs(1))


def test_build_model_warm_starts_the_generator_from_the_config(tmp_path):
    encoder = tiny_encoder(tmp_path / "encoder")  # hidden 16, 1 layer, ffn 32, 2 heads
    config = tiny.get_config()
    config.model.question_encoder = str(encoder)
    config.model.generator_warm_start = str(encoder)
    config.model.generator_init.update(
        d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64
    )
    model, _, _ = build_model(config)
    np.testing.assert_array_equal(
        module_params(model.generator)["encoder.layers.0.fc1.kernel"],
        module_params(model.query_encoder)["bert.layers.0.mlp_in.kernel"],
    )
