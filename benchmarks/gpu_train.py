"""RAG training at the paper's shapes on an accelerator: steps/s and model-FLOPs utilisation.

A BERT-base query encoder and a BART-large generator (random weights: speed does not depend
on them), K=5 passages per question, 64 questions a step, 300 source tokens, bf16 compute with
float32 parameters and AdamW state: ``rag_jax.training.train_step`` on a batch already on the
devices (the host pipeline is measured by ``benchmarks/bench_train.py``), parameters
replicated (or FSDP-sharded with ``--fsdp``) over a mesh of every device.

MFU = model FLOPs per step x steps/s / (devices x peak). Model FLOPs count the matmuls of
forward + backward (6 x multiply-adds of every weight matrix per token it sees, the tied LM
head included, plus attention's QK^T and AV), as PaLM's appendix B counts them: nothing for
rematerialisation, softmax or LayerNorm.

    python benchmarks/gpu_train.py                       # paper shapes, H100/H200 peak
    python benchmarks/gpu_train.py --peak-tflops 459     # another chip (e.g. TPU v5p)
    python benchmarks/gpu_train.py --devices 1           # one chip of the machine's
    python benchmarks/gpu_train.py --tiny                # CPU smoke run: tiny models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER = dict(B=64, K=5, L=32, S=300, T=32)
TINY = dict(B=4, K=2, L=8, S=16, T=6)
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512,
)  # fmt: skip
BART_LARGE = dict(
    vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
    encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
    decoder_ffn_dim=4096, max_position_embeddings=1024, dropout=0.1,
)  # fmt: skip
TINY_BERT = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, max_position_embeddings=64,
)  # fmt: skip
TINY_BART = dict(
    vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48,
    max_position_embeddings=40, dropout=0.1,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense, per chip")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--B", type=int, help="questions per step (default 64)")
    parser.add_argument("--remat", action="store_true", help="recompute layers in backward")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters over devices")
    parser.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    parser.add_argument("--float32", action="store_true", help="float32 compute, not bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU)")
    parser.add_argument("--json", help="also write the result to this file")
    return parser.parse_args(argv)


def build(args, shapes: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import tiny
    from rag_jax.models import Bart, BartConfig, BertConfig, BertEncoder, partitioning
    from rag_jax.optim import make_optimizer, trainable
    from rag_jax.rag import RagConfig, RagModel
    from rag_jax.sharding import make_mesh, param_rules, place_on_mesh

    dtype = jnp.float32 if args.float32 else jnp.bfloat16
    bert, bart = (TINY_BERT, TINY_BART) if args.tiny else (BERT_BASE, BART_LARGE)
    rag = RagConfig(
        n_docs=shapes["K"], max_question_length=shapes["L"], max_context_length=shapes["S"],
        max_target_length=shapes["T"],
    )  # fmt: skip
    config = tiny.get_config()  # the training loop's optimizer, with the paper's settings
    config.batch_size, config.mesh.fsdp_params = shapes["B"], args.fsdp
    # every device used: on the fsdp axis when parameters are sharded, else on the data axis
    if args.devices is not None and not 1 <= args.devices <= jax.device_count():
        raise ValueError(f"--devices {args.devices}: there are {jax.device_count()} devices")
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    config.mesh.data, config.mesh.fsdp = (1, len(devices)) if args.fsdp else (len(devices), 1)
    config.optimizer.update(learning_rate=3e-5, warmup_steps=0, max_grad_norm=1.0)
    config.train_steps = 10**6
    mesh = make_mesh(config, devices)

    def make() -> RagModel:
        rngs = nnx.Rngs(0)
        query_encoder = BertEncoder(
            BertConfig(**bert), pooling="cls", dtype=dtype, remat=args.remat, rngs=rngs
        )
        generator = Bart(BartConfig(**bart), dtype=dtype, remat=args.remat, rngs=rngs)
        generator.train()  # dropout on, as in fine-tuning
        return RagModel(query_encoder, generator, rag)

    # initialised straight into its shards: BART-large is never whole on one device
    model = partitioning.create_sharded(make, mesh, param_rules(config))
    tx, _ = make_optimizer(config)
    return model, place_on_mesh(model, tx, mesh, config, trainable(config)), mesh


def random_batch(model, shapes: dict, mesh):
    import numpy as np

    from rag_jax.rag import RagBatch
    from rag_jax.sharding import shard_batch

    B, K, L, S, T = (shapes[k] for k in "BKLST")
    H = model.query_encoder.output_dim
    V_q, V = model.query_encoder.bert.config.vocab_size, model.generator.config.vocab_size
    rng = np.random.default_rng(0)
    targets = rng.integers(3, V, size=(B, T), dtype=np.int32)
    batch = RagBatch(
        question_ids=rng.integers(3, V_q, size=(B, L), dtype=np.int32),
        question_mask=np.ones((B, L), bool),
        doc_vectors=rng.normal(size=(B, K, H)).astype(np.float32),
        doc_mask=np.ones((B, K), bool),
        context_ids=rng.integers(3, V, size=(B, K, S), dtype=np.int32),
        context_mask=np.ones((B, K, S), bool),
        decoder_input_ids=np.concatenate([np.full((B, 1), 2, np.int32), targets[:, :-1]], 1),
        targets=targets,
        target_mask=np.ones((B, T), bool),
    )
    return shard_batch(batch, mesh)


def run(args) -> dict:
    import jax

    from rag_jax.flops import model_flops
    from rag_jax.training import train_step

    shapes = dict(TINY if args.tiny else PAPER)
    shapes["B"] = args.B or shapes["B"]
    model, optimizer, mesh = build(args, shapes)
    flops = model_flops(model, shapes)
    batch = random_batch(model, shapes, mesh)
    with jax.set_mesh(mesh):
        for _ in range(2):  # compile, warm up
            jax.block_until_ready(train_step(model, optimizer, batch))
        start = time.perf_counter()
        for _ in range(args.steps):
            metrics = train_step(model, optimizer, batch)
        metrics = jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / args.steps
    n_devices = mesh.devices.size
    achieved = flops["total"] / seconds
    return {
        "device": jax.devices()[0].device_kind,
        "devices": n_devices,
        **shapes,
        "bf16": not args.float32,
        "remat": args.remat,
        "fsdp": args.fsdp,
        "loss": float(metrics["loss"]),
        "step_seconds": seconds,
        "steps_per_second": 1 / seconds,
        "examples_per_second": shapes["B"] / seconds,
        "model_tflops_per_step": flops["total"] / 1e12,
        "achieved_tflops_per_device": achieved / n_devices / 1e12,
        "peak_tflops_per_device": args.peak_tflops,
        "mfu": achieved / (n_devices * args.peak_tflops * 1e12),
        "flops_by_part": flops,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    print(
        f"\n{result['devices']} x {result['device']}: {result['steps_per_second']:.3f} steps/s, "
        f"{result['examples_per_second']:.1f} questions/s, MFU {100 * result['mfu']:.1f}% "
        f"of {args.peak_tflops:g} TFLOP/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a setting this machine cannot run: one line, no traceback
        sys.exit(f"error: {error}")
