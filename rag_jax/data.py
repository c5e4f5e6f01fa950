"""The input pipeline: QA files, generator inputs and targets, and retrieval on the host.

``read_qa`` reads (question, answers) pairs; :class:`BatchBuilder` turns a list of them into a
:class:`rag_jax.rag.RagBatch` of numpy arrays: it embeds the questions with the current query
encoder (no gradient), searches the :class:`rag_jax.index.KnowledgeSource`, fetches the
passages and tokenizes the generator inputs exactly as transformers' ``RagRetriever`` builds
them (``prefix + title + title_sep + text + doc_sep + question``), cutting the passage, never
the question, when the input is too long.

Shapes: B batch, K documents per question, L question length, S context length, T target
length, H hidden size.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from rag_jax.models.inputs import check_token_ids
from rag_jax.rag import RagBatch, RagConfig


class QAFormatError(ValueError):
    """A bad line in a QA file; the message starts with ``FILE:LINE:``."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]  # the first is the training target (see target_answer)


def read_qa(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[QAExample], int]:
    """Reads QA pairs; returns ``(examples, n_skipped)``.

    Formats, by content: JSONL ``{"question": str, "answers": [str, ...]}`` a line; DPR's
    JSON file (a list of such objects, extra keys ignored); or a TSV ``question<TAB>["a",
    ...]`` as in DPR's ``nq-*.qa.csv``. Training uses the first answer as the target.

    Raises:
      FileNotFoundError: no such file.
      QAFormatError: ``FILE:LINE: reason`` for a malformed line, an empty question or an empty
        answer list (unless ``skip_bad``, which skips and counts them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {str(path)!r} does not exist")
    records = list(_records(path))
    examples, skipped = [], 0
    for line_no, record in records:
        try:
            examples.append(_example(record))
        except ValueError as error:
            if not skip_bad:
                raise QAFormatError(f"{path}:{line_no}: {error}") from None
            skipped += 1
    if not examples:
        raise QAFormatError(
            f"{path}: no QA pairs" + (f" ({skipped} bad lines skipped)" if skipped else "")
        )
    return examples, skipped


def _records(path: Path) -> Iterator[tuple[int, object]]:
    with path.open("rb") as f:
        head = f.read(1).lstrip()
    if path.suffix == ".json" or head == b"[":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise QAFormatError(f"{path}: not a JSON file: {error}") from None
        if not isinstance(data, list):
            raise QAFormatError(f"{path}: expected a JSON list of QA objects")
        yield from ((i + 1, record) for i, record in enumerate(data))
        return
    tsv = path.suffix in (".csv", ".tsv")
    with path.open(encoding="utf-8", errors="strict", newline="") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if tsv:
                row = next(csv.reader([line], delimiter="\t"))
                yield line_no, row
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_no, ValueError(f"not valid JSON: {error.msg}")


def _example(record: object) -> QAExample:
    if isinstance(record, ValueError):
        raise record
    if isinstance(record, list):  # TSV row: question, JSON list of answers
        if len(record) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(record)}")
        try:
            record = {"question": record[0], "answers": json.loads(record[1])}
        except json.JSONDecodeError as error:
            raise ValueError(f"answers column is not a JSON list: {error.msg}") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with 'question' and 'answers'")
    question, answers = record.get("question"), record.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answers, list) or not answers:
        raise ValueError("'answers' must be a non-empty list of strings")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("every answer must be a non-empty string")
    return QAExample(question.strip(), tuple(a.strip() for a in answers))


# --------------------------------------------------------------------------------------
# Generator inputs and targets
# --------------------------------------------------------------------------------------


def context_string(title: str, text: str, question: str, config: RagConfig) -> str:
    """One generator input, built exactly as transformers' ``RagRetriever.postprocess_docs``."""
    title = title.removeprefix('"').removesuffix('"')
    return (config.prefix + title + config.title_sep + text + config.doc_sep + question).replace(
        "  ", " "
    )


@dataclasses.dataclass
class Tokenized:
    ids: np.ndarray  # (N, length) int32, padded
    mask: np.ndarray  # (N, length) bool
    n_truncated: int  # inputs that were cut


