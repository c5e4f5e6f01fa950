"""Bad input at training start-up and in the input pipeline: clear errors, nothing written to
the workdir, truncations counted, no out-of-vocabulary id reaching a model."""

import json
import types

import numpy as np
import pytest
from transformers import AutoTokenizer

from rag_jax.data import QAExample
from rag_jax.host_retrieval import BatchBuilder
from rag_jax.index import IndexMismatchError, build_index, load_text_encoder
from rag_jax.rag import RagConfig
from rag_jax.training import train
from tests.toy import MINILM_DIR, N_FACTS, read_metrics, tiny_config


def test_more_documents_than_the_corpus_holds_writes_nothing(toy, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=f"n_docs {N_FACTS + 1} .* {N_FACTS} passages"):
        train(tiny_config(toy, **{"rag.n_docs": N_FACTS + 1}), str(workdir))
    assert not workdir.exists()


def test_an_index_of_another_encoder_preprocessing_is_refused(toy, tmp_path):
    """The toy query encoder mean-pools; an index built from the same weights with CLS
    pooling holds other vectors: refused, naming the query encoder and the index."""
    build_index(
        toy / "corpus.jsonl",
        lambda: load_text_encoder(toy / "encoder", pooling="cls", max_length=32),
        tmp_path / "cls_index", backend="exact", progress=False,
    )  # fmt: skip
    workdir = tmp_path / "run"
    config = tiny_config(toy, **{"data.index": str(tmp_path / "cls_index"), "rag.n_docs": 4})
    with pytest.raises(IndexMismatchError) as error:
        train(config, str(workdir))
    message = str(error.value)
    assert f"query encoder {toy / 'encoder'}" in message
    assert str(tmp_path / "cls_index") in message and "pooling 'cls' (index) != 'mean'" in message
    assert not workdir.exists()


@pytest.mark.parametrize(
    "field", ["model.question_encoder", "model.generator", "data.train", "data.index"]
)
def test_a_missing_path_is_refused_naming_its_config_field(toy, tmp_path, field):
    workdir = tmp_path / "run"
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=rf"config\.{field}='{missing}' does not exist"):
        train(tiny_config(toy, **{field: str(missing)}), str(workdir))
    assert not workdir.exists()


def test_a_directory_that_is_no_index_is_named_as_such(toy, tmp_path):
    (tmp_path / "empty").mkdir()
    message = r"config\.data\.index=.* is not an index directory"
    with pytest.raises(FileNotFoundError, match=message):
        train(tiny_config(toy, **{"data.index": str(tmp_path / "empty")}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_over_long_questions_are_cut_and_counted(toy, tmp_path):
    long_question = " ".join(["granite mountain snow"] * 20)  # > 32 tokens
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"question": q, "answers": ["Brix"]}) + "\n"
            for q in [long_question, "bird that eats seeds", long_question, "red stone bridge"]
        )
    )
    overrides = {"data.train": str(qa), "train_steps": 2, "log_every": 1, "rag.n_docs": 4}
    train(tiny_config(toy, **overrides), str(tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    # 4 questions a step, 2 of them too long, each step: counted since the run started
    assert [m["truncated_question"] for m in metrics] == [2, 4]
    # their generator inputs (K = 4 each) are cut too: the question alone exceeds S
    assert [m["truncated_context"] for m in metrics] == [8, 16]


def builder(generator_vocab_size: int, question_vocab_size: int | None) -> BatchBuilder:
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    generator_config = types.SimpleNamespace(
        vocab_size=generator_vocab_size, pad_token_id=0, eos_token_id=102,
        decoder_start_token_id=101, forced_bos_token_id=None,
    )  # fmt: skip
    config = RagConfig(marginalization="closed_book", max_context_length=16, max_target_length=4)
    return BatchBuilder(
        config, tokenizer, tokenizer, generator_config, question_vocab_size=question_vocab_size
    )


def test_no_token_id_outside_a_vocabulary_leaves_the_pipeline():
    examples = [QAExample("where is the volcano", ("Pirrow",))]
    assert builder(30522, 30522)(examples).batch.context_ids.max() < 30522
    with pytest.raises(ValueError, match=r"question_ids \(query tokenizer\) holds .* \[0, 1000\)"):
        builder(30522, 1000)(examples)
    with pytest.raises(ValueError, match=r"context_ids \(generator tokenizer\) holds"):
        builder(1000, None)(examples, with_targets=False)


# The next batch built in a background thread while the step runs: the same losses as
# building it in turn, and the host/device split reported.


def test_prefetch_changes_speed_not_results(toy, tmp_path):
    common = {"train_steps": 4, "log_every": 1, "rag.n_docs": 4, "mesh.fsdp": 1}
    train(tiny_config(toy, **common, **{"data.prefetch": False}), str(tmp_path / "in_turn"))
    train(tiny_config(toy, **common, **{"data.prefetch": True}), str(tmp_path / "prefetch"))
    in_turn, prefetch = read_metrics(tmp_path / "in_turn"), read_metrics(tmp_path / "prefetch")
    np.testing.assert_allclose(
        [m["loss"] for m in prefetch], [m["loss"] for m in in_turn], rtol=1e-6, atol=1e-6
    )
    assert len({m["loss"] for m in prefetch}) == 4  # the query encoder and generator learn
    for m in prefetch:
        assert m["host_seconds"] > 0 and m["device_seconds"] > 0
        assert 0 <= m["host_wait_seconds"] <= m["host_seconds"] + m["device_seconds"]
