"""The generator warm-up for your own passages (README, "Your own data"): the demo's
(configs/demo_warmup.py) on your corpus. A small BART built from MiniLM's weights learns,
closed-book, to name what a passage is about::

    python -m rag_jax.warmup --corpus data/passages.jsonl --out data/warmup.jsonl \\
        --hold-out data/qa_test.jsonl
    python train.py --config configs/own_data_warmup.py --workdir runs/own/warmup
    python -m rag_jax.export --workdir runs/own/warmup --out runs/own/warmup/export
"""

import ml_collections

from configs import demo_warmup


def get_config() -> ml_collections.ConfigDict:
    config = demo_warmup.get_config()
    config.train_steps = 200  # optimizer steps: tens of passes over a few hundred passages
    config.model.question_encoder = "checkpoints/minilm"  # unused closed-book; its tokenizer
    config.model.generator_tokenizer = "checkpoints/minilm"  # MiniLM's WordPiece vocabulary
    config.model.generator_warm_start = "checkpoints/minilm"  # the generator's first weights
    config.data.train = "data/warmup.jsonl"  # python -m rag_jax.warmup's pairs
    # A few hundred passages: the faster rate a short warm-up needs (tests/test_demo.py's)
    config.optimizer.learning_rate = 2e-3  # peak learning rate
    config.optimizer.b2 = 0.999  # Adam beta2
    config.checkpoint.every = 100  # steps between orbax checkpoints
    return config
