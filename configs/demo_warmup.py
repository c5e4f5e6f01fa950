"""The demo's generator warm-up: a small BART learns to name the entity a passage is about.

No pretrained seq2seq model is available offline, so ``examples/wiki/run.py`` first trains
the generator closed-book on the corpus alone: input "title / text //" (the RAG input format
with an empty question), target the title. No question and no retrieval label is used, and
the passages of dev and test articles are left out, so test titles are never a target. The
generator starts from MiniLM's weights (``models.bart_from_bert``). By hand::

    python train.py --config configs/demo_warmup.py --workdir runs/demo/runs/warmup
    python -m rag_jax.export --workdir runs/demo/runs/warmup --out runs/demo/runs/warmup/export
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.batch_size = 32  # passages per optimizer step
    config.train_steps = 500  # optimizer steps (about 1.7 passes over the passages)
    config.rag.marginalization = "closed_book"  # the generator alone reads the passage
    config.rag.max_context_length = 24  # S: the title and the first words are enough to copy
    config.model.generator = ""  # built from generator_init (demo.py) ...
    config.model.generator_warm_start = "runs/demo/minilm"  # ... with MiniLM's weights
    config.data.train = "runs/demo/data/warmup.jsonl"  # "title / text //" -> title
    # A new task for a small model: a high rate, and Adam's beta2 at 0.98 (as BART's own
    # training): at 2e-3 and 0.999 the loss spiked late and how well titles were copied varied
    # from run to run.
    config.optimizer.learning_rate = 1e-3  # peak learning rate
    config.optimizer.b2 = 0.98  # Adam beta2
    config.optimizer.generator_lr_factor = 1.0  # the whole rate (demo.py slows it for RAG)
    config.optimizer.warmup_steps = 20  # linear warmup from 0
    # optimizer.freeze stays demo.py's "^generator/shared/": MiniLM's token embeddings (also
    # the tied LM head) stay as they are. Trained, every token that is never a target (the
    # words of unseen titles) is pushed down the softmax, and the generator copies those titles
    # with p ~0.01 instead of ~0.95.
    config.checkpoint.every = 250  # steps between orbax checkpoints
    return config
