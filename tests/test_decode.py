"""Decoding against transformers' generate, and the scores against the losses."""

import json

import numpy as np
import pytest
import torch
import transformers

from rag_jax import decode
from rag_jax.decode import DecodeConfig
from rag_jax.marginalize import rag_sequence_log_likelihood, target_log_probs
from rag_jax.models import load_bart, save_bart
from tests.oracles import PAD, bart_config, rag_for_generation, rag_generate, random_model

B, K, S = 2, 3, 10
BOS, EOS, START = 0, 2, 2  # BART's forced BOS and EOS (facebook/bart-large's), decoder start


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """A random BART whose generation config forces BOS and EOS (as facebook/bart-large's),
    saved by transformers, which writes them to generation_config.json only, and loaded in
    ours."""
    root = tmp_path_factory.mktemp("gen")
    theirs = random_model(bart_config(), seed=3)
    theirs.generation_config.forced_bos_token_id = BOS
    theirs.generation_config.forced_eos_token_id = EOS
    theirs.save_pretrained(root / "g")
    config_json = json.loads((root / "g" / "config.json").read_text())
    generation_json = json.loads((root / "g" / "generation_config.json").read_text())
    assert config_json.get("forced_bos_token_id") is None  # not in config.json: read elsewhere
    assert config_json.get("forced_eos_token_id") is None
    assert generation_json["forced_bos_token_id"] == BOS
    assert generation_json["forced_eos_token_id"] == EOS
    ours = load_bart(root / "g")
    assert (ours.config.forced_bos_token_id, ours.config.forced_eos_token_id) == (BOS, EOS)
    return theirs, ours


