"""Forward throughput of our jitted BERT and BART against transformers' PyTorch eager models.

Both sides get the same random weights (``tests.oracles``' model, saved to a temporary Hugging
Face checkpoint and read back with our loaders) and the same padded batch. Runs of ours and of
torch alternate, so that load from other processes hits both alike; the table reports the median.

    .venv/bin/python benchmarks/bench_models.py            # BERT-base and BART-base, CPU
    .venv/bin/python benchmarks/bench_models.py --runs 3   # quicker
    .venv/bin/python benchmarks/bench_models.py --dtype bfloat16   # both sides compute in bf16
    .venv/bin/python benchmarks/bench_models.py --tiny     # tiny models: checks that it runs

torch runs under torch.inference_mode() with torch.set_num_threads(--threads) (default 2, this
machine's core count); JAX uses the same CPU cores through XLA. With ``--dtype bfloat16`` both
sides compute in bf16 with bf16 weights: the torch model is cast (``model.to(torch.bfloat16)``),
ours computes in bf16 (the models' ``dtype``) with its parameters cast once, outside the timing;
the max abs diff is then against torch in float32, for both sides (ours / torch's).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from rag_jax.models.hf_bart import load_bart
from rag_jax.models.hf_bert import load_bert_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.oracles, benchmarks.*
from benchmarks.timing import interleaved_medians
from tests.oracles import (
    BART_BASE,
    BERT_BASE,
    TINY_BART,
    TINY_BERT,
    bart_config,
    bert_config,
    random_model,
)


def padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, pad: int):
    """Random ids (batch, length) with 0-25% right padding per row, and the 0/1 mask."""
    ids = rng.integers(3, vocab, (batch, length))
    lengths = rng.integers(int(0.75 * length), length + 1, batch)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad), mask


def jitted(model: nnx.Module, method: str, param_dtype=None):
    """jax.jit of model.method(*args) over the split state: no NNX graph traversal per call.

    ``param_dtype``: cast the floating-point parameters to it first (torch's ``model.to``).
    """
    graphdef, state = nnx.split(model)
    if param_dtype is not None:
        cast = lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        state = jax.tree.map(cast, state)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return lambda *args: run(state, *args)


def _max_diffs(ours_output, reference, run_reference, args) -> str:
    """Max abs diff to torch in float32; in bf16 mode for ours and for torch in bf16."""
    exact = run_reference().float().numpy()  # the model is still float32 here
    ours_diff = np.abs(np.asarray(ours_output, np.float32) - exact).max()
    if args.dtype == "float32":
        return f"{ours_diff:.1e}"
    reference.to(torch.bfloat16)
    return f"{ours_diff:.1e} / {np.abs(run_reference().float().numpy() - exact).max():.1e}"


def bench_bert(args, directory: Path):
    reference = random_model(bert_config(**args.bert_size))
    reference.save_pretrained(directory)
    encoder = load_bert_encoder(directory, dtype=args.jax_dtype)
    ours = jitted(encoder.bert, "__call__", args.param_dtype)

    rng = np.random.default_rng(0)
    V, pad = reference.config.vocab_size, reference.config.pad_token_id
    ids, mask = padded_batch(rng, args.batch, args.bert_len, V, pad)
    jax_args = (jnp.asarray(ids), jnp.asarray(mask))
    torch_args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    def run_reference():
        with torch.inference_mode():
            return reference(**torch_args).last_hidden_state

    max_diff = _max_diffs(ours(*jax_args)[0], reference, run_reference, args)
    runs = {"ours": lambda: jax.block_until_ready(ours(*jax_args)), "torch": run_reference}
    seconds = interleaved_medians(runs, args.runs, args.warmup, desc="BERT")
    name = f"BERT-{args.size} encoder"
    return name, f"B={args.batch}, T={args.bert_len}", ids.size, seconds, max_diff


def bench_bart(args, directory: Path):
    reference = random_model(bart_config(**args.bart_size))
    reference.save_pretrained(directory)
    ours = jitted(load_bart(directory, dtype=args.jax_dtype), "__call__", args.param_dtype)

    rng = np.random.default_rng(1)
    V, pad = reference.config.vocab_size, reference.config.pad_token_id
    ids, mask = padded_batch(rng, args.batch, args.src_len, V, pad)
    decoder_ids, decoder_mask = padded_batch(rng, args.batch, args.tgt_len, V, pad)
    arrays = (ids, mask, decoder_ids, decoder_mask)
    jax_args = tuple(map(jnp.asarray, arrays))
    names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    torch_args = {name: torch.from_numpy(array) for name, array in zip(names, arrays, strict=True)}

    def run_reference():
        with torch.inference_mode():
            return reference(**torch_args).logits

    max_diff = _max_diffs(ours(*jax_args), reference, run_reference, args)
    runs = {"ours": lambda: jax.block_until_ready(ours(*jax_args)), "torch": run_reference}
    seconds = interleaved_medians(runs, args.runs, args.warmup, desc="BART")
    shape = f"B={args.batch}, src={args.src_len}, tgt={args.tgt_len}"
    name = f"BART-{args.size} seq2seq (logits)"
    return name, shape, ids.size + decoder_ids.size, seconds, max_diff


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bert-len", type=int, default=128)
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--tgt-len", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per side (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--only", choices=["bert", "bart"], default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tiny", action="store_true", help="tiny models, batch 2, 2 runs")
    args = parser.parse_args()
    args.size, args.bert_size, args.bart_size = "base", BERT_BASE, BART_BASE
    if args.tiny:
        args.size, args.bert_size, args.bart_size = "tiny", TINY_BERT, TINY_BART
        args.batch, args.bert_len, args.src_len, args.tgt_len = 2, 16, 16, 8
        args.runs, args.warmup = 2, 1
    args.jax_dtype = jnp.dtype(args.dtype)
    # In bf16 mode torch's model.to(torch.bfloat16) stores bf16 weights, so ours do too (our
    # models keep float32 params for training; the cast happens once, outside the timing).
    args.param_dtype = None if args.dtype == "float32" else args.jax_dtype
    return args


def print_table(rows: list, args: argparse.Namespace) -> None:
    print(
        f"\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"eager, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"median of {args.runs} alternating runs after {args.warmup} warm-up, "
        f"compute dtype {args.dtype}\n"
    )
    print("| model | batch | ours tokens/s | torch tokens/s | ours / torch | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, tokens, seconds, max_diff in rows:
        ours_s, torch_s = seconds["ours"], seconds["torch"]
        print(
            f"| {name} | {shape} | {tokens / ours_s:,.0f} | {tokens / torch_s:,.0f} "
            f"| {torch_s / ours_s:.2f}x | {max_diff} |"
        )


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    benches = {"bert": bench_bert, "bart": bench_bart}
    with tempfile.TemporaryDirectory() as directory:
        rows = [
            bench(args, Path(directory) / name)
            for name, bench in benches.items()
            if args.only in (None, name)
        ]
    print_table(rows, args)


if __name__ == "__main__":
    main()
