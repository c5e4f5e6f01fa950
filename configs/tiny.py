"""Tiny RAG for tests and smoke runs on one CPU: seconds per run.

The paths are placeholders that the caller fills in with overrides, e.g.::

    python train.py --config configs/tiny.py --workdir runs/tiny \\
        --config.model.question_encoder=ENCODER_DIR --config.data.index=INDEX_DIR \\
        --config.data.train=qa.jsonl
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init of a generator built from scratch, and data order
    config.batch_size = 4  # questions per micro-batch (global); an update reads grad_accum_steps
    config.train_steps = 20  # optimizer steps
    config.log_every = 5  # steps between metric lines (JSONL, TensorBoard)
    config.progress = False  # a tqdm bar in the terminal

    config.model = ml_collections.ConfigDict()
    config.model.question_encoder = ""  # BERT_q: a BERT / DPR / sentence-transformers dir
    config.model.generator = ""  # a BART dir; empty: build one from generator_init
    config.model.generator_tokenizer = ""  # empty: the generator's dir, else BERT_q's
    # A BERT dir whose weights initialise the generator built from generator_init (encoder and
    # decoder layers, embeddings, positions; Rothe et al., 2020); empty: random initialisation.
    config.model.generator_warm_start = ""
    # Dropout in training (off in evaluation and decoding), in BERT_q and the generator alike;
    # these replace the checkpoints' own values (config.json) and generator_init's.
    config.model.dropout = 0.0  # embeddings and residual branches (BERT's hidden_dropout_prob)
    config.model.attention_dropout = 0.0  # attention probabilities
    config.model.activation_dropout = 0.0  # inside the generator's feed-forward (BERT has none)
    config.model.bf16 = False  # bf16 compute (parameters and optimizer stay float32)
    config.model.remat = False  # recompute each layer in the backward pass
    # BartConfig fields of a generator trained from scratch (vocab and special ids come from
    # the generator tokenizer).
    config.model.generator_init = ml_collections.ConfigDict(
        dict(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
        )
    )

    config.rag = ml_collections.ConfigDict()  # RagConfig: see rag_jax/rag.py
    config.rag.n_docs = 4  # K: documents per question
    config.rag.doc_score_scale = 1.0  # p(z|x) ∝ exp(scale · d(z)·q(x)); 20 for unit vectors
    config.rag.marginalization = "sequence"  # "sequence", "token" or "closed_book"
    config.rag.label_smoothing = 0.0  # epsilon of label smoothing
    config.rag.max_question_length = 32  # L: query-encoder tokens
    config.rag.max_context_length = 48  # S: generator input tokens (passage cut first)
    config.rag.max_target_length = 8  # T: answer tokens with BOS/EOS
    config.rag.title_sep = " / "  # between title and text, as transformers' RagRetriever
    config.rag.doc_sep = " // "  # between passage and question
    config.rag.prefix = ""  # before every generator input

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # QA JSONL / DPR json / TSV file
    config.data.index = ""  # index directory (python -m rag_jax.index build)
    config.data.index_backend = ""  # "exact" or "scann"; empty: what the index was built with
    config.data.skip_bad_lines = False  # skip (and count) malformed QA lines instead of failing
    # Build the next batch (retrieval + tokenization) in a background thread while the step
    # runs. Either way the next batch is retrieved with the query encoder from before the
    # current step (one step stale), so this changes speed, never results.
    config.data.prefetch = True
    # "host": search the index on the host each step; "device": an exact index's vectors and
    # the passages' tokens on the device, retrieval inside the jitted step (same losses).
    config.data.retrieval = "host"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-2  # peak learning rate
    config.optimizer.schedule = "linear"  # "linear" or "cosine" decay after warmup
    config.optimizer.warmup_steps = 2  # linear warmup from 0
    config.optimizer.end_lr_factor = 0.1  # final learning rate / peak
    config.optimizer.decay_steps = 0  # steps of the decay's whole schedule; 0: train_steps
    config.optimizer.query_encoder_lr_factor = 1.0  # BERT_q's learning rate / the peak
    config.optimizer.generator_lr_factor = 1.0  # the generator's learning rate / the peak
    config.optimizer.freeze = ""  # regex: parameter paths never updated ("^generator/shared/")
    config.optimizer.b1 = 0.9  # Adam beta1
    config.optimizer.b2 = 0.999  # Adam beta2
    config.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay
    config.optimizer.max_grad_norm = 1.0  # global-norm gradient clipping
    config.optimizer.grad_accum_steps = 1  # micro-batches per update (all steps count updates)
    config.optimizer.max_consecutive_nonfinite = 5  # non-finite updates in a row that stop the run

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # devices on the data axis
    config.mesh.fsdp = 0  # devices on the fsdp axis; 0: all the devices data leaves
    config.mesh.fsdp_params = False  # shard parameters over fsdp (else replicated)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 10  # steps between orbax checkpoints
    config.checkpoint.keep = 2  # checkpoints kept

    config.collapse = ml_collections.ConfigDict()  # retrieval-collapse warnings
    config.collapse.window = 200  # retrieved documents remembered
    config.collapse.min_entropy = 0.05  # warn below this mean entropy of p(z|x) (nats)
    config.collapse.min_distinct_docs = 2  # warn below this many distinct docs in the window
    return config
