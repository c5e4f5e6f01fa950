"""The index hot swap: the same trained model answers from new knowledge.

The entities of N_SWAPPED test articles are renamed in a copy of their passages; the copy
(with 500 other passages) is indexed, swapped in for the demo's index with
``KnowledgeSource.swap``, and the same model is asked the same questions again. With the same
parameters, the answers should follow the index: the new names, no longer the old ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from examples.wiki.prepare import SEED, index_corpus, write_jsonl

N_SWAPPED = 20  # test articles whose passages are renamed
N_OTHERS = 500  # other passages indexed beside them


def renamed(title: str, index: int) -> str:
    """A made-up name of the same shape as ``title``, to rename an entity."""
    syllables = ["ka", "lo", "mi", "ter", "vus", "dan", "rel", "qua", "sen", "bor"]
    rng = np.random.default_rng(index)
    return " ".join(
        "".join(rng.choice(syllables, size=max(1, len(word) // 3))).capitalize()
        for word in title.split()
    )


def swapped_corpus(corpus: list[dict], names: dict[str, str]) -> list[dict]:
    """The passages titled by a key of ``names``, renamed in title and text, then a seeded
    sample of N_OTHERS other passages."""
    changed = [
        {**p, "title": names[p["title"]], "text": p["text"].replace(p["title"], names[p["title"]])}
        for p in corpus
        if p["title"] in names
    ]
    others = [p for p in corpus if p["title"] not in names]
    n_others = min(N_OTHERS, len(others))
    keep = np.random.default_rng(SEED).choice(len(others), size=n_others, replace=False)
    return changed + [others[i] for i in keep]


def hot_swap(workdir: Path, out: Path, model, tokenizers, test: Path) -> dict:
    """Answers before and after the swap, and the fractions that name the old entity before
    and the new one after; cached in ``out/result.json``.

    ``workdir``: the demo's (``data/corpus.jsonl``, ``minilm``, ``index``); ``model`` and
    ``tokenizers``: a trained RAG model and its two tokenizers.
    """
    from rag_jax.evaluation import EvalSettings, Evaluator, exact_match
    from rag_jax.index import KnowledgeSource

    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    questions = [json.loads(line) for line in test.read_text().splitlines()][:N_SWAPPED]
    names = {q["answers"][0]: renamed(q["answers"][0], i) for i, q in enumerate(questions)}
    corpus = [json.loads(line) for line in (workdir / "data/corpus.jsonl").read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", swapped_corpus(corpus, names))
    index_corpus(out / "corpus.jsonl", workdir / "minilm", out / "index")
    knowledge = KnowledgeSource(workdir / "index")
    settings = EvalSettings(decode="thorough", beams=2, max_length=16, batch_size=N_SWAPPED)
    evaluator = Evaluator(model, *tokenizers, knowledge, settings)
    before = evaluator.answer([q["question"] for q in questions])
    knowledge.swap(out / "index")  # the same model, new knowledge
    after = evaluator.answer([q["question"] for q in questions])
    examples = [
        {
            "question": q["question"],
            "old": q["answers"][0],
            "new": names[q["answers"][0]],
            "before": b["prediction"],
            "after": a["prediction"],
        }
        for q, b, a in zip(questions, before, after, strict=True)
    ]

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
