"""Tiny RAG for tests and smoke runs on one CPU: seconds per run. configs/default.py with a
tiny generator built from scratch, float32, short sequences and a fast learning rate.

The paths are placeholders that the caller fills in with overrides, e.g.::

    python train.py --config configs/tiny.py --workdir runs/tiny \\
        --config.model.question_encoder=ENCODER_DIR --config.data.index=INDEX_DIR \\
        --config.data.train=qa.jsonl
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.batch_size = 4  # questions per micro-batch
    config.train_steps = 20  # optimizer steps
    config.log_every = 5  # steps between metric lines
    config.progress = False  # no tqdm bar (tests read the logs)

    config.model.question_encoder = ""  # filled in by the caller
    config.model.generator = ""  # built from generator_init below
    config.model.bf16 = False  # float32 compute: CPU
    config.model.dropout = 0.0  # no dropout: tests compare losses
    config.model.attention_dropout = 0.0  # no attention dropout
    config.model.generator_init.update(  # a 1+1-layer BART, 32 wide
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
    )

    config.rag.n_docs = 4  # K: documents per question
    config.rag.label_smoothing = 0.0  # plain NLL
    config.rag.max_question_length = 32  # L: query-encoder tokens
    config.rag.max_context_length = 48  # S: generator input tokens
    config.rag.max_target_length = 8  # T: answer tokens with BOS/EOS

    config.data.train = ""  # filled in by the caller
    config.data.index = ""  # filled in by the caller

    config.optimizer.learning_rate = 1e-2  # peak learning rate: a tiny model, a few steps
    config.optimizer.warmup_steps = 2  # linear warmup from 0
    config.optimizer.end_lr_factor = 0.1  # final learning rate / peak
    config.optimizer.weight_decay = 0.0  # no weight decay
    config.optimizer.max_grad_norm = 1.0  # global-norm gradient clipping

    config.mesh.fsdp_params = False  # parameters replicated

    config.checkpoint.every = 10  # steps between orbax checkpoints
    config.checkpoint.keep = 2  # checkpoints kept

    config.collapse.window = 200  # retrieved documents remembered
    config.collapse.min_distinct_docs = 2  # warn below this many distinct docs in the window
    return config