def tokenize_contexts(
    tokenizer,
    titles: Sequence[str],
    texts: Sequence[str],
    questions: Sequence[str],
    config: RagConfig,
) -> Tokenized:
    """``N`` (title, text, question) triples -> generator inputs ``(N, S)``.

    Equal to ``tokenizer(context_string(...))`` when that fits in ``S =
    config.max_context_length`` tokens. When it does not, the passage is cut and the question
    (with ``doc_sep``) kept whole; only a question that alone exceeds ``S`` is cut too. Each
    cut input counts once in ``n_truncated``.
    """
    S = config.max_context_length
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    full = [context_string(*t, config) for t in zip(titles, texts, questions, strict=True)]
    encoded = tokenizer(full, add_special_tokens=True, truncation=False)["input_ids"]
    rows, n_truncated = [], 0
    for i, ids in enumerate(encoded):
        if len(ids) <= S:
            rows.append(ids)
            continue
        n_truncated += 1
        suffix = (config.doc_sep + questions[i]).replace("  ", " ")
        split = full[i].rfind(suffix) if full[i].endswith(suffix) else -1
        if split < 0:  # the double-space rule merged across the boundary: cut the end
            rows.append(_cut_end(tokenizer, full[i], S))
            continue
        passage_ids = tokenizer(full[i][:split], add_special_tokens=False)["input_ids"]
        suffix_ids = tokenizer(full[i][split:], add_special_tokens=False)["input_ids"]
        suffix_ids = suffix_ids[: S - n_special]
        budget = S - n_special - len(suffix_ids)
        rows.append(_with_special_tokens(tokenizer, passage_ids[:budget] + suffix_ids))
    return _pad(rows, S, tokenizer.pad_token_id, n_truncated)


