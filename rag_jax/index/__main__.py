"""Command line: build an index directory from a corpus, or search one.

python -m rag_jax.index build --corpus psgs.jsonl --encoder MODEL_DIR --out indexes/wiki
python -m rag_jax.index search --index indexes/wiki --query "who wrote hamlet" -k 5
python -m rag_jax.index tune --index indexes/wiki --questions sample_questions.txt

Expected failures (bad input, a damaged index, a full disk, a concurrent build) print one line
``error: ...`` and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from rag_jax.index.build import BuildError, build_index
from rag_jax.index.corpus import CorpusError
from rag_jax.index.encode import TextEncoder, encode_texts, load_text_encoder
from rag_jax.index.manifest import IndexMismatchError, Manifest
from rag_jax.index.scann_index import ScannConfig
from rag_jax.index.source import KnowledgeSource, tune_index
from rag_jax.models.hf_io import CheckpointError


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rag_jax.index", description=__doc__.strip())
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="encode a corpus into an index directory")
    build.add_argument("--corpus", required=True, help="JSONL or psgs_w100 .tsv file")
    build.add_argument("--encoder", required=True, help="document encoder (local HF directory)")
    build.add_argument("--out", required=True, help="index directory to create or replace")
    build.add_argument("--backend", choices=("scann", "exact"), default="scann")
    build.add_argument(
        "--split-words", type=_at_least(1), help="split documents into N-word passages"
    )
    build.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines")
    build.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    build.add_argument("--batch-size", type=_at_least(1), default=128)
    build.add_argument(
        "--chunk-size", type=_at_least(1), default=8192, help="passages per resumable step"
    )
    build.add_argument(
        "--max-length", type=_at_least(1), default=512, help="token limit per passage"
    )
    build.add_argument(
        "--num-leaves", type=_at_least(2), help="ScaNN partitions (default ~sqrt(N)/2)"
    )
    build.add_argument("--leaves-to-search", type=_at_least(1), help="ScaNN partitions searched")
    build.add_argument(
        "--reorder-k",
        type=_at_least(1),
        default=ScannConfig.reorder_k,
        help="ScaNN re-scoring depth (default %(default)s)",
    )
    build.add_argument(
        "--reorder-dtype",
        choices=("bfloat16", "float32"),
        default=ScannConfig.reorder_dtype,
        help="type of ScaNN's copy of the vectors for re-scoring (default %(default)s)",
    )

    search = commands.add_parser("search", help="print the top passages for queries")
    search.add_argument("--index", required=True, help="index directory")
    search.add_argument("--query", required=True, action="append", help="query text (repeatable)")
    search.add_argument("-k", type=_at_least(1), default=5, help="passages per query")
    search.add_argument("--backend", choices=("scann", "exact"), help="default: the index's")

    tune = commands.add_parser(
        "tune", help="fewest ScaNN leaves and candidates reaching a recall target; saved"
    )
    tune.add_argument("--index", required=True, help="index directory built with ScaNN")
    tune.add_argument(
        "--questions", required=True, help="UTF-8 text file, one sample question a line"
    )
    tune.add_argument("-k", type=_at_least(1), default=10, help="recall@k is measured (default 10)")
    tune.add_argument("--target-recall", type=_recall, default=0.95, help="default 0.95")
    for command in (search, tune):
        command.add_argument(
            "--encoder", help="the index's document encoder (default: the manifest's encoder_path)"
        )
        command.add_argument("--query-encoder", help="a separate query encoder, e.g. DPR's")
    return parser


def _build(args: argparse.Namespace) -> None:
    manifest = build_index(
        args.corpus,
        lambda: load_text_encoder(args.encoder, max_length=args.max_length),
        args.out,
        backend=args.backend,
        split_words=args.split_words,
        skip_bad=args.skip_bad_lines,
        dtype=args.dtype,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        scann_config=ScannConfig(
            num_leaves=args.num_leaves,
            leaves_to_search=args.leaves_to_search,
            reorder_k=args.reorder_k,
            reorder_dtype=args.reorder_dtype,
        ),
        encoder_path=args.encoder,
    )
    skipped = f", {manifest.n_skipped} bad line(s) skipped" if manifest.n_skipped else ""
    if manifest.n_truncated:
        max_length = manifest.encoder_preprocessing.get("max_length")
        skipped += f", {manifest.n_truncated} cut at {max_length} tokens"
    print(f"built {args.out}: {manifest.count} passages, {manifest.dim}-dim{skipped}")


def _document_encoder_path(args: argparse.Namespace, manifest: Manifest) -> str:
    """--encoder, else the manifest's encoder_path (relative ones, from old manifests, are
    tried from the working directory, then from the index)."""
    if args.encoder:
        return args.encoder
    recorded = manifest.encoder_path
    where = f"{Path(args.index) / 'manifest.json'} (encoder_path, recorded at build time)"
    if not recorded:
        raise IndexMismatchError(f"no document encoder recorded in {where}; pass --encoder DIR")
    for candidate in (Path(recorded), Path(args.index) / recorded):
        if candidate.is_dir():
            return str(candidate)
    raise IndexMismatchError(
        f"the document encoder {recorded!r} named in {where} does not exist here; pass "
        "--encoder DIR (the index's document encoder) or --query-encoder DIR"
    )


def _query_encoder(args: argparse.Namespace, manifest: Manifest) -> tuple[TextEncoder, dict]:
    """The encoder for questions, and what the index's document encoder must match.

    Returns ``(encoder, expected)``: ``expected`` holds the keyword arguments of
    :func:`load_index` that check the document encoder (empty for a separate query encoder,
    where only the vector size must agree).
    """
    if args.query_encoder:  # an asymmetric (DPR) pair
        encoder = load_text_encoder(args.query_encoder)
        if encoder.preprocessing.get("architecture") == "DPRContextEncoder":
            raise ValueError(
                f"--query-encoder {args.query_encoder} is a DPR context (passage) encoder; "
                "questions need the matching DPRQuestionEncoder"
            )
        return encoder, {}
    recorded = manifest.encoder_preprocessing
    encoder = load_text_encoder(
        _document_encoder_path(args, manifest), max_length=recorded.get("max_length", 512)
    )
    if encoder.preprocessing.get("architecture") == "DPRContextEncoder":
        raise ValueError(
            f"the index's encoder {encoder.name!r} is a DPR context encoder, which embeds "
            "passages, not questions: pass --query-encoder DIR (its DPRQuestionEncoder)"
        )
    expected = dict(
        encoder_sha256=encoder.weights_sha256,
        encoder_name=encoder.name,
        encoder_preprocessing=encoder.preprocessing,
    )
    return encoder, expected


def _search(args: argparse.Namespace) -> None:
    manifest = Manifest.read(args.index)
    if args.k > manifest.count:  # before the encoder is loaded
        raise ValueError(f"-k {args.k} exceeds the {manifest.count} passages of {args.index}")
    encoder, expected = _query_encoder(args, manifest)
    source = KnowledgeSource(args.index, backend=args.backend, dim=encoder.dim, **expected)
    result, passages = source.retrieve(encode_texts(encoder, args.query), args.k)
    for query, scores, hits in zip(args.query, result.scores, passages, strict=True):
        print(f"query: {query}")
        print(f"{'rank':>4}  {'score':>8}  {'title':<30}  text")
        for rank, (score, passage) in enumerate(zip(scores, hits, strict=True), start=1):
            if passage is None:  # the index found fewer than k documents
                break
            title = textwrap.shorten(passage.title, 30, placeholder="...")
            text = textwrap.shorten(passage.text, 80, placeholder="...")
            print(f"{rank:>4}  {float(score):8.4f}  {title:<30}  {text}")


def _tune(args: argparse.Namespace) -> None:
    manifest = Manifest.read(args.index)
    if manifest.backend != "scann":  # load_index checks it too, but only after the encoder loads
        raise IndexMismatchError(f"index {args.index} was built without a ScaNN searcher")
    try:
        lines = Path(args.questions).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.questions}: not UTF-8 text ({e})") from None
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise ValueError(f"{args.questions}: no questions (one a line)")
    encoder, expected = _query_encoder(args, manifest)
    config = tune_index(
        args.index, encode_texts(encoder, questions), args.k, args.target_recall, **expected
    )
    if config.brute_force:
        print(f"{args.index}: ScaNN scores all {manifest.count} passages exactly; nothing to tune")
        return
    print(
        f"tuned {args.index}: {config.leaves_to_search} of {config.num_leaves} leaves searched, "
        f"{config.reorder_k} candidates re-scored, for recall@{args.k} >= {args.target_recall} "
        f"on {len(questions)} questions"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rag_jax").setLevel(logging.INFO)
    try:
        {"build": _build, "search": _search, "tune": _tune}[args.command](args)
    except (CorpusError, IndexMismatchError, CheckpointError, BuildError, OSError, ValueError) as e:
        notes = "".join(f" ({note})" for note in getattr(e, "__notes__", ()))
        print(f"error: {e}{notes}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
