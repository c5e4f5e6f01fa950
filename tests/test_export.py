"""rag_jax.export: a trained toy run exported, reloaded, and compared with the workdir's model."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rag_jax.builders import build_model
from rag_jax.checkpoints import load_trained
from rag_jax.export import ExportError, export, load_exported, main
from rag_jax.models.inputs import tokenizer_sha256
from rag_jax.rag import RagBatch
from rag_jax.training import train
from tests.toy import FACTS, tiny_config


@pytest.fixture(scope="module")
def trained(toy_world, tmp_path_factory):
    """A 2-step toy run (the schedule of test_training's 40-step run: the same compiled step)
    and its config."""
    config = tiny_config(
        toy_world,
        **{"rag.n_docs": len(FACTS), "train_steps": 2, "optimizer.decay_steps": 40},
    )
    workdir = tmp_path_factory.mktemp("export") / "run"
    train(config, str(workdir))
    assert (workdir / "checkpoints" / "2").is_dir()
    return config, workdir


def toy_batch(question_tokenizer, generator_tokenizer, n_docs: int) -> RagBatch:
    """Every toy question with the first ``n_docs`` passages, the answers as targets."""
    questions = [question for _, _, question in FACTS]
    q = question_tokenizer(questions, padding="max_length", max_length=16, return_tensors="np")
    contexts = [
        f"{title} / {text} // {question}" for question in questions for title, text, _ in FACTS
    ][: len(questions) * n_docs]
    c = generator_tokenizer(
        contexts, padding="max_length", truncation=True, max_length=24, return_tensors="np"
    )
    t = generator_tokenizer(
        [title for title, _, _ in FACTS], padding="max_length", max_length=6, return_tensors="np"
    )
    B, K = len(questions), n_docs
    targets = t["input_ids"][:, 1:]  # (B, T): after [CLS], the decoder start
    vectors = np.random.default_rng(0).normal(size=(B, K, 16)).astype(np.float32)
    return RagBatch(
        question_ids=jnp.asarray(q["input_ids"]),
        question_mask=jnp.asarray(q["attention_mask"], bool),
        doc_vectors=jnp.asarray(vectors),
        doc_mask=jnp.ones((B, K), bool),
        context_ids=jnp.asarray(c["input_ids"].reshape(B, K, -1)),
        context_mask=jnp.asarray(c["attention_mask"].reshape(B, K, -1), bool),
        decoder_input_ids=jnp.asarray(t["input_ids"][:, :-1]),
        targets=jnp.asarray(targets),
        target_mask=jnp.asarray(t["attention_mask"][:, 1:], bool),
    )


def test_exported_model_computes_what_the_workdir_model_computes(trained, tmp_path):
    config, workdir = trained
    record = export(workdir, tmp_path / "out")  # the config from workdir/config.json
    assert record["step"] == 2
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == record
    exported, *exported_tokenizers = load_exported(tmp_path / "out")
    model, *tokenizers = load_trained(config, str(workdir))
    # The trained parameters, not the initial ones: two Adam steps at 1e-2 moved them.
    initial, *_ = build_model(config)
    assert not np.array_equal(
        model.generator.shared.embedding[...], initial.generator.shared.embedding[...]
    )
    # Tokenizers copied byte for byte (the index's query-encoder check reads their hash).
    assert tokenizer_sha256(tmp_path / "out" / "question_encoder") == tokenizer_sha256(
        config.model.question_encoder
    )
    assert exported.config == model.config
    batch = toy_batch(*tokenizers, n_docs=3)
    jax.tree.map(np.testing.assert_array_equal, batch, toy_batch(*exported_tokenizers, n_docs=3))
    # nll (B,) and doc_scores (B, K)
    for got, want in zip(jax.jit(exported)(batch), jax.jit(model)(batch), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_exported_directories_start_another_run(trained, tmp_path):
    """What the demo does with its warm-up: the exported networks are the next config's."""
    config, workdir = trained
    export(workdir, tmp_path / "out", config=config)
    follow_up = copy.deepcopy(config)
    follow_up.model.question_encoder = str(tmp_path / "out" / "question_encoder")
    follow_up.model.generator = str(tmp_path / "out" / "generator")
    rebuilt, *_ = build_model(follow_up)
    model, *_ = load_trained(config, str(workdir))
    assert rebuilt.query_encoder.pooling == model.query_encoder.pooling == "mean"  # toy.py's
    for part in ("query_encoder", "generator"):
        got = jax.tree.leaves(nnx.state(getattr(rebuilt, part), nnx.Param))
        want = jax.tree.leaves(nnx.state(getattr(model, part), nnx.Param))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_export_refuses_a_directory_that_is_not_an_export(trained, tmp_path, capsys):
    _, workdir = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export(workdir, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # The command line: one line, exit status 2, nothing written.
    assert main(["--workdir", str(workdir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an export" in err and err.count("\n") == 1
    assert main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a train.py workdir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # An earlier export is replaced, and no staging directory is left behind.
    assert main(["--workdir", str(workdir), "--out", str(tmp_path / "x")]) == 0
    assert main(["--workdir", str(workdir), "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "x"]
