"""rag_jax's jitted RAG losses vs transformers' PyTorch ``get_nll``: time and peak memory.

Both compute value + gradient (w.r.t. logits and doc scores) of the summed loss on the same
float32 inputs (B=8, K=5, T=32, V=50265 by default). Times are medians over interleaved
repeats, all in this process; peak memory is measured for each case in fresh subprocesses
(largest of 3) as the rise of the resident set's high-water mark above the inputs (MiB).
The largest, because the measurement can only err low: now and then memory freed before
the baseline is still resident and gets reused, hiding part of the peak.

    python benchmarks/bench_marginalize.py [--label-smoothing 0.1] [--repeats 7]
    python benchmarks/bench_marginalize.py --quick   # tiny shapes: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.oracles, benchmarks.*
from benchmarks.timing import (
    interleaved_medians,
    max_peak_in_subprocesses,
    peak_memory_mib,
    print_peak,
)

CASES = [("sequence", "ours"), ("sequence", "reference"), ("token", "ours"), ("token", "reference")]


def make_inputs(B: int, K: int, T: int, V: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, K, T, V), dtype=np.float32)
    doc_scores = rng.standard_normal((B, K), dtype=np.float32)
    targets = rng.integers(2, V, size=(B, T))
    lengths = rng.integers(T // 2, T + 1, size=B)
    target_mask = np.arange(T)[None] < lengths[:, None]
    return logits, doc_scores, targets, target_mask


def ours_step(model: str, logits, doc_scores, targets, target_mask, label_smoothing: float):
    """Returns (run, inputs): ``run()`` computes value + grads and blocks until done."""
    import jax
    import jax.numpy as jnp

    from rag_jax import rag_sequence_nll, rag_token_nll

    nll = rag_sequence_nll if model == "sequence" else rag_token_nll

    @jax.jit
    def value_and_grad(logits, doc_scores, targets, target_mask):
        def loss(lg, sc):
            return nll(lg, sc, targets, target_mask, label_smoothing=label_smoothing).sum()

        return jax.value_and_grad(loss, argnums=(0, 1))(logits, doc_scores)

    inputs = [jnp.asarray(x) for x in (logits, doc_scores, targets, target_mask)]
    compiled = value_and_grad.lower(*inputs).compile()  # compile outside the measurement
    return lambda: jax.block_until_ready(compiled(*inputs)), inputs


def reference_step(model: str, logits, doc_scores, targets, target_mask, label_smoothing: float):
    import torch
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    from tests.oracles import PAD, transformers_get_nll

    torch.set_num_threads(2)
    model_cls = RagSequenceForGeneration if model == "sequence" else RagTokenForGeneration
    B, K, T, V = logits.shape
    # The reference shifts its decoder inputs left by one; same tensor sizes, same work.
    decoder_inputs = torch.tensor(np.where(target_mask, targets, PAD))
    seq_logits = torch.from_numpy(logits.reshape(B * K, T, V)).requires_grad_()
    scores = torch.from_numpy(doc_scores).requires_grad_()

    def run():
        seq_logits.grad = scores.grad = None
        loss = transformers_get_nll(
            model_cls, seq_logits, scores, decoder_inputs, epsilon=label_smoothing
        )
        loss.sum().backward()
        return seq_logits.grad, scores.grad

    return run, (seq_logits, scores)


STEPS = {"ours": ours_step, "reference": reference_step}


def measure_peak(args) -> None:
    """Child process: peak memory above the inputs for one case, printed for the parent."""
    model, impl = args.child.split(":")
    inputs = make_inputs(args.B, args.K, args.T, args.V)
    run, _ = STEPS[impl](model, *inputs, args.label_smoothing)
    del inputs  # run holds its own copies; these numpy ones are freed before the baseline
    print_peak(peak_memory_mib(run))


def child_command(args, model: str, impl: str) -> list[str]:
    shape = [f"--{k}={getattr(args, k)}" for k in ("B", "K", "T", "V")]
    return [sys.executable, __file__, "--child", f"{model}:{impl}", *shape,
            f"--label-smoothing={args.label_smoothing}"]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--V", type=int, default=50265)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--quick", action="store_true", help="B=2 K=2 T=4 V=100, 2 repeats")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.B, args.K, args.T, args.V, args.repeats, args.memory_repeats = 2, 2, 4, 100, 2, 1
    return args


def print_tables(seconds: dict, peaks: dict) -> None:
    print("\n| loss | impl | median value+grad (s) | peak memory above inputs (MiB) |")
    print("|---|---|---:|---:|")
    for model, impl in CASES:
        print(
            f"| rag_{model}_nll | {impl} | {seconds[model, impl]:.3f} | {peaks[model, impl]:.0f} |"
        )
    print("\n| loss | speed-up (reference / ours) | memory (ours / reference) |")
    print("|---|---:|---:|")
    for model in ("sequence", "token"):
        speed_up = seconds[model, "reference"] / seconds[model, "ours"]
        memory = peaks[model, "ours"] / peaks[model, "reference"]
        print(f"| rag_{model}_nll | {speed_up:.1f}x | {memory:.2f} |")


def main() -> None:
    args = parse_args()
    if args.child:
        return measure_peak(args)
    inputs = make_inputs(args.B, args.K, args.T, args.V)
    print(f"B={args.B} K={args.K} T={args.T} V={args.V} label_smoothing={args.label_smoothing}")
    runs = {case: STEPS[case[1]](case[0], *inputs, args.label_smoothing)[0] for case in CASES}
    seconds = interleaved_medians(runs, args.repeats)
    del runs
    peaks = {
        case: max_peak_in_subprocesses(child_command(args, *case), args.memory_repeats)
        for case in CASES
    }
    print_tables(seconds, peaks)


if __name__ == "__main__":
    main()