def contexts(seed: int, vocab_size: int, padded: bool = True):
    """``(B, K, S)`` context ids and mask (one document padded if ``padded``), doc scores."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(B, K, S))
    mask = np.ones((B, K, S), bool)
    if padded:
        mask[0, 1, 6:] = False
    ids[~mask] = PAD
    doc_scores = rng.normal(size=(B, K)).astype(np.float32) * 2
    return ids, mask, doc_scores


def settings(theirs, beams: int, max_length: int = 8, length_penalty=1.0, **extra) -> dict:
    """transformers' generate settings, the forced BOS / EOS passed explicitly: RAG-Token's
    generate reads the RAG model's generation config, which does not inherit the generator's."""
    return dict(num_beams=beams, max_length=max_length, min_length=0,
                length_penalty=length_penalty, early_stopping=False, do_sample=False,
                no_repeat_ngram_size=0, forced_bos_token_id=BOS, forced_eos_token_id=EOS,
                **extra)  # fmt: skip


def ours_config(ours, beams: int, max_length: int = 8, **extra) -> DecodeConfig:
    return DecodeConfig.from_generator(ours.config, beam_size=beams, max_length=max_length, **extra)


def assert_forced(sequences: np.ndarray, max_length: int) -> None:
    """The outputs really were decoded with forced BOS and EOS: BOS after the start token
    everywhere, EOS at the last position of every output that reached max_length."""
    assert np.all(sequences[:, :2] == [START, BOS])
    full = sequences.shape[1] == max_length and sequences[:, -1] != PAD
    assert np.any(full) and np.all(sequences[full, -1] == EOS)


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("beams", [1, 4])
def test_rag_token_generate_equals_transformers(generators, beams):
    theirs, ours = generators
    ids, mask, doc_scores = contexts(0, theirs.config.vocab_size)
    rag = rag_for_generation(transformers.RagTokenForGeneration, theirs, K)
    expected = rag_generate(rag, ids, mask, doc_scores, **settings(theirs, beams))
    assert_forced(expected, 8)
    sequences, _, _ = decode.rag_token_generate(
        ours, ids, mask, doc_scores, ours_config(ours, beams)
    )
    np.testing.assert_array_equal(np.asarray(sequences[:, 0]), pad_to(expected, 8))


def transformers_rescoring(rag, ids, mask, doc_scores, sequences: np.ndarray) -> np.ndarray:
    """``(B, C, M)`` candidates -> ``(B, C)`` transformers' RAG-Sequence generate score
    (``-loss`` of its rescoring forward pass, ``exclude_bos_score=True``)."""
    C = sequences.shape[1]
    scores = np.zeros(sequences.shape[:2])
    for b in range(B):
        with torch.no_grad():
            out = rag(
                context_input_ids=torch.tensor(np.tile(ids[b], (C, 1))),
                context_attention_mask=torch.tensor(np.tile(mask[b], (C, 1)).astype(np.int64)),
                doc_scores=torch.tensor(np.tile(doc_scores[b : b + 1], (C, 1))),
                labels=torch.tensor(sequences[b].astype(np.int64)),
                exclude_bos_score=True, reduce_loss=False, n_docs=K,
            )  # fmt: skip
        scores[b] = -out.loss.numpy()
    return scores


# Seeds and beam sizes where the forced EOS decides the top answer (leaving its probability
# out of the scores, as this code once did, changed the top answer in 3 of 12 such settings).
@pytest.mark.parametrize("seed", [1, 5, 6])
@pytest.mark.parametrize("beams", [1, 3])
def test_rag_sequence_thorough_equals_transformers(generators, beams, seed):
    """Outputs and scores of transformers' RagSequenceForGeneration.generate, forced BOS and
    EOS on. Unpadded contexts: transformers' per-document beams ignore the attention mask
    (a deliberate difference, README)."""
    theirs, ours = generators
    ids, mask, doc_scores = contexts(seed, theirs.config.vocab_size, padded=False)
    rag = rag_for_generation(transformers.RagSequenceForGeneration, theirs, K)
    n_return = min(beams, 2)  # greedy beams of K documents may all agree: one candidate
    expected = rag_generate(
        rag, ids, mask, doc_scores, **settings(theirs, beams), num_return_sequences=n_return
    ).reshape(B, n_return, -1)
    assert_forced(expected.reshape(B * n_return, -1), 8)
    sequences, lls = decode.rag_sequence_generate(
        ours, ids, mask, doc_scores, ours_config(ours, beams), n_return=n_return
    )
    sequences = np.asarray(sequences)
    for n in range(n_return):
        np.testing.assert_array_equal(sequences[:, n], pad_to(expected[:, n], 8))
    # Their prior sits at the second target position, never a pad here (BOS, then a token).
    assert np.all(sequences[:, :, 2] != PAD)
    reference = transformers_rescoring(rag, ids, mask, doc_scores, sequences)
    np.testing.assert_allclose(lls, reference, rtol=1e-5, atol=1e-5)


def test_beam_one_is_greedy_and_k1_token_is_plain_bart(generators):
    theirs, ours = generators
    ids, mask, doc_scores = contexts(2, theirs.config.vocab_size)
    with torch.no_grad():
        greedy = theirs.generate(
            torch.tensor(ids[:, 0]), attention_mask=torch.tensor(mask[:, 0].astype(np.int64)),
            **settings(theirs, 1),
        ).numpy()  # fmt: skip
    config = ours_config(ours, 1)
    token, _, _ = decode.rag_token_generate(
        ours, ids[:, :1], mask[:, :1], doc_scores[:, :1], config
    )
    fast, _ = decode.rag_sequence_generate(
        ours, ids[:, :1], mask[:, :1], doc_scores[:, :1], config, mode="fast"
    )
    thorough, _ = decode.rag_sequence_generate(
        ours, ids[:, :1], mask[:, :1], doc_scores[:, :1], config
    )
    for got in (token[:, 0], fast[:, 0], thorough[:, 0]):
        np.testing.assert_array_equal(np.asarray(got), pad_to(greedy, 8))


def test_scores_are_log_likelihoods_with_fewer_documents(generators):
    """Decoding with n_docs=2 of a K=3 retrieval: every returned thorough score equals the
    RAG-Sequence log-likelihood recomputed with those 2 documents (teacher forcing)."""
    theirs, ours = generators
    ids, mask, doc_scores = contexts(3, theirs.config.vocab_size)
    ids, mask, doc_scores = ids[:, :2], mask[:, :2], doc_scores[:, :2]
    config = ours_config(ours, 3)
    sequences, lls = decode.rag_sequence_generate(ours, ids, mask, doc_scores, config, n_return=3)
    for n in range(3):
        seq = np.asarray(sequences[:, n])  # (B, M)
        decoder_input = np.repeat(seq[:, :-1], 2, axis=0)
        logits = ours(ids.reshape(B * 2, S), mask.reshape(B * 2, S), decoder_input)
        token_lp = target_log_probs(logits, np.repeat(seq[:, 1:], 2, axis=0)).reshape(B, 2, -1)
        target_mask = decode._target_mask(seq, config)
        doc_lp = np.asarray(doc_scores) - np.log(np.exp(doc_scores).sum(-1, keepdims=True))
        expected = rag_sequence_log_likelihood(token_lp, doc_lp, target_mask)
        np.testing.assert_allclose(lls[:, n], expected, rtol=1e-5, atol=1e-5)


def test_padded_documents_never_win_and_missing_ones_are_an_error(generators):
    theirs, ours = generators
    ids, mask, doc_scores = contexts(4, theirs.config.vocab_size)
    config = ours_config(ours, 2)
    padded = doc_scores.copy()
    padded[:, 2] = -np.inf
    seqs, lls = decode.rag_sequence_generate(ours, ids, mask, padded, config, n_return=2)
    ref, ref_lls = decode.rag_sequence_generate(
        ours, ids[:, :2], mask[:, :2], doc_scores[:, :2], config, n_return=2
    )
    np.testing.assert_array_equal(seqs, ref)
    np.testing.assert_allclose(lls, ref_lls, rtol=1e-5)
    _, _, tok_lls = decode.rag_token_generate(ours, ids, mask, padded, config)
    assert np.all(np.isfinite(np.asarray(tok_lls)[:, 0]))
    padded[1] = -np.inf
    with pytest.raises(ValueError, match=r"questions \[1\]"):
        decode.check_documents(padded)


def test_every_entry_point_refuses_a_question_without_documents(generators):
    _, ours = generators
    ids, mask, doc_scores = contexts(7, ours.config.vocab_size)
    doc_scores[1] = -np.inf  # question 1: every document padded
    config = ours_config(ours, 2)
    calls = {
        "token": lambda: decode.rag_token_generate(ours, ids, mask, doc_scores, config),
        "thorough": lambda: decode.rag_sequence_generate(ours, ids, mask, doc_scores, config),
        "fast": lambda: decode.rag_sequence_generate(
            ours, ids, mask, doc_scores, config, mode="fast"
        ),
        "score_candidates": lambda: decode.score_candidates(
            ours, decode._encode(ours, ids, mask), np.full((B, 1, 8), PAD), doc_scores, config
        ),
        "check_documents": lambda: decode.check_documents(doc_scores),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"questions \[1\] have no document"):
            call()
            pytest.fail(f"{name} decoded a question without documents")


def transformers_beams(theirs, ids, mask, beams: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' BART search on one (question, document) input: its ``beams`` finished
    hypotheses ``(W, M)`` and their scores ``(W,)``, the beam's Σ log p with a forced token
    counted as probability 1: beam search's own ``sequences_scores`` (length_penalty 0: no
    division); greedy search reports none, so there the sum is taken by teacher forcing."""
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor(ids[None]), attention_mask=torch.tensor(mask[None].astype(np.int64)),
            num_return_sequences=beams, output_scores=True, return_dict_in_generate=True,
            **settings(theirs, beams, length_penalty=0.0 if beams > 1 else 1.0),
        )  # fmt: skip
    hyps = pad_to(out.sequences.numpy(), 8)
    if beams > 1:
        return hyps, out.sequences_scores.numpy()
    with torch.no_grad():
        logits = theirs(
            input_ids=torch.tensor(ids[None]),
            attention_mask=torch.tensor(mask[None].astype(np.int64)),
            decoder_input_ids=torch.tensor(hyps[:, :-1]),
        ).logits
    token_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(hyps[:, 1:, None]))[..., 0]
    scored = hyps[:, 1:] != PAD  # the greedy output is padded after its EOS
    scored[:, 0] = False  # forced BOS
    scored[:, -1] = False  # a token at the last position is the forced EOS
    return hyps, np.where(scored, token_lp.numpy(), 0.0).sum(-1)


