"""Tokenization of RAG's inputs: questions for the query encoder, generator inputs, targets.

The generator-input rule is written here once, for host and device retrieval alike: a
generator input is ``prefix + title + title_sep + text + doc_sep + question``, exactly as
transformers' ``RagRetriever.postprocess_docs`` builds it; when it is too long the passage is
cut, never the question (:func:`tokenize_contexts`). :func:`passage_text` and
:func:`question_suffix` are its two pieces, which device retrieval tokenizes apart.

Shapes: B batch, K documents per question, L question length, S context length, T target
length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rag_jax.rag import RagConfig


def _passage(title: str, text: str, config: RagConfig) -> str:
    title = title.removeprefix('"').removesuffix('"')  # as transformers' RagRetriever
    return config.prefix + title + config.title_sep + text


def context_string(title: str, text: str, question: str, config: RagConfig) -> str:
    """One generator input, built exactly as transformers' ``RagRetriever.postprocess_docs``."""
    return (_passage(title, text, config) + config.doc_sep + question).replace("  ", " ")


def passage_text(title: str, text: str, config: RagConfig) -> str:
    """The passage's part of a generator input: ``prefix + title + title_sep + text``."""
    return _passage(title, text, config).replace("  ", " ")


def question_suffix(question: str, config: RagConfig) -> str:
    """The question's part of a generator input: ``doc_sep + question``."""
    return (config.doc_sep + question).replace("  ", " ")


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
        rows.append(with_special_tokens(tokenizer, passage_ids[:budget] + suffix_ids))
    return pad(rows, S, tokenizer.pad_token_id, n_truncated)


def with_special_tokens(tokenizer, ids: list[int]) -> list[int]:
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


def pad(rows: list[list[int]], length: int, pad_id: int, n_truncated: int) -> Tokenized:
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
    return pad(rows, max_length, tokenizer.pad_token_id, n_truncated)


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


def special_tokens(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens ``tokenizer(text)`` puts before and after a text's tokens."""
    marked = with_special_tokens(tokenizer, [-1])
    at = marked.index(-1)
    return tuple(marked[:at]), tuple(marked[at + 1 :])
