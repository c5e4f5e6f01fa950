"""rag_jax's jitted RAG losses vs transformers' PyTorch ``get_nll``: time and peak memory.

Both compute value + gradient (w.r.t. logits and doc scores) of the summed loss on the same
float32 inputs (B=8, K=5, T=32, V=50265 by default). Times are medians over interleaved
repeats, all in this process; peak memory is measured for each case in fresh subprocesses
(largest of 3) as the rise of the resident set's high-water mark above the inputs (MiB).
The largest, because the measurement can only err low: now and then memory freed before
the baseline is still resident and gets reused, hiding part of the peak.

    python benchmarks/bench_marginalize.py [--label-smoothing 0.1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
import types

import numpy as np

CASES = [("sequence", "ours"), ("sequence", "reference"), ("token", "ours"), ("token", "reference")]
PAD = 1


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

    torch.set_num_threads(2)
    cls = RagSequenceForGeneration if model == "sequence" else RagTokenForGeneration
    B, K, T, V = logits.shape
    generator = types.SimpleNamespace(pad_token_id=PAD, bos_token_id=None)
    fake_self = types.SimpleNamespace(
        config=types.SimpleNamespace(n_docs=K, bos_token_id=None, generator=generator)
    )
    fake_self.marginalize = lambda *a, **k: RagTokenForGeneration.marginalize(fake_self, *a, **k)
    # The reference shifts its decoder inputs left by one; same tensor sizes, same work.
    decoder_inputs = torch.tensor(np.where(target_mask, targets, PAD))
    seq_logits = torch.from_numpy(logits.reshape(B * K, T, V)).requires_grad_()
    scores = torch.from_numpy(doc_scores).requires_grad_()

    def run():
        seq_logits.grad = scores.grad = None
        loss = cls.get_nll(fake_self, seq_logits, scores, decoder_inputs, epsilon=label_smoothing)
        loss.sum().backward()
        return seq_logits.grad, scores.grad

    return run, (seq_logits, scores)


STEPS = {"ours": ours_step, "reference": reference_step}


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(args) -> None:
    """Child process: peak memory above the inputs for one case, printed as JSON."""
    model, impl = args.child.split(":")
    inputs = make_inputs(args.B, args.K, args.T, args.V)
    run, _ = STEPS[impl](model, *inputs, args.label_smoothing)
    del inputs
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed input copies back to the OS
    # Reset the high-water mark: building the inputs may have held two copies for a moment.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = rss_mb("VmRSS")
    gradients = run()  # kept alive while reading the high-water mark
    print(json.dumps({"peak_above_inputs_mb": rss_mb("VmHWM") - baseline}))
    del gradients


def peak_in_subprocess(args, model: str, impl: str) -> float:
    child = subprocess.run(
        [sys.executable, __file__, "--child", f"{model}:{impl}"]
        + [f"--{k}={getattr(args, k)}" for k in ("B", "K", "T", "V")]
        + [f"--label-smoothing={args.label_smoothing}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])["peak_above_inputs_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--V", type=int, default=50265)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_peak(args)

    inputs = make_inputs(args.B, args.K, args.T, args.V)
    print(f"B={args.B} K={args.K} T={args.T} V={args.V} label_smoothing={args.label_smoothing}")
    runs = {case: STEPS[case[1]](case[0], *inputs, args.label_smoothing)[0] for case in CASES}
    for run in runs.values():
        run()  # warm-up (and compilation, for ours)
    times = {case: [] for case in CASES}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every case
        for case, run in runs.items():
            start = time.perf_counter()
            run()
            times[case].append(time.perf_counter() - start)
    del runs
    results = {}
    for model, impl in CASES:
        peaks = [peak_in_subprocess(args, model, impl) for _ in range(args.memory_repeats)]
        results[model, impl] = (statistics.median(times[model, impl]), max(peaks))

    print("\n| loss | impl | median value+grad (s) | peak memory above inputs (MiB) |")
    print("|---|---|---:|---:|")
    for (model, impl), (seconds, peak) in results.items():
        print(f"| rag_{model}_nll | {impl} | {seconds:.3f} | {peak:.0f} |")
    print("\n| loss | speed-up (reference / ours) | memory (ours / reference) |")
    print("|---|---:|---:|")
    for model in ("sequence", "token"):
        (t_ours, m_ours), (t_ref, m_ref) = results[model, "ours"], results[model, "reference"]
        print(f"| rag_{model}_nll | {t_ref / t_ours:.1f}x | {m_ours / m_ref:.2f} |")


if __name__ == "__main__":
    main()
