"""rag_jax.metrics against the published rules, on hard cases whose values are derived by hand.

The rules (quoted in the comments): SQuAD v1.1's evaluate-v1.1.py ``normalize_answer`` =
white_space_fix(remove_articles(remove_punc(lower(s)))) with remove_punc over ASCII
``string.punctuation`` and remove_articles ``re.sub(r"\\b(a|an|the)\\b", " ", text)``;
``f1_score``: 0 if no common token, else 2pr/(p+r); max over the gold answers. DPR's
``has_answer``: NFD on text and answers; "string": SimpleTokenizer tokens
``[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]`` lower-cased, the answer's token list as a contiguous
run of the text's; "regex": ``re.compile(answer, IGNORECASE + UNICODE + MULTILINE).search(text)``,
a pattern that fails to compile is no match.
"""

import unicodedata

import pytest

from rag_jax.metrics import (
    exact_match,
    f1,
    has_answer,
    lenient_exact_match,
    lenient_f1,
    lenient_has_answer,
    lenient_normalize_answer,
    normalize_answer,
    score_keys,
    score_record,
    simple_tokenize,
)

EN_DASH, RSQUO, NBSP, ZWSP, LIGATURE_FI = "\u2013", "\u2019", "\u00a0", "\u200b", "\ufb01"


@pytest.mark.parametrize(
    "text,strict,lenient",
    [
        ("The Eiffel Tower", "eiffel tower", "eiffel tower"),  # lower, article "the" removed
        (" Paris.", "paris", "paris"),  # "." is ASCII punctuation; split() drops the space
        # «» are not in string.punctuation: SQuAD keeps them; the lenient form deletes them
        ("Théâtre «Bolshoi»", "théâtre «bolshoi»", "théâtre bolshoi"),
        # no NFKC in SQuAD: the ligature stays one character
        (f"{LIGATURE_FI}ve", f"{LIGATURE_FI}ve", "five"),
        # the en dash is unicode punctuation (Pd), not ASCII: kept, so one token
        (f"Galicia{EN_DASH}Volhynia", f"galicia{EN_DASH}volhynia", "galiciavolhynia"),
        ("Kinkaku-ji", "kinkakuji", "kinkakuji"),  # ASCII "-" deleted, not spaced
        (f"(1452{EN_DASH}1519)", f"1452{EN_DASH}1519", "14521519"),  # parentheses ASCII
        ("A\tB\n  C", "b c", "b c"),  # "a" is an article; whitespace collapsed
        ("Anna's", "annas", "annas"),
        (f"Anna{RSQUO}s", f"anna{RSQUO}s", "annas"),  # the curly apostrophe is not ASCII
        ("U.S.A.", "usa", "usa"),
        ("!?...", "", ""),  # punctuation only: nothing left
        ("An", "", ""),  # lower first, then "an" is an article
        ("Theatre of the Absurd", "theatre of absurd", "theatre of absurd"),  # \b: "theatre" stays
        ("the-end", "theend", "theend"),  # punctuation goes before articles: no "the" left
        (f"{NBSP}Paris{NBSP}", "paris", "paris"),  # str.split() splits on NBSP
        ("", "", ""),
    ],
)
def test_normalize_answer_is_squad_v1_1s(text, strict, lenient):
    assert normalize_answer(text) == strict
    assert lenient_normalize_answer(text) == lenient


def test_exact_match_by_hand():
    assert exact_match(" the Mona Lisa", ["Mona Lisa", "La Gioconda"]) == 1.0  # any gold
    assert exact_match("Mona", ["Mona Lisa"]) == 0.0
    assert exact_match("", ["Mona Lisa"]) == 0.0
    # The empty prediction against a punctuation-only answer: "" == "" -> SQuAD's EM is 1.
    assert exact_match("", ["!!!"]) == 1.0
    assert exact_match("the", ["a"]) == 1.0  # both normalise to ""
    # "galiciavolhynia" (ASCII hyphen deleted) vs "galicia–volhynia" (en dash kept)
    assert exact_match("Galicia-Volhynia", [f"Galicia{EN_DASH}Volhynia"]) == 0.0
    assert lenient_exact_match("Galicia-Volhynia", [f"Galicia{EN_DASH}Volhynia"]) == 1.0
    assert exact_match("five", [f"{LIGATURE_FI}ve"]) == 0.0  # no NFKC
    assert lenient_exact_match("five", [f"{LIGATURE_FI}ve"]) == 1.0
    assert exact_match("Annas", [f"Anna{RSQUO}s"]) == 0.0
    assert lenient_exact_match("Annas", [f"Anna{RSQUO}s"]) == 1.0
    with pytest.raises(ValueError, match="no gold answers"):
        exact_match("x", [])


