"""Evaluation: retrieve, decode, and score answers (exact match, token F1, retrieval recall@k).

``eval.py`` is a thin wrapper around :func:`evaluate`. Predictions stream to a JSONL file a
batch at a time (memory does not grow with the evaluation file), and an interrupted run
resumes after the last question written, but only into the same evaluation: the settings,
checkpoint step, index and data file are recorded in ``eval_settings.json`` beside the
predictions, and a run with any of them different is refused, naming what differs.

Scores are the literature's (:mod:`rag_jax.metrics`): ``em`` and ``f1`` are SQuAD v1.1's
(``evaluate-v1.1.py``, the maximum over the gold answers), ``recall@k`` is DPR's
``has_answer`` (string match on the passage text). ``EvalSettings(lenient=True)`` adds
``em_lenient``, ``f1_lenient`` and ``recall@k_lenient`` beside them, never instead.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax import decode
from rag_jax.data import QAExample, read_qa
from rag_jax.metrics import (  # re-exported: the evaluation's metrics, as callers import them
    DEFINITIONS,
    MATCH_TYPES,
    RECALL_AT,
    exact_match,
    f1,
    has_answer,
    normalize_answer,
    score_keys,
    score_record,
)
from rag_jax.rag import RagConfig, RagModel, embed_questions
from rag_jax.tokenization import tokenize_contexts, tokenize_questions

__all__ = [
    "DECODE_MODES",
    "RECALL_AT",
    "EvalSettings",
    "Evaluator",
    "default_decode",
    "evaluate",
    "exact_match",
    "f1",
    "has_answer",
    "latest_checkpoint_step",
    "normalize_answer",
    "score_record",
]

DECODE_MODES = ("token", "thorough", "fast")


# --------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------


def default_decode(config: RagConfig) -> str:
    """The decoding that follows the model's training: "token" for RAG-Token (and closed-book
    models, which have one document), "thorough" (eq. 1 of the paper) for RAG-Sequence."""
    return "thorough" if config.marginalization == "sequence" else "token"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How to evaluate.

    Attributes:
      decode: "token", "thorough" or "fast"; None follows the model (:func:`default_decode`).
      beams: W, the beam size (1: greedy).
      n_docs: K, documents the generator reads; None: the model's K.
      max_length: generated tokens, start token included.
      batch_size: questions per batch, the last one filled up to it (:meth:`Evaluator.answer`);
        it changes speed and memory, not the results.
      retrieval_only: retrieve and score recall@k only.
      lenient: also report the lenient scores (``*_lenient``) beside the strict ones.
      match: how recall@k finds an answer in a passage, DPR's ``has_answer`` match type:
        "string" (token runs) or "regex" (the answers are patterns, as CuratedTrec's).
    """

    decode: str | None = None
    beams: int = 4
    n_docs: int | None = None
    max_length: int = 20
    batch_size: int = 8
    retrieval_only: bool = False
    lenient: bool = False
    match: str = "string"

    def __post_init__(self):
        if self.match not in MATCH_TYPES:
            raise ValueError(f"match must be one of {MATCH_TYPES}, got {self.match!r}")
        if self.decode is not None and self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        for name in ("beams", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_docs is not None and self.n_docs < 1:
            raise ValueError(f"n_docs must be >= 1, got {self.n_docs}")


def _batches(examples: list[QAExample], size: int) -> Iterator[list[QAExample]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


class Evaluator:
    """Answers questions with a trained model: retrieval, then decoding, batched.

    Args:
      model: the RagModel; question_tokenizer, generator_tokenizer: its tokenizers.
      knowledge: a :class:`rag_jax.index.KnowledgeSource` (None for closed-book models);
        ``knowledge.swap(dir)`` changes what the model knows without retraining.
      settings: EvalSettings. ``self.settings`` holds them resolved: ``decode`` the mode
        actually used (the model's default for None; "token" for a closed-book model, whose
        one document makes the modes equal), ``n_docs`` the K actually read.
      checkpoint_step: the training step of the model's checkpoint, recorded with the
        predictions so that a resume never mixes two checkpoints (None: unknown).

    Every index the model reads is checked against its query encoder: ``knowledge`` (its
    vector size, and the pooling, normalisation and tokenizer files of the encoder that built
    it) here, and any index swapped in later (``knowledge.swap``) against ``knowledge``'s
    document encoder and against K: a swap to an index of fewer than ``n_docs`` passages is
    refused and the current index keeps serving (``KnowledgeSource.require_passages``).

    Raises:
      ValueError: n_docs larger than the index.
      IndexMismatchError: ``knowledge`` was built for another query encoder.
    """

    def __init__(
        self,
        model: RagModel,
        question_tokenizer,
        generator_tokenizer,
        knowledge,
        settings: EvalSettings,
        *,
        checkpoint_step: int | None = None,
    ):
        self.model = model
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.knowledge = knowledge
        self.checkpoint_step = checkpoint_step
        self.n_docs = settings.n_docs or model.config.n_docs
        if knowledge is not None:
            n_passages = knowledge.manifest.count
            if self.n_docs > n_passages:
                raise ValueError(
                    f"n_docs {self.n_docs} is larger than the index's {n_passages} passages"
                )
            _check_knowledge(knowledge, model, question_tokenizer)
            knowledge.require_passages(self.n_docs)
        if model.config.closed_book or settings.decode is None:
            settings = dataclasses.replace(settings, decode=default_decode(model.config))
        self.settings = dataclasses.replace(settings, n_docs=self.n_docs)
        self.decode_config = decode.DecodeConfig.from_generator(
            model.generator.config, beam_size=settings.beams, max_length=settings.max_length
        )

    @classmethod
    def from_workdir(
        cls,
        workdir: str | Path,
        settings: EvalSettings | None = None,
        *,
        config=None,
        step: int | None = None,
        index: str | Path | None = None,
    ) -> Evaluator:
        """The Evaluator of the model trained in ``workdir``: the one set-up of ``eval.py`` and
        ``rag_jax.ask`` (:func:`rag_jax.checkpoints.open_workdir`).

        Args:
          workdir: a ``train.py`` workdir, from any current directory.
          settings: default ``EvalSettings()``.
          config: default the one recorded in ``workdir/config.json``; a config given is
            refused where it differs from the recorded one in a field that changes the model,
            p(z|x) or the generator's inputs (``checkpoints.check_eval_config``; K, the data
            and the index may differ).
          step: the checkpoint; default the latest.
          index: the index directory to answer from; default the config's ``data.index``.
            Whichever it is, it is checked against the model's query encoder (vector size,
            pooling, normalisation, tokenizer), against the document encoder of the index
            the model was trained with (recorded in the workdir; for a workdir recorded before
            that, the config's ``data.index`` if it still exists) and against K.

        Raises:
          FileNotFoundError: not a workdir, no checkpoint, a missing path.
          ValueError: a differing config (naming the fields); an index that does not fit
            (``IndexMismatchError``, naming it); n_docs larger than the index.
        """
        from rag_jax import builders
        from rag_jax.checkpoints import open_workdir

        settings = EvalSettings() if settings is None else settings
        run = open_workdir(workdir, config, step)
        knowledge = None
        if not run.model.config.closed_book:
            document_encoder = run.document_encoder
            training_index = Path(run.config.data.index)
            if document_encoder is None and (training_index / "manifest.json").is_file():
                from rag_jax.index import Manifest

                manifest = Manifest.read(training_index)
                document_encoder = {
                    "encoder_name": manifest.encoder_name,
                    "encoder_sha256": manifest.encoder_sha256,
                }
            knowledge = builders.open_knowledge(
                run.config, run.model, index_dir=index, document_encoder=document_encoder,
                min_passages=settings.n_docs or run.model.config.n_docs,
            )  # fmt: skip
        return cls(
            run.model, run.question_tokenizer, run.generator_tokenizer, knowledge, settings,
            checkpoint_step=run.step,
        )  # fmt: skip

    def identity(self, data: str | Path) -> dict:
        """What makes an evaluation's predictions on ``data`` what they are (JSON-ready):
        the resolved settings but batch_size, the model's marginalization and checkpoint
        step, the index (path and manifest identity) and the data file (path, bytes,
        SHA-256)."""
        settings = dataclasses.asdict(self.settings)
        del settings["batch_size"]  # changes speed, not predictions
        index = None
        if self.knowledge is not None:
            manifest = self.knowledge.manifest
            index = {
                "path": str(Path(self.knowledge.path).resolve()),
                **{
                    key: getattr(manifest, key)
                    for key in ("corpus_sha256", "encoder_sha256", "count", "backend", "created")
                },
            }
        return {
            **settings,
            "marginalization": self.model.config.marginalization,
            "checkpoint_step": self.checkpoint_step,
            "index": index,
            "data": _file_identity(Path(data)),
        }

    def answer(self, questions: Sequence[str]) -> list[dict]:
        """One record per question: prediction, retrieved ids, titles, p(z|x) (and texts).

        The questions go through the model ``settings.batch_size`` at a time, the last batch
        filled up to that size with copies of its last question (their records dropped):
        every jitted program (question encoder, search, decoding) sees one batch shape, so an
        evaluation compiles each of them once, whatever its number of questions.

        Raises:
          ValueError: a question is empty or blank (naming its position in ``questions``).
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a sequence of strings, not one string")
        for i, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"question {i} must be a non-empty string, got {question!r}")
        size = self.settings.batch_size
        records = []
        for start in range(0, len(questions), size):
            batch = list(questions[start : start + size])
            padded = batch + batch[-1:] * (size - len(batch))
            records += self._answer_batch(padded)[: len(batch)]
        return records

    def _answer_batch(self, questions: list[str]) -> list[dict]:
        config = self.model.config
        q = tokenize_questions(self.question_tokenizer, questions, config.max_question_length)
        records = [{"question": question} for question in questions]
        B = len(questions)
        if config.closed_book:
            contexts = self.generator_tokenizer(
                list(questions),
                truncation=True,
                max_length=config.max_context_length,
                padding="max_length",
            )
            context_ids = np.asarray(contexts["input_ids"], np.int32)[:, None]
            context_mask = np.asarray(contexts["attention_mask"], bool)[:, None]
            doc_scores = np.zeros((B, 1), np.float32)
        else:
            query = np.asarray(embed_questions(*nnx.split(self.model.query_encoder), q.ids, q.mask))
            k = min(max(max(RECALL_AT), self.n_docs), self.knowledge.manifest.count)
            result, passages = self.knowledge.retrieve(query, k)
            ids, scores = np.asarray(result.ids), np.asarray(result.scores, np.float32)
            scores = scores * config.doc_score_scale  # as RagModel.doc_scores scales them
            doc_scores = np.where(ids[:, : self.n_docs] >= 0, scores[:, : self.n_docs], -np.inf)
            probs = np.asarray(jax.nn.softmax(jnp.asarray(doc_scores), axis=-1))
            for b, record in enumerate(records):
                record["retrieved_ids"] = [int(i) for i in ids[b]]
                record["titles"] = [p.title if p else "" for p in passages[b]]
                record["texts"] = [p.text if p else "" for p in passages[b]]
                record["doc_probs"] = [round(float(p), 6) for p in probs[b]]
            if self.settings.retrieval_only:
                return records
            decode.check_documents(doc_scores)
            K, S = self.n_docs, config.max_context_length
            contexts = tokenize_contexts(
                self.generator_tokenizer,
                [p.title if p else "" for row in passages for p in row[:K]],
                [p.text if p else "" for row in passages for p in row[:K]],
                [question for question in questions for _ in range(K)],
                config,
            )
            context_ids, context_mask = (
                contexts.ids.reshape(B, K, S),
                contexts.mask.reshape(B, K, S),
            )
        sequences, log_likelihoods = self._decode(context_ids, context_mask, doc_scores)
        texts = self.generator_tokenizer.batch_decode(
            np.asarray(sequences), skip_special_tokens=True
        )
        for record, text, ll in zip(records, texts, np.asarray(log_likelihoods), strict=True):
            record["prediction"] = text.strip()
            record["log_likelihood"] = float(ll)
        return records

    def as_written(self, answers: Sequence[str]) -> list[str]:
        """The answers as the generator's tokenizer writes them: encoded, then decoded.

        A lossy tokenizer cannot write some answers exactly (uncased WordPiece spaces out
        punctuation: "Kinkaku-ji" comes back as "kinkaku - ji", which SQuAD's normalisation
        turns into "kinkaku ji", not "kinkakuji"); scoring accepts this form too, so the
        model is not marked wrong for what its tokenizer cannot express. For a lossless
        tokenizer (BART's byte-level BPE) this is the answers themselves.
        """
        tokenizer = self.generator_tokenizer
        ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _decode(self, context_ids, context_mask, doc_scores):
        generator, config = self.model.generator, self.decode_config
        if self.settings.decode == "token":
            sequences, _, lls = decode.rag_token_generate(
                generator, context_ids, context_mask, doc_scores, config
            )
            return sequences[:, 0], lls[:, 0]
        sequences, lls = decode.rag_sequence_generate(
            generator, context_ids, context_mask, doc_scores, config, mode=self.settings.decode
        )
        return sequences[:, 0], lls[:, 0]


def _check_knowledge(knowledge, model: RagModel, question_tokenizer) -> None:
    """Raises IndexMismatchError unless ``knowledge``'s index was built for ``model``'s query
    encoder: the same vector size, and (where both record them) pooling, normalisation and
    tokenizer files (those of ``question_tokenizer``'s directory)."""
    from rag_jax.builders import query_preprocessing

    tokenizer_dir = getattr(question_tokenizer, "name_or_path", "")
    preprocessing = None
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        preprocessing = query_preprocessing(model, tokenizer_dir)
    knowledge.manifest.check(
        knowledge.path,
        dim=model.query_encoder.output_dim,
        encoder_preprocessing=preprocessing,
    )


SETTINGS_FILE = "eval_settings.json"


def latest_checkpoint_step(workdir: str | Path) -> int | None:
    """The latest finished checkpoint step in ``workdir/checkpoints`` (orbax names a step's
    directory by the bare integer; unfinished ones carry a suffix), or None if there is none."""
    from rag_jax.checkpoints import saved_steps  # lazily, as from_workdir: the one rule

    return max(saved_steps(Path(workdir)), default=None)


def evaluate(
    evaluator: Evaluator, data: str | Path, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Answers every question of ``data``, writing ``eval_settings.json`` (the evaluation's
    :meth:`Evaluator.identity`), ``predictions.jsonl`` and ``metrics.json`` to ``out_dir``.

    Resumable: questions already in ``out_dir/predictions.jsonl`` (an interrupted run of the
    same evaluation) are not redone. Returns the metrics: the means of the per-question
    scores (:func:`rag_jax.metrics.score_record`), their ``definitions``, and the settings.

    Raises:
      ValueError: ``out_dir`` holds another evaluation (its ``eval_settings.json`` differs:
        the message names the fields), or predictions without ``eval_settings.json``, or
        answers to other questions; a malformed or empty data file. Nothing is written then.
    """
    from tqdm.auto import tqdm

    examples, _ = read_qa(data)
    out_dir = Path(out_dir)
    identity = json.loads(json.dumps(evaluator.identity(data)))  # as it reads back from JSON
    predictions = out_dir / "predictions.jsonl"
    _check_same_evaluation(out_dir, identity)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / SETTINGS_FILE, identity)
    done = _finished_questions(predictions, examples)
    todo = examples[done:]
    lenient = evaluator.settings.lenient
    start = time.perf_counter()
    with (
        predictions.open("a") as f,
        tqdm(total=len(examples), initial=done, desc="eval", unit="q", disable=not progress) as bar,
    ):
        for batch in _batches(todo, evaluator.settings.batch_size):
            for record, example in zip(
                evaluator.answer([e.question for e in batch]), batch, strict=True
            ):
                record["answers"] = list(example.answers)
                written = evaluator.as_written(example.answers) if lenient else ()
                match = evaluator.settings.match
                scores = score_record(
                    record, example.answers, written, lenient=lenient, match_type=match
                )
                record.update(scores)
                record.pop("texts", None)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    metrics = _aggregate(predictions, score_keys(lenient))
    metrics.update(
        definitions={key: _definition(key, evaluator.settings.match) for key in metrics},
        n_questions=len(examples),
        questions_per_second=len(todo) / seconds if todo and seconds > 0 else None,
        decode=evaluator.settings.decode,
        beams=evaluator.settings.beams,
        n_docs=evaluator.n_docs,
        lenient=lenient,
        match=evaluator.settings.match,
        checkpoint_step=evaluator.checkpoint_step,
        index=str(evaluator.knowledge.path) if evaluator.knowledge is not None else None,
    )
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _definition(key: str, match: str) -> str:
    """The definition of score ``key`` as measured with has_answer's ``match`` type."""
    definition = DEFINITIONS[_generic(key)]
    if match == "regex" and _generic(key) == "recall@k":
        return definition.replace("(string match)", "(regex match: the answers are patterns)")
    return definition


def _generic(key: str) -> str:
    """ "recall@5_lenient" -> "recall@k_lenient": the key of its definition."""
    if key.startswith("recall@"):
        return "recall@k" + ("_lenient" if key.endswith("_lenient") else "")
    return key


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _file_identity(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _check_same_evaluation(out_dir: Path, identity: dict) -> None:
    """Raises ValueError, one line naming what differs, unless ``out_dir`` is new or holds
    the evaluation ``identity`` describes."""
    record = out_dir / SETTINGS_FILE
    if not record.exists():
        if (out_dir / "predictions.jsonl").exists():
            raise ValueError(
                f"{out_dir / 'predictions.jsonl'} has no {SETTINGS_FILE} beside it (written by "
                "an earlier version?): its settings are unknown; use another output directory"
            )
        return
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{record} is not JSON ({error}); use another output directory") from None
    saved, now = _flatten(saved), _flatten(identity)
    differing = [key for key in {**saved, **now} if saved.get(key) != now.get(key)]
    if differing:
        changes = "; ".join(
            f"{key} {saved.get(key)!r} there, {now.get(key)!r} now" for key in differing
        )
        raise ValueError(
            f"{out_dir} holds another evaluation ({changes}); use another output directory"
        )


def _finished_questions(predictions: Path, examples: list[QAExample]) -> int:
    """How many leading examples ``predictions`` already answers (a torn last line is cut)."""
    if not predictions.exists():
        return 0
    lines = predictions.read_bytes().split(b"\n")
    good = []
    for line in lines:
        try:
            good.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
    n = 0
    while n < len(good) and n < len(examples) and good[n].get("question") == examples[n].question:
        n += 1
    if n < len(good):
        raise ValueError(
            f"{predictions} answers other questions than the data file (line {n + 1}); "
            "use another output directory"
        )
    with predictions.open("wb") as f:  # drop a torn last line
        f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in good[:n]))
    return n


def _aggregate(predictions: Path, keys: Sequence[str]) -> dict:
    """The mean of each score in ``keys`` over the records of ``predictions`` having it."""
    totals, counts = collections.Counter(), collections.Counter()
    with predictions.open() as f:
        for line in f:
            record = json.loads(line)
            for key in keys:
                if key in record:
                    totals[key] += record[key]
                    counts[key] += 1
    return {key: totals[key] / counts[key] for key in keys if counts[key]}
