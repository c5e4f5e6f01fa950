"""Decoding against transformers' generate, and the scores against the losses."""

import numpy as np
import pytest
import torch
import transformers

from rag_jax import decode
from rag_jax.decode import DecodeConfig
from rag_jax.marginalize import rag_sequence_log_likelihood, target_log_probs
from rag_jax.models import load_bart
from tests.oracles import PAD, bart_config, rag_for_generation, rag_generate, random_model

B, K, S = 2, 3, 10


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """A random BART whose forced BOS is on (as facebook/bart-*), saved and loaded in ours."""
    root = tmp_path_factory.mktemp("gen")
    theirs = random_model(bart_config(forced_bos_token_id=0), seed=3)
    theirs.save_pretrained(root / "g")
    return theirs, load_bart(root / "g")


def contexts(seed: int, vocab_size: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(B, K, S))
    mask = np.ones((B, K, S), bool)
    mask[0, 1, 6:] = False
    ids[~mask] = PAD
    doc_scores = rng.normal(size=(B, K)).astype(np.float32) * 2
    return ids, mask, doc_scores


def settings(theirs, beams: int, max_length: int = 8, **extra) -> dict:
    return dict(num_beams=beams, max_length=max_length, min_length=0, length_penalty=1.0,
                early_stopping=False, do_sample=False, no_repeat_ngram_size=0, **extra)  # fmt: skip


def ours_config(ours, beams: int, max_length: int = 8) -> DecodeConfig:
    return DecodeConfig.from_generator(ours.config, beam_size=beams, max_length=max_length)


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("beams", [1, 4])
def test_rag_token_generate_equals_transformers(generators, beams):
    theirs, ours = generators
    ids, mask, doc_scores = contexts(0, theirs.config.vocab_size)
    rag = rag_for_generation(transformers.RagTokenForGeneration, theirs, K)
    expected = rag_generate(rag, ids, mask, doc_scores, **settings(theirs, beams))
    sequences, _, _ = decode.rag_token_generate(
        ours, ids, mask, doc_scores, ours_config(ours, beams)
    )
    np.testing.assert_array_equal(np.asarray(sequences[:, 0]), pad_to(expected, 8))


@pytest.mark.parametrize("beams", [1, 3])
def test_rag_sequence_thorough_equals_transformers(generators, beams):
    theirs, ours = generators
    ids, mask, doc_scores = contexts(1, theirs.config.vocab_size)
    rag = rag_for_generation(transformers.RagSequenceForGeneration, theirs, K)
    expected = rag_generate(rag, ids, mask, doc_scores, **settings(theirs, beams))
    sequences, _ = decode.rag_sequence_generate(
        ours, ids, mask, doc_scores, ours_config(ours, beams)
    )
    np.testing.assert_array_equal(np.asarray(sequences[:, 0]), pad_to(expected, 8))


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
