"""Evaluation: retrieve, decode, and score answers (exact match, token F1, retrieval recall@k).

``eval.py`` is a thin wrapper around :func:`evaluate`. Predictions stream to a JSONL file a
batch at a time (memory does not grow with the evaluation file), and an interrupted run
resumes after the last question written. Metrics follow SQuAD / DPR: answers are normalised
(:func:`normalize_answer`), exact match and F1 take the maximum over the gold answers, and
retrieval recall@k counts a question when a gold answer's tokens occur in one of its top-k
passages (DPR's ``has_answer``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax import decode
from rag_jax.data import QAExample, read_qa
from rag_jax.rag import RagModel, embed_questions
from rag_jax.tokenization import tokenize_contexts, tokenize_questions

RECALL_AT = (1, 5, 10, 20)
DECODE_MODES = ("token", "thorough", "fast")

# --------------------------------------------------------------------------------------
# Answer normalisation and metrics
# --------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, made unicode-aware: NFKC, lower case, punctuation (ASCII and
    any unicode punctuation) deleted, the articles a/an/the removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(
        ch
        for ch in text
        if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 between normalised prediction and answer, the best over the answers."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
        elif common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def has_answer(passage: str, answers: Sequence[str]) -> bool:
    """DPR's ``has_answer`` (string mode): an answer's normalised token sequence occurs in
    the normalised passage."""
    tokens = normalize_answer(passage).split()
    for answer in answers:
        needle = normalize_answer(answer).split()
        n = len(needle)
        if n and any(tokens[i : i + n] == needle for i in range(len(tokens) - n + 1)):
            return True
    return False


# --------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    decode: str = "token"  # "token", "thorough" or "fast"
    beams: int = 4
    n_docs: int | None = None  # documents the generator reads; default the model's K
    max_length: int = 20  # generated tokens, start token included
    batch_size: int = 8
    retrieval_only: bool = False

    def __post_init__(self):
        if self.decode not in DECODE_MODES:
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
      settings: EvalSettings.
    """

    def __init__(
        self,
        model: RagModel,
        question_tokenizer,
        generator_tokenizer,
        knowledge,
        settings: EvalSettings,
    ):
        self.model = model
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.knowledge = knowledge
        self.settings = settings
        self.n_docs = settings.n_docs or model.config.n_docs
        if knowledge is not None and self.n_docs > knowledge.manifest.count:
            n_passages = knowledge.manifest.count
            raise ValueError(
                f"n_docs {self.n_docs} is larger than the index's {n_passages} passages"
            )
        self.decode_config = decode.DecodeConfig.from_generator(
            model.generator.config, beam_size=settings.beams, max_length=settings.max_length
        )

    def answer(self, questions: Sequence[str]) -> list[dict]:
        """One record per question: prediction, retrieved ids, titles, p(z|x) (and texts)."""
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
        if self.settings.decode == "token" or self.model.config.closed_book:
            sequences, _, lls = decode.rag_token_generate(
                generator, context_ids, context_mask, doc_scores, config
            )
            return sequences[:, 0], lls[:, 0]
        sequences, lls = decode.rag_sequence_generate(
            generator, context_ids, context_mask, doc_scores, config, mode=self.settings.decode
        )
        return sequences[:, 0], lls[:, 0]


def score_record(
    record: dict, answers: Sequence[str], answers_as_written: Sequence[str] = ()
) -> dict:
    """Per-question metrics: em, f1 (if a prediction exists), hit@k (if passages exist).

    ``answers_as_written``: the gold answers as the generator's tokenizer writes them
    (:meth:`Evaluator.as_written`), also accepted by em and f1; recall uses ``answers``.
    """
    scores = {}
    if "prediction" in record:
        accepted = [*answers, *answers_as_written]
        scores["em"] = exact_match(record["prediction"], accepted)
        scores["f1"] = token_f1(record["prediction"], accepted)
    if "texts" in record:
        hits = [
            has_answer(f"{title} {text}", answers)
            for title, text in zip(record["titles"], record["texts"], strict=True)
        ]
        for k in RECALL_AT:
            scores[f"recall@{k}"] = float(any(hits[:k]))
    return scores


def evaluate(
    evaluator: Evaluator, data: str | Path, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Answers every question of ``data``, writing ``predictions.jsonl`` and ``metrics.json``.

    Resumable: questions already in ``out_dir/predictions.jsonl`` (a previous, interrupted
    run with the same data) are not redone. Returns the metrics.
    """
    from tqdm.auto import tqdm

    examples, _ = read_qa(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / "predictions.jsonl"
    done = _finished_questions(predictions, examples)
    todo = examples[done:]
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
                written = evaluator.as_written(example.answers)
                record.update(score_record(record, example.answers, written))
                record.pop("texts", None)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    metrics = _aggregate(predictions)
    metrics.update(
        n_questions=len(examples),
        questions_per_second=len(todo) / seconds if todo and seconds > 0 else None,
        decode=evaluator.settings.decode,
        beams=evaluator.settings.beams,
        n_docs=evaluator.n_docs,
        index=str(evaluator.knowledge.path) if evaluator.knowledge is not None else None,
    )
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(out_dir / "metrics.json")
    return metrics


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


def _aggregate(predictions: Path) -> dict:
    totals, counts = collections.Counter(), collections.Counter()
    with predictions.open() as f:
        for line in f:
            record = json.loads(line)
            for key in ("em", "f1", *(f"recall@{k}" for k in RECALL_AT)):
                if key in record:
                    totals[key] += record[key]
                    counts[key] += 1
    return {key: totals[key] / counts[key] for key in totals}
