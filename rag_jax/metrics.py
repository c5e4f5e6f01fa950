"""Answer metrics as the literature computes them, and lenient variants reported beside them.

Strict (the defaults, what papers report):

- :func:`normalize_answer`, :func:`exact_match`, :func:`f1`: SQuAD v1.1's ``evaluate-v1.1.py``
  exactly: lower case, ASCII ``string.punctuation`` deleted, the articles a/an/the removed,
  whitespace collapsed; the maximum over the gold answers; token F1 is 0 when no token is
  shared, which includes a prediction and a gold answer that both normalise to nothing.
- :func:`has_answer`: DPR's ``has_answer`` (``dpr/data/qa_validation.py``), the test behind
  retrieval recall@k: text and answers NFD-normalised, then, in "string" mode, the answer's
  token sequence (DPR's ``SimpleTokenizer``, lower-cased) occurs in the passage's tokens; in
  "regex" mode (CuratedTrec's answer patterns) the pattern, compiled case-insensitively, is
  found in the text (a pattern that does not compile counts as no match). DPR checks the
  passage text, not its title.

Lenient (``lenient_*``, only ever reported beside the strict ones): NFKC and every unicode
punctuation character deleted before SQuAD's steps; F1 1 when both sides normalise to nothing;
``has_answer`` on the normalised words of title and text together; and ``score_record``'s
lenient scores also accept the gold answers as the generator's tokenizer writes them.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Sequence

import regex

RECALL_AT = (1, 5, 10, 20)
MATCH_TYPES = ("string", "regex")

# What each reported key measures (metrics.json carries this beside the numbers).
DEFINITIONS = {
    "em": "exact match, SQuAD v1.1 evaluate-v1.1.py (max over gold answers)",
    "f1": "token F1, SQuAD v1.1 evaluate-v1.1.py (max over gold answers)",
    "recall@k": "a gold answer in a top-k passage's text, DPR has_answer (string match)",
    "em_lenient": "exact match after NFKC and unicode punctuation removal; gold answers also "
    "as the generator's tokenizer writes them",
    "f1_lenient": "token F1 with the lenient normalisation and gold answers",
    "recall@k_lenient": "a gold answer's lenient-normalised words in a top-k passage's title "
    "and text",
}

# --------------------------------------------------------------------------------------
# SQuAD v1.1 (strict)
# --------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, ASCII punctuation deleted, the articles
    a/an/the (whole words) replaced by a space, whitespace collapsed to single spaces.

    Unicode punctuation ("«", "–") and compatibility forms ("ﬁ") are kept as they are.
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    if len(answers) == 0:
        raise ValueError("no gold answers to score against")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if ``normalize_answer(prediction)`` equals a normalised gold answer, else 0.0.

    Raises:
      ValueError: ``answers`` is empty (SQuAD's max over no answers is undefined).
    """
    _check_answers(answers)
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(answer) for answer in answers))


