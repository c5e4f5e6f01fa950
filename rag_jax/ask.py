"""Ask a trained RAG model: ``python -m rag_jax.ask --workdir DIR "question"``.

Prints the answer and the top retrieved passages (title, the start of the text, p(z|x)).
With ``--questions FILE`` (one JSON ``{"question": ...}`` a line) it answers each and writes
JSONL to ``--out`` (default: standard output). The model, its config and its index come from
the training workdir (``DIR/config.json`` and the latest checkpoint), opened from any directory
as ``eval.py`` opens it (``Evaluator.from_workdir``: always with the recorded config; the
index, the recorded one or ``--index``, checked against the model's query encoder and K).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rag_jax.data import check_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rag_jax.ask", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("question", nargs="?", help="a free-text question")
    parser.add_argument("--workdir", required=True, type=Path, help="a train.py workdir")
    parser.add_argument("--questions", type=Path, help='JSONL file, one {"question": ...} a line')
    parser.add_argument("--out", type=Path, help="where --questions' answers go (JSONL)")
    parser.add_argument(
        "--decode",
        choices=("token", "thorough", "fast"),
        default=None,
        help="default: token for RAG-Token, thorough for RAG-Sequence models",
    )
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--n-docs", type=int, default=None, help="documents read (default: K)")
    parser.add_argument("--show", type=int, default=3, help="passages printed per answer")
    parser.add_argument("--index", type=Path, help="answer from another index (hot swap)")
    return parser


def _read_questions(path: Path) -> list[str]:
    questions = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f'{path}:{line_no}: expected {{"question": ...}}: {error}'
                ) from None
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{path}:{line_no}: 'question' must be a non-empty string")
            try:
                check_text(question, "'question'")
            except ValueError as error:
                raise ValueError(f"{path}:{line_no}: {error}") from None
            questions.append(question)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def _load(args, n_questions: int):
    from rag_jax.checkpoints import recorded_config
    from rag_jax.evaluation import EvalSettings, Evaluator

    settings = EvalSettings(
        decode=args.decode,
        beams=args.beams,
        n_docs=args.n_docs,
        max_length=recorded_config(args.workdir).rag.max_target_length + 1,
        # one question is decoded alone, not in a batch filled up with copies of it
        batch_size=min(EvalSettings.batch_size, n_questions),
    )
    return Evaluator.from_workdir(args.workdir, settings, index=args.index)


def _print(record: dict, show: int) -> None:
    print(f"Q: {record['question']}\nA: {record['prediction']}")
    for title, text, prob in list(
        zip(
            record.get("titles", []),
            record.get("texts", []),
            record.get("doc_probs", []),
            strict=False,
        )
    )[:show]:
        print(f"   p(z|x)={prob:.3f}  {title}: {text[:100]}{'...' if len(text) > 100 else ''}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.question is None) == (args.questions is None):
        _parser().error("give a question or --questions FILE (one of the two)")
    try:
        if args.question is not None:
            if not args.question.strip():
                raise ValueError("the question must be a non-empty string")
            check_text(args.question, "the question")
        questions = _read_questions(args.questions) if args.questions else [args.question]
        evaluator = _load(args, len(questions))
        # Written beside --out and renamed at the end: never a half-written answers file.
        partial = args.out.with_name(args.out.name + ".partial") if args.out else None
        out = partial.open("w", encoding="utf-8") if partial else None
        try:
            size = evaluator.settings.batch_size
            for start in range(0, len(questions), size):  # a batch at a time: written as it goes
                for record in evaluator.answer(questions[start : start + size]):
                    if args.questions:
                        record.pop("texts", None)
                        line = json.dumps(record, ensure_ascii=False)
                        print(line, file=out or sys.stdout)
                    else:
                        _print(record, args.show)
        finally:
            if out:
                out.close()
        if partial:
            partial.replace(args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
