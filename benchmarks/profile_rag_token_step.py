"""Where a RAG-Token decoding step's time goes: its parts timed apart, beside PyTorch's LM head.

The shapes of ``bench_generate.py`` (B=8, K=5, beam 4, S=64, max length 20, a BART 256 wide
on V = 50265): the LM head over B·W·K rows, alternative forms of it, ``rag_token_log_probs``
and an alternative, ``top_k``, and a whole ``rag_token_generate``. Interleaved medians.

    python benchmarks/profile_rag_token_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.oracles, benchmarks.*
from benchmarks.timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from rag_jax import decode
    from rag_jax.marginalize import doc_log_probs, rag_token_log_probs
    from rag_jax.models import load_bart
    from tests.oracles import BART_BASE, bart_config, random_model

    torch.set_num_threads(2)
    B, K, W, S, M = 8, 5, 4, 64, 20
    small = dict(vocab_size=BART_BASE["vocab_size"], d_model=256, encoder_ffn_dim=1024,
                 decoder_ffn_dim=1024, max_position_embeddings=128)  # fmt: skip
    theirs = random_model(bart_config(forced_bos_token_id=0, **small), seed=0)
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = load_bart(directory)
    R, H, V = B * W * K, ours.config.d_model, ours.config.vocab_size
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(R, 1, H)), jnp.float32)
    hidden_torch = torch.from_numpy(np.asarray(hidden))
    embedding = ours.shared.embedding[...]
    logits = jnp.asarray(rng.normal(size=(B * W, K, V)), jnp.float32)
    doc_scores = jnp.asarray(rng.normal(size=(B * W, K)), jnp.float32)
    totals = jnp.asarray(rng.normal(size=(B, W * V)), jnp.float32)
    ids = jnp.asarray(rng.integers(3, V, size=(B, K, S)))
    mask = jnp.ones((B, K, S), bool)
    config = decode.DecodeConfig.from_generator(ours.config, beam_size=W, max_length=M)

    def log_probs_without_log_softmax(logits, doc_scores):
        shift = doc_log_probs(doc_scores) - jax.nn.logsumexp(logits, axis=-1)  # (.., K)
        return jax.nn.logsumexp(logits + shift[..., None], axis=-2)

    lm_head = nnx.jit(lambda g, h: g.logits(h))
    dot_2d = jax.jit(lambda h, e: h[:, 0] @ e.T)
    lp = jax.jit(rag_token_log_probs)
    lp_alt = jax.jit(log_probs_without_log_softmax)
    top_k = jax.jit(lambda x: jax.lax.top_k(x, 2 * W))

    def timed(fn, *args):
        return lambda: jax.block_until_ready(fn(*args))

    def torch_lm_head():
        with torch.no_grad():
            theirs.lm_head(hidden_torch)

    runs = {
        "LM head, ours (Bart.logits)": timed(lm_head, ours, hidden),
        "LM head, a 2-D matmul": timed(dot_2d, hidden, embedding),
        "LM head, PyTorch": torch_lm_head,
        "rag_token_log_probs": timed(lp, logits, doc_scores),
        "rag_token_log_probs without log_softmax": timed(lp_alt, logits, doc_scores),
        "top_k over B x W·V": timed(top_k, totals),
    }
    medians = interleaved_medians(runs, repeats=args.repeats)
    generate = timed(lambda: decode.rag_token_generate(ours, ids, mask, doc_scores[:B], config))
    whole = interleaved_medians({"rag_token_generate": generate}, repeats=max(1, args.repeats // 2))
    print(f"B={B} K={K} beams={W} S={S} max_length={M} rows={R} V={V}")
    print("| part | median ms |\n|---|---:|")
    for name, seconds in {**medians, **whole}.items():
        print(f"| {name} | {seconds * 1e3:.1f} |")
    print(f"rag_token_generate per position: {whole['rag_token_generate'] * 1e3 / (M - 1):.1f} ms")


if __name__ == "__main__":
    main()