def _f1_tokens(predicted: list[str], gold: list[str]) -> float:
    common = collections.Counter(predicted) & collections.Counter(gold)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(predicted), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD v1.1's token F1, the maximum over the gold answers.

    With P, G the whitespace tokens of the normalised prediction and answer and c the size of
    their multiset intersection: 0 if c == 0 (also when P and G are both empty), else
    ``2 p r / (p + r)`` with ``p = c / |P|``, ``r = c / |G|``.

    Raises:
      ValueError: ``answers`` is empty.
    """
    _check_answers(answers)
    predicted = normalize_answer(prediction).split()
    return max(_f1_tokens(predicted, normalize_answer(answer).split()) for answer in answers)


# --------------------------------------------------------------------------------------
# DPR's has_answer (strict)
# --------------------------------------------------------------------------------------

# DPR's SimpleTokenizer (from DrQA): a run of letters, digits and marks, or any other single
# character that is neither a separator nor a control/format character.
_SIMPLE_TOKEN = regex.compile(
    r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
    flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE,
)


def simple_tokenize(text: str) -> list[str]:
    """DPR's ``SimpleTokenizer(...).tokenize(text).words(uncased=True)``: the tokens of
    ``text``, lower-cased (``text`` is not NFD-normalised here; :func:`has_answer` does it)."""
    return [match.group().lower() for match in _SIMPLE_TOKEN.finditer(text)]


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def regex_match(text: str, pattern: str) -> bool:
    """DPR's ``regex_match``: ``pattern`` (IGNORECASE, UNICODE, MULTILINE; the ``regex``
    package's syntax) is found somewhere in ``text``; a pattern that does not compile is no
    match."""
    try:
        compiled = regex.compile(pattern, flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)
    except Exception:  # DPR: any failure to compile is "no match"
        return False
    return compiled.search(text) is not None


def has_answer(passage: str, answers: Sequence[str], match_type: str = "string") -> bool:
    """DPR's ``has_answer(answers, passage, SimpleTokenizer(), match_type)``.

    ``passage`` is the passage text (DPR does not search the title). Both sides are NFD
    normalised. "string": some answer's token list (:func:`simple_tokenize`) occurs as a
    contiguous run in the passage's; an answer with no token (empty or blank) matches, as in
    DPR. "regex": some answer, a pattern, is found by :func:`regex_match`.

    Raises:
      ValueError: ``match_type`` is not "string" or "regex".
    """
    if match_type not in MATCH_TYPES:
        raise ValueError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")
    text = _nfd(passage)
    if match_type == "regex":
        return any(regex_match(text, _nfd(answer)) for answer in answers)
    tokens = simple_tokenize(text)
    for answer in answers:
        needle = simple_tokenize(_nfd(answer))
        n = len(needle)
        if any(tokens[i : i + n] == needle for i in range(len(tokens) - n + 1)):
            return True
    return False


# --------------------------------------------------------------------------------------
# Lenient variants (reported beside the strict metrics, never instead)
# --------------------------------------------------------------------------------------


def lenient_normalize_answer(text: str) -> str:
    """SQuAD's normalisation made unicode-aware: NFKC, lower case, punctuation (ASCII and any
    unicode punctuation) deleted, the articles a/an/the removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(
        ch
        for ch in text
        if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def lenient_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """:func:`exact_match` with :func:`lenient_normalize_answer`."""
    _check_answers(answers)
    prediction = lenient_normalize_answer(prediction)
    return float(any(prediction == lenient_normalize_answer(answer) for answer in answers))


def lenient_f1(prediction: str, answers: Sequence[str]) -> float:
    """:func:`f1` with :func:`lenient_normalize_answer`, and 1 (not SQuAD's 0) when the
    prediction and an answer both normalise to nothing."""
    _check_answers(answers)
    predicted = lenient_normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = lenient_normalize_answer(answer).split()
        score = (
            float(predicted == gold) if not predicted or not gold else _f1_tokens(predicted, gold)
        )
        best = max(best, score)
    return best


def lenient_has_answer(passage: str, answers: Sequence[str]) -> bool:
    """An answer's leniently normalised word sequence occurs in the leniently normalised
    ``passage`` (callers pass title and text together); an answer normalising to nothing
    never matches."""
    tokens = lenient_normalize_answer(passage).split()
    for answer in answers:
        needle = lenient_normalize_answer(answer).split()
        n = len(needle)
        if n and any(tokens[i : i + n] == needle for i in range(len(tokens) - n + 1)):
            return True
    return False


# --------------------------------------------------------------------------------------
# One evaluation record
# --------------------------------------------------------------------------------------


def score_record(
    record: dict,
    answers: Sequence[str],
    answers_as_written: Sequence[str] = (),
    *,
    lenient: bool = False,
    match_type: str = "string",
) -> dict:
    """Per-question scores of an evaluation record.

    Strict, always: ``em`` and ``f1`` if the record has a ``prediction``; ``recall@k`` for k in
    RECALL_AT (a DPR ``has_answer`` hit, ``match_type`` "string" or "regex" for answers that
    are patterns as CuratedTrec's, in the text of one of the first k of ``texts``) if it
    has passages. With ``lenient``, also ``em_lenient``, ``f1_lenient`` (gold answers plus
    ``answers_as_written``, the answers as the generator's tokenizer writes them, except those
    it writes as nothing: an empty prediction is never right for an answer the tokenizer
    cannot write) and ``recall@k_lenient`` (title and text searched; in "regex" mode with
    the patterns).

    Raises:
      ValueError: ``match_type`` is not "string" or "regex".
    """
    if match_type not in MATCH_TYPES:
        raise ValueError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")
    _check_answers(answers)
    scores = {}
    if "prediction" in record:
        prediction = record["prediction"]
        scores["em"] = exact_match(prediction, answers)
        scores["f1"] = f1(prediction, answers)
        if lenient:
            accepted = [
                *answers,
                *(a for a in answers_as_written if lenient_normalize_answer(a)),
            ]
            scores["em_lenient"] = lenient_exact_match(prediction, accepted)
            scores["f1_lenient"] = lenient_f1(prediction, accepted)
    if "texts" in record:
        hits = [has_answer(text, answers, match_type) for text in record["texts"]]
        for k in RECALL_AT:
            scores[f"recall@{k}"] = float(any(hits[:k]))
        if lenient:
            pairs = zip(record["titles"], record["texts"], strict=True)
            if match_type == "regex":
                hits = [has_answer(f"{title} {text}", answers, "regex") for title, text in pairs]
            else:
                hits = [lenient_has_answer(f"{title} {text}", answers) for title, text in pairs]
            for k in RECALL_AT:
                scores[f"recall@{k}_lenient"] = float(any(hits[:k]))
    return scores


def score_keys(lenient: bool) -> tuple[str, ...]:
    """The keys :func:`score_record` may report, strict first."""
    strict = ("em", "f1", *(f"recall@{k}" for k in RECALL_AT))
    if not lenient:
        return strict
    return (*strict, "em_lenient", "f1_lenient", *(f"recall@{k}_lenient" for k in RECALL_AT))
