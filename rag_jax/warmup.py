"""A generator for your own corpus, before RAG: the warm-up pairs.

No pretrained seq2seq model ships offline, and RAG training cannot start from a generator that
never learned to read: at first p(y|x, z) is flat for every passage z, so the retriever gets no
signal. The warm-up teaches it one thing closed-book, on the corpus alone: read a passage in
the RAG input format with an empty question and name what it is about (its title). No question
and no retrieval label is used. Then train ``configs/own_data_warmup.py`` on the pairs, export
it (``python -m rag_jax.export``), and train RAG from the exported generator.

    python -m rag_jax.warmup --corpus passages.jsonl --out warmup.jsonl \\
        [--hold-out dev.jsonl --hold-out test.jsonl]

``--hold-out`` QA files: a passage whose title is one of their answers is never a target, so
the warm-up never learns the answer to an evaluation question.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from rag_jax import _files
from rag_jax.data import read_qa
from rag_jax.index.corpus import CorpusReader, Passage
from rag_jax.rag import RagConfig
from rag_jax.tokenization import context_string


def warmup_pairs(
    passages: Iterable[Passage], config: RagConfig, held_out: frozenset[str] = frozenset()
) -> list[dict]:
    """``{"question": "title / text //", "answers": [title]}`` per passage, the question
    being the generator input RAG builds for this passage with an empty question
    (:func:`rag_jax.tokenization.context_string`); titles in ``held_out`` are never a target.
    """
    return [
        {"question": context_string(p.title, p.text, "", config).rstrip(), "answers": [p.title]}
        for p in passages
        if p.title.strip() and p.title not in held_out
    ]


def write_warmup_pairs(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    hold_out: Sequence[str | os.PathLike] = (),
    config: RagConfig | None = None,
) -> int:
    """Writes :func:`warmup_pairs` of ``corpus`` (JSONL or TSV, as the index build reads it)
    to ``out`` (JSONL, atomically); returns how many.

    Raises:
      CorpusError, QAFormatError: a bad line of the corpus or a hold-out file (named).
      ValueError: no passage has a title to learn.
    """
    held_out = frozenset(
        answer for path in hold_out for example in read_qa(path)[0] for answer in example.answers
    )
    pairs = warmup_pairs(CorpusReader(corpus), config or RagConfig(), held_out)
    if not pairs:
        raise ValueError(f"{corpus}: no passage with a title (outside the held-out answers)")
    _files.write_text(Path(out), "".join(json.dumps(pair) + "\n" for pair in pairs))
    return len(pairs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rag_jax.warmup", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--corpus", required=True, help="passages (JSONL or psgs_w100 TSV)")
    parser.add_argument("--out", required=True, help="the warm-up pairs (JSONL)")
    parser.add_argument(
        "--hold-out", action="append", default=[], help="a QA file whose answers are no target"
    )
    args = parser.parse_args(argv)
    try:
        n = write_warmup_pairs(args.corpus, args.out, args.hold_out)
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{n} warm-up pairs written to {args.out}")


if __name__ == "__main__":
    main()
