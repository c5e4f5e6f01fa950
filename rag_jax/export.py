"""Export a trained model: ``python -m rag_jax.export --workdir RUN --out DIR [--step N]``.

A ``train.py`` workdir holds orbax checkpoints of the whole train state. An export writes the
model alone as two Hugging Face checkpoint directories, each with its tokenizer, that a config's
model fields (and transformers' ``from_pretrained``) load::

    DIR/question_encoder/   BERT_q   (model.question_encoder)
    DIR/generator/          BART     (model.generator)
    DIR/doc_encoder/        BERT_d, when the run trained it (model.train_doc_encoder): the
                            encoder to build the model's index with (index build --encoder)
    DIR/export.json         the workdir and step it came from, the RagConfig, and the
                            document encoder every index for the model must be built with

so a trained generator can start another run (the demo's warm-up -> RAG), and
:func:`load_exported` gives back the RagModel. The tokenizer files are copied byte for byte,
so an index's check of the query encoder's tokenizer still passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import ml_collections

from rag_jax import _files

EXPORT_FILE = "export.json"
# everything an export holds
_ENTRIES = {EXPORT_FILE, "question_encoder", "generator", "doc_encoder"}


class ExportError(ValueError):
    """An export that must not start: no trained workdir, or a target that is not an export."""


def _check_target(out: Path) -> None:
    """Raises ExportError unless ``out`` is absent, an empty directory or an earlier export:
    a directory of anything else is the user's, never replaced."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory: refusing to replace it")
    entries = {entry.name for entry in out.iterdir()}
    if entries and (EXPORT_FILE not in entries or not entries <= _ENTRIES):
        raise ExportError(
            f"--out {out} is a directory that is not an export of rag_jax (no {EXPORT_FILE}, or "
            f"other files: {sorted(entries - _ENTRIES)[:5]}): refusing to replace it"
        )


def _copy_tokenizer(source: str | os.PathLike, out: Path) -> None:
    """The tokenizer files of directory ``source`` (a tokenizer's ``name_or_path``), unchanged."""
    from rag_jax.models.inputs import TOKENIZER_FILES

    source = Path(source)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def export(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
) -> dict:
    """Writes the model trained in ``workdir`` to ``out`` (see the module docstring).

    Args:
      workdir: a ``train.py`` workdir with at least one finished checkpoint.
      out: the export directory; created, or an earlier export replaced, in one rename
        (``_files.replace_dir``): a failure leaves what was there.
      config: the config the run trained with; default: the one ``workdir`` recorded (one
        given is checked against it, ``checkpoints.check_eval_config``).
      step: the checkpoint to export; default: the latest.

    Returns:
      What ``out/export.json`` records: ``{"workdir", "step", "rag", "document_encoder"}``
      (the last: name and weights SHA-256 of the encoder an index must be built with, None
      for a closed-book model).

    Raises:
      ExportError: ``out`` is a file or a directory that is not an export (checked before the
        checkpoint is read).
      FileNotFoundError: ``workdir`` has no recorded config or holds no checkpoint (or no
        such ``step``).
      ValueError: ``config`` differs from the recorded one (naming the fields).
      CheckpointError: a parameter is not finite (nothing is written).
    """
    from rag_jax.checkpoints import open_workdir
    from rag_jax.models import save_bart, save_bert_encoder

    workdir, out = Path(workdir), Path(out)
    _check_target(out)
    run = open_workdir(workdir, config, step)
    model, question_tokenizer, generator_tokenizer = (
        run.model, run.question_tokenizer, run.generator_tokenizer
    )  # fmt: skip
    record = {
        "workdir": str(run.workdir),
        "step": run.step,
        "rag": dataclasses.asdict(model.config),
        "document_encoder": run.document_encoder,
    }
    with _files.staged_dir(out) as staging:
        save_bert_encoder(model.query_encoder, staging / "question_encoder")
        _copy_tokenizer(question_tokenizer.name_or_path, staging / "question_encoder")
        if model.doc_encoder is not None:
            from rag_jax.doc_encoder import doc_encoder_dir
            from rag_jax.models.hf_bert import tokenizer_dir

            save_bert_encoder(model.doc_encoder, staging / "doc_encoder")
            _copy_tokenizer(tokenizer_dir(doc_encoder_dir(run.config)), staging / "doc_encoder")
        save_bart(model.generator, staging / "generator")
        _copy_tokenizer(generator_tokenizer.name_or_path, staging / "generator")
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _check_target(out)  # still ours: nothing else appeared there meanwhile
    return record


def load_exported(directory: str | os.PathLike, **load_args):
    """``(model, question_tokenizer, generator_tokenizer)`` from an :func:`export` directory.

    ``load_args`` (``dtype``, ``remat``) go to ``rag.load_rag``.

    Raises:
      ExportError: ``directory`` holds no ``export.json``.
    """
    from rag_jax.models import load_bert_tokenizer
    from rag_jax.rag import RagConfig, load_rag

    directory = Path(directory)
    if not (directory / EXPORT_FILE).is_file():
        raise ExportError(f"{directory} is not an export (no {EXPORT_FILE})")
    record = _files.read_json(directory / EXPORT_FILE, ExportError)
    model = load_rag(
        question_encoder_dir=directory / "question_encoder",
        generator_dir=directory / "generator",
        config=RagConfig(**record["rag"]),
        **load_args,
    )
    return (
        model,
        load_bert_tokenizer(directory / "question_encoder"),
        load_bert_tokenizer(directory / "generator"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag_jax.export", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="a train.py workdir")
    parser.add_argument("--out", required=True, type=Path, help="the export directory")
    parser.add_argument("--step", type=int, help="the checkpoint (default: the latest)")
    args = parser.parse_args(argv)
    from rag_jax.models.hf_io import CheckpointError

    try:
        record = export(args.workdir, args.out, step=args.step)
    except (ExportError, CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"exported step {record['step']} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