def _with_special_tokens(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` wrapped in the tokenizer's special tokens as ``tokenizer(text)`` wraps them
    (``[CLS] ... [SEP]``, ``<s> ... </s>``). transformers 5's tokenizers dropped
    ``build_inputs_with_special_tokens``: find the wrapping around one known token instead."""
    if hasattr(type(tokenizer), "build_inputs_with_special_tokens"):
        return tokenizer.build_inputs_with_special_tokens(ids)
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    outer = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(outer)) if outer[i : i + len(inner)] == inner)
    return outer[:start] + list(ids) + outer[start + len(inner) :]


def _cut_end(tokenizer, text: str, max_length: int) -> list[int]:
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def _pad(rows: list[list[int]], length: int, pad_id: int, n_truncated: int) -> Tokenized:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return Tokenized(ids, mask, n_truncated)


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int) -> Tokenized:
    """Query-encoder inputs ``(B, L)``; longer questions are cut (and counted)."""
    full = tokenizer(list(questions), truncation=False)["input_ids"]
    n_truncated = sum(len(ids) > max_length for ids in full)
    rows = tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]
    return _pad(rows, max_length, tokenizer.pad_token_id, n_truncated)


@dataclasses.dataclass
class Targets:
    decoder_input_ids: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32, pad id at masked positions
    target_mask: np.ndarray  # (B, T) bool
    n_truncated: int


def tokenize_targets(
    tokenizer, answers: Sequence[str], generator_config, max_length: int
) -> Targets:
    """Answers -> ``targets = [forced BOS] + answer tokens + [EOS]`` and decoder inputs.

    ``decoder_input_ids`` are the targets shifted right after ``decoder_start_token_id``;
    nothing downstream shifts again. A forced BOS (BART's ``forced_bos_token_id``) is the
    first target, as in BART fine-tuning. Answers longer than ``T - 1`` (or ``T - 2``) tokens
    are cut, keeping the EOS, and counted.
    """
    config = generator_config
    start = [config.forced_bos_token_id] if config.forced_bos_token_id is not None else []
    body_max = max_length - len(start) - 1
    if body_max < 1:
        raise ValueError(f"max_target_length {max_length} leaves no room for an answer token")
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    B, T = len(answers), max_length
    targets = np.full((B, T), config.pad_token_id, np.int32)
    decoder_input_ids = np.full((B, T), config.pad_token_id, np.int32)
    target_mask = np.zeros((B, T), bool)
    n_truncated = 0
    for i, ids in enumerate(encoded):
        n_truncated += len(ids) > body_max
        row = [*start, *ids[:body_max], config.eos_token_id]
        targets[i, : len(row)] = row
        target_mask[i, : len(row)] = True
        decoder_input_ids[i, : len(row)] = [config.decoder_start_token_id, *row[:-1]]
    if np.any(targets[target_mask] >= config.vocab_size) or np.any(targets[target_mask] < 0):
        raise ValueError(
            f"the generator tokenizer produced ids outside the generator's vocabulary "
            f"[0, {config.vocab_size})"
        )
    return Targets(decoder_input_ids, targets, target_mask, n_truncated)


# --------------------------------------------------------------------------------------
# Retrieval on the host
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostBatch:
    """A RagBatch (numpy) plus what the loop reports and evaluation prints."""

    batch: RagBatch
    doc_ids: np.ndarray  # (B, K) int64 passage ids, -1 for padding
    titles: list[list[str]]
    n_truncated: dict[str, int]


class BatchBuilder:
    """Questions (and answers) -> a :class:`HostBatch`: embed, search, fetch, tokenize.

    Args:
      config: the RagConfig (K, lengths, separators).
      question_tokenizer, generator_tokenizer: Hugging Face tokenizers.
      generator_config: the generator's BartConfig (special token ids).
      knowledge: a :class:`rag_jax.index.KnowledgeSource` (unused for closed-book models).
      embed_fn: ``(question_ids (B, L), question_mask (B, L)) -> (B, H)`` numpy/jax vectors
        from the current query encoder, without gradient.
      question_vocab_size: the query encoder's vocabulary size; None: question ids unchecked.

    Every batch's token ids are checked against the vocabularies (questions against
    ``question_vocab_size``, generator inputs and targets against the generator's) before any
    model sees them: inside ``jit`` an id >= V would read a NaN embedding.
    """

    def __init__(
        self,
        config: RagConfig,
        question_tokenizer,
        generator_tokenizer,
        generator_config,
        knowledge=None,
        embed_fn: Callable | None = None,
        question_vocab_size: int | None = None,
    ):
        if not config.closed_book and (knowledge is None or embed_fn is None):
            raise ValueError("a retrieval model needs a knowledge source and an embed_fn")
        if knowledge is not None and config.n_docs > knowledge.manifest.count:
            n_passages = knowledge.manifest.count
            raise ValueError(
                f"n_docs {config.n_docs} is larger than the index's {n_passages} passages"
            )
        self.config = config
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.generator_config = generator_config
        self.knowledge = knowledge
        self.embed_fn = embed_fn
        self.question_vocab_size = question_vocab_size

    def __call__(self, examples: Sequence[QAExample], *, with_targets: bool = True) -> HostBatch:
        config = self.config
        questions = [e.question for e in examples]
        q = tokenize_questions(self.question_tokenizer, questions, config.max_question_length)
        if self.question_vocab_size is not None:
            check_token_ids(q.ids, self.question_vocab_size, "question_ids (query tokenizer)")
        B, K = len(examples), config.n_docs
        if config.closed_book:
            K = 1
            contexts = _pad(
                self.generator_tokenizer(
                    questions, truncation=True, max_length=config.max_context_length
                )["input_ids"],
                config.max_context_length,
                self.generator_tokenizer.pad_token_id,
                0,
            )
            doc_vectors = np.zeros((B, 1, 1), np.float32)
            doc_ids = np.full((B, 1), -1, np.int64)
            titles = [[""] for _ in examples]
        else:
            query_emb = np.asarray(self.embed_fn(q.ids, q.mask), np.float32)
            result, passages = self.knowledge.retrieve(query_emb, K)
            doc_ids = np.asarray(result.ids, np.int64)
            doc_vectors = np.asarray(result.doc_vectors, np.float32)
            titles = [[p.title if p else "" for p in row] for row in passages]
            texts = [[p.text if p else "" for p in row] for row in passages]
            contexts = tokenize_contexts(
                self.generator_tokenizer,
                [t for row in titles for t in row],
                [t for row in texts for t in row],
                [question for question in questions for _ in range(K)],
                config,
            )
        S = config.max_context_length
        check_token_ids(
            contexts.ids, self.generator_config.vocab_size, "context_ids (generator tokenizer)"
        )
        if with_targets:
            targets = tokenize_targets(
                self.generator_tokenizer,
                [e.answers[0] for e in examples],
                self.generator_config,
                config.max_target_length,
            )
        else:
            T = config.max_target_length
            zeros = np.zeros((B, T), np.int32)
            targets = Targets(zeros, zeros, np.zeros((B, T), bool), 0)
        batch = RagBatch(
            question_ids=q.ids,
            question_mask=q.mask,
            doc_vectors=doc_vectors,
            doc_mask=doc_ids >= 0,
            context_ids=contexts.ids.reshape(B, K, S),
            context_mask=contexts.mask.reshape(B, K, S),
            decoder_input_ids=targets.decoder_input_ids,
            targets=targets.targets,
            target_mask=targets.target_mask,
        )
        truncated = {
            "question": q.n_truncated,
            "context": contexts.n_truncated,
            "target": targets.n_truncated,
        }
        return HostBatch(batch, doc_ids, titles, truncated)