@pytest.mark.parametrize("beams", [1, 3])
def test_rag_sequence_fast_equals_its_definition(generators, beams):
    """Fast decoding by brute force, from transformers' per-document beam searches: the
    candidates are every document's finished beams; for each distinct candidate y,
    ``log p(y|x) = log Σ_{z whose beams produced y} p(z|x) exp(beam score of y from z)``;
    the best n_return, best first. A padded document (score -inf) proposes nothing."""
    theirs, ours = generators
    ids, mask, doc_scores = contexts(8, theirs.config.vocab_size)
    doc_scores[1, 2] = -np.inf
    n_return = 3
    config = ours_config(ours, beams, length_penalty=0.0)
    sequences, lls = decode.rag_sequence_generate(
        ours, ids, mask, doc_scores, config, mode="fast", n_return=n_return
    )
    doc_lp = doc_scores - np.log(np.exp(doc_scores).sum(-1, keepdims=True))
    for b in range(B):
        joint: dict[tuple, list[float]] = {}
        for k in np.flatnonzero(np.isfinite(doc_scores[b])):
            hyps, scores = transformers_beams(theirs, ids[b, k], mask[b, k], beams)
            assert_forced(hyps, 8)
            for y, score in zip(hyps, scores, strict=True):
                joint.setdefault(tuple(y), []).append(doc_lp[b, k] + score)
        expected = sorted(
            ((np.logaddexp.reduce(v), y) for y, v in joint.items()), key=lambda t: -t[0]
        )[:n_return]
        for n, (ll, y) in enumerate(expected):
            np.testing.assert_array_equal(np.asarray(sequences[b, n]), y)
            np.testing.assert_allclose(lls[b, n], ll, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(lls[b, len(expected) :]) == -np.inf)  # fewer distinct ones


