"""rag_jax's jitted RAG decoding vs transformers' ``generate``: generated tokens per second.

The same small random BART (tests/oracles.py) in both, the same retrieved inputs
(``context_input_ids``, ``context_attention_mask``, ``doc_scores``): RAG-Token beam search
and RAG-Sequence thorough decoding (beam 4, K=5, batch 8 by default). Ours is timed after a
first, compiling call (its compile time is printed apart); times are medians over
interleaved repeats in this process. Tokens/s counts the best hypothesis of each question up
to its EOS.

    python benchmarks/bench_generate.py [--repeats 3]
    python benchmarks/bench_generate.py --quick   # tiny shapes: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.oracles, benchmarks.*
from benchmarks.timing import interleaved_medians


def generated_tokens(sequences: np.ndarray, eos: int) -> int:
    """Tokens after the start token, up to and including the first EOS, summed over rows."""
    total = 0
    for row in sequences[:, 1:]:
        stop = np.nonzero(row == eos)[0]
        total += int(stop[0]) + 1 if len(stop) else len(row)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.n_docs, args.beams, args.source_length, args.max_length = 2, 2, 2, 8, 6
        args.repeats = 1

    import tempfile

    import transformers

    from rag_jax import decode
    from rag_jax.models import load_bart
    from tests.oracles import BART_BASE, bart_config, rag_for_generation, rag_generate, random_model

    B, K, S = args.batch, args.n_docs, args.source_length
    # A small generator on BART's real vocabulary (the LM head over V = 50265 is real work).
    small = dict(vocab_size=BART_BASE["vocab_size"], d_model=256, encoder_ffn_dim=1024,
                 decoder_ffn_dim=1024, max_position_embeddings=128)  # fmt: skip
    sizes = {} if args.quick else small
    theirs = random_model(bart_config(forced_bos_token_id=0, **sizes), seed=0)
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = load_bart(directory)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, theirs.config.vocab_size, size=(B, K, S))
    mask = np.ones((B, K, S), bool)
    doc_scores = rng.normal(size=(B, K)).astype(np.float32)
    config = decode.DecodeConfig.from_generator(
        ours.config, beam_size=args.beams, max_length=args.max_length
    )
    settings = dict(
        num_beams=args.beams, max_length=args.max_length, min_length=0, early_stopping=False,
        do_sample=False, no_repeat_ngram_size=0,
    )  # fmt: skip
    eos = ours.config.eos_token_id
    print(f"B={B} K={K} beams={args.beams} S={S} max_length={args.max_length} "
          f"generator d_model={theirs.config.d_model} layers={theirs.config.encoder_layers}+"
          f"{theirs.config.decoder_layers} V={theirs.config.vocab_size}")  # fmt: skip
    rows = []
    for name, cls, ours_fn in (
        ("RAG-Token beam", transformers.RagTokenForGeneration,
         lambda: decode.rag_token_generate(ours, ids, mask, doc_scores, config)[0][:, 0]),
        ("RAG-Sequence thorough", transformers.RagSequenceForGeneration,
         lambda: decode.rag_sequence_generate(ours, ids, mask, doc_scores, config)[0][:, 0]),
    ):  # fmt: skip
        model = rag_for_generation(cls, theirs, K)
        start = time.perf_counter()
        ours_out = np.asarray(ours_fn())
        compile_seconds = time.perf_counter() - start

        def reference(model=model):
            return rag_generate(model, ids, mask, doc_scores, **settings)

        ref_out = reference()
        seconds = interleaved_medians(
            {"ours": lambda fn=ours_fn: np.asarray(fn()), "reference": reference},
            repeats=args.repeats, warmup=0,
        )  # fmt: skip
        ours_tps = generated_tokens(ours_out, eos) / seconds["ours"]
        ref_tps = generated_tokens(ref_out, eos) / seconds["reference"]
        rows.append((name, ours_tps, ref_tps, compile_seconds))
    print("| decoding | ours tokens/s | reference tokens/s | speed-up | our compile (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, ours_tps, ref_tps, compile_seconds in rows:
        print(f"| {name} | {ours_tps:.1f} | {ref_tps:.1f} | {ours_tps / ref_tps:.2f}x | "
              f"{compile_seconds:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