def test_f1_by_hand():
    # [leonardo, da, vinci] vs [da, vinci]: common 2, p 2/3, r 1 -> 2(2/3)/(5/3) = 0.8;
    # the max over gold answers takes it over "raphael" (0).
    assert f1("Leonardo da Vinci", ["Raphael", "da Vinci"]) == pytest.approx(0.8)
    # multiset intersection: [dog, dog, cat] & [dog, cat] = 2 -> p 2/3, r 1 -> 0.8
    assert f1("dog dog cat", ["dog cat"]) == pytest.approx(0.8)
    # [cat] vs [dog, dog, cat]: common 1, p 1, r 1/3 -> 2(1/3)/(4/3) = 0.5
    assert f1("cat", ["dog dog cat"]) == pytest.approx(0.5)
    # "kinkaku - ji" -> [kinkaku, ji]; gold "kinkakuji" shares nothing (0), gold
    # [kinkaku, ji, temple] shares 2: p 1, r 2/3 -> 0.8
    assert f1("kinkaku - ji", ["Kinkaku-ji", "Kinkaku ji temple"]) == pytest.approx(0.8)
    # [galicia, –, volhynia] vs [galicia–volhynia]: nothing in common -> 0
    assert f1(f"Galicia {EN_DASH} Volhynia", [f"Galicia{EN_DASH}Volhynia"]) == 0.0
    # Both sides normalise to nothing: num_same = 0 -> SQuAD v1.1's F1 is 0 (EM is 1).
    assert f1("the", ["a"]) == 0.0
    assert f1("", ["!!!"]) == 0.0
    assert lenient_f1("the", ["a"]) == 1.0  # the lenient rule counts that as a match
    assert f1("", ["x"]) == 0.0 and lenient_f1("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="no gold answers"):
        f1("x", [])


@pytest.mark.parametrize(
    "text,tokens",
    [
        (f"(1452{EN_DASH}1519)", ["(", "1452", EN_DASH, "1519", ")"]),  # each symbol a token
        ("Paris-based", ["paris", "-", "based"]),
        ("Kirchhoff's", ["kirchhoff", "'", "s"]),
        ("1,000", ["1", ",", "000"]),
        (f"a{NBSP}b{ZWSP}c", ["a", "b", "c"]),  # Zs and Cf characters separate, not tokens
        # a combining mark (Mn) belongs to its letter's token
        (unicodedata.normalize("NFD", "Naïve"), [unicodedata.normalize("NFD", "naïve")]),
        ("", []),
    ],
)
def test_simple_tokenize_is_dprs(text, tokens):
    assert simple_tokenize(text) == tokens


NFC_THEATRE = unicodedata.normalize("NFC", "Théâtre")
NFD_THEATRE = unicodedata.normalize("NFD", "Théâtre")


@pytest.mark.parametrize(
    "passage,answers,strict,lenient",
    [
        # [..., "(", "1452", "–", "1519", ")"] holds [1519]; lenient: "14521519", one word
        (f"Leonardo da Vinci (1452{EN_DASH}1519) painted", ["1519"], True, False),
        # [a, paris, -, based, firm] holds [paris]; lenient: "parisbased"
        ("a Paris-based firm", ["Paris"], True, False),
        ("Parisian cafés", ["paris"], False, False),  # whole tokens only, in both
        ("PARIS is large", ["paris"], True, True),  # uncased
        ("built by Gustave Eiffel in 1889", ["Gustave  Eiffel"], True, True),
        # DPR keeps articles: [the, eiffel, tower] is not in [eiffel, tower]
        ("Eiffel Tower", ["The Eiffel Tower"], False, True),
        ("the Eiffel Tower", ["Eiffel Tower"], True, True),
        # NFD on both sides: composed and decomposed accents match
        (NFC_THEATRE, [NFD_THEATRE], True, True),
        (NFD_THEATRE, [NFC_THEATRE], True, True),
        # accents are marks inside the token, not stripped: "théâtre" != "theatre"
        (NFC_THEATRE, ["Theatre"], False, False),
        # NFD does not split the ligature: token "ﬁve" != "five"; NFKC (lenient) does
        (f"{LIGATURE_FI}ve rings", ["five"], False, True),
        # "!" is a token of "Wow!"; leniently it normalises to nothing, which never matches
        ("Wow!", ["!"], True, False),
        # an answer with no token matches anywhere in DPR (the empty run at position 0)
        ("anything", [""], True, False),
        ("", [" "], True, False),
        # the zero-width space (Cf) separates tokens for DPR; str.split() does not split on it
        (f"Paris{ZWSP}France", ["France"], True, False),
        # [1, ",", 000] does not hold [1000]; leniently "1000" is one word
        ("population 1,000", ["1000"], False, True),
        ("Kirchhoff's circuit laws", ["Kirchhoff's"], True, True),
        ("Kirchhoff's circuit laws", ["Kirchhoffs"], False, True),
        # several gold answers: any one suffices
        ("it was built in 1889", ["1890", "1889"], True, True),
    ],
)
def test_has_answer_string_mode_is_dprs(passage, answers, strict, lenient):
    assert has_answer(passage, answers) is strict
    assert lenient_has_answer(passage, answers) is lenient


@pytest.mark.parametrize(
    "passage,patterns,expected",
    [
        ("Built in 1889.", [r"18[0-9]{2}"], True),
        ("Built in 1989.", [r"18[0-9]{2}"], False),
        ("Parisian cafés", ["paris"], True),  # a search, not whole tokens; IGNORECASE
        # a pattern that does not compile counts as no match; the next one still counts
        ("Parisian cafés", ["("], False),
        ("Parisian cafés", ["(", "caf"], True),
        # both sides NFD: the composed "é" of the pattern finds the decomposed one
        (unicodedata.normalize("NFD", "cafés"), [unicodedata.normalize("NFC", "cafés$")], True),
        ("Paris\nFrance", ["^France"], True),  # MULTILINE: ^ after a newline
        ("Mount  Everest", [r"Mount\s+Everest"], True),  # CuratedTrec-style pattern
    ],
)
def test_has_answer_regex_mode_is_dprs(passage, patterns, expected):
    assert has_answer(passage, patterns, match_type="regex") is expected


def test_has_answer_refuses_an_unknown_match_type():
    with pytest.raises(ValueError, match="match_type"):
        has_answer("x", ["x"], match_type="fuzzy")


def test_score_record_strict_by_default_lenient_beside():
    record = {
        "prediction": "kinkaku - ji",
        "titles": ["Kyoto", "Kinkaku-ji"],
        "texts": ["a temple city", "Kinkaku-ji is a temple"],
    }
    written = ["kinkaku - ji"]  # as an uncased WordPiece tokenizer writes "Kinkaku-ji"
    strict = score_record(record, ["Kinkaku-ji"], written)
    # "kinkaku ji" != "kinkakuji" (em 0, f1 0: no common token); the gold's tokens
    # [kinkaku, -, ji] are in the second passage's text: recall@1 0, recall@5.. 1
    assert strict == {"em": 0.0, "f1": 0.0, "recall@1": 0.0, "recall@5": 1.0,
                      "recall@10": 1.0, "recall@20": 1.0}  # fmt: skip
    both = score_record(record, ["Kinkaku-ji"], written, lenient=True)
    assert {k: both[k] for k in strict} == strict  # the strict scores are not replaced
    assert (both["em_lenient"], both["f1_lenient"]) == (1.0, 1.0)  # the written form accepted
    assert set(both) == set(score_keys(lenient=True))


def test_score_record_title_counts_only_leniently():
    # DPR searches the passage text; the lenient recall also searches the title.
    record = {"titles": ["Paris"], "texts": ["the capital of France"]}
    scores = score_record(record, ["Paris"], lenient=True)
    assert scores["recall@1"] == 0.0 and scores["recall@1_lenient"] == 1.0


def test_an_empty_prediction_is_not_right_for_an_answer_the_tokenizer_cannot_write():
    # The tokenizer writes "🙂" as nothing (its [UNK] is dropped); accepting that form would
    # make the empty prediction exact. "🙂" is a symbol (So), not punctuation: it normalises
    # to itself, so no rule makes "" equal to it.
    scores = score_record({"prediction": ""}, ["🙂"], [""], lenient=True)
    assert scores == {"em": 0.0, "f1": 0.0, "em_lenient": 0.0, "f1_lenient": 0.0}