def test_generation_config_json_decides_the_forced_tokens(tmp_path):
    """transformers 5 reads generation settings from generation_config.json alone when it
    exists, else from config.json; ours reads the same, and save_bart writes a file that
    transformers reads back the same."""
    theirs = random_model(bart_config(), seed=4)
    theirs.save_pretrained(tmp_path / "g")
    config_path, generation_path = (
        tmp_path / "g" / "config.json",
        tmp_path / "g" / "generation_config.json",
    )

    def both(directory):
        hf = transformers.BartForConditionalGeneration.from_pretrained(directory).generation_config
        ours = load_bart(directory).config
        theirs_forced = (hf.forced_bos_token_id, hf.forced_eos_token_id)
        assert (ours.forced_bos_token_id, ours.forced_eos_token_id) == theirs_forced
        return theirs_forced

    # config.json says BOS 0 and EOS 2, the generation file neither: off, as transformers.
    hf_config = json.loads(config_path.read_text())
    config_path.write_text(
        json.dumps({**hf_config, "forced_bos_token_id": BOS, "forced_eos_token_id": EOS})
    )
    generation_path.write_text(json.dumps({"decoder_start_token_id": START, "eos_token_id": EOS}))
    assert both(tmp_path / "g") == (None, None)
    # The generation file only: read.
    config_path.write_text(json.dumps(hf_config))
    generation_path.write_text(json.dumps({"forced_bos_token_id": BOS, "forced_eos_token_id": EOS}))
    assert both(tmp_path / "g") == (BOS, EOS)
    # No generation file: config.json's, a missing key off (not BartConfig's default 2).
    generation_path.unlink()
    del hf_config["forced_eos_token_id"]
    config_path.write_text(json.dumps({**hf_config, "forced_bos_token_id": BOS}))
    assert both(tmp_path / "g") == (BOS, None)
    # save_bart writes both files; the settings survive, in transformers too.
    saved = load_bart(tmp_path / "g")
    save_bart(saved, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert written["forced_bos_token_id"] == BOS and "forced_eos_token_id" not in written
    assert both(tmp_path / "saved") == (BOS, None)
    assert load_bart(tmp_path / "saved").config == saved.config
