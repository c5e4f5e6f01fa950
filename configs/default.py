"""The one config schema: every field train.py, eval.py and ask read, one comment each, with
the paper's values (Lewis et al. 2020, section 3 and appendix B: RAG-Sequence on Natural
Questions, a DPR question encoder and BART-large trained jointly, K=5, Adam at 3e-5). Values
the paper does not give (batch size, warmup, clipping, weight decay, label smoothing, lengths)
are those of transformers' RAG fine-tuning example
(examples/research_projects/rag/finetune_rag.sh).

Every other config starts from this one and sets only what differs (``configs/tiny.py``,
``configs/demo.py``, ``configs/rag_token_nq.py``, ...). The returned config is locked: a
misspelt field in an override is an error, not a new field nobody reads. How to launch it:
``configs/rag_sequence_nq.py``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init of a generator built from scratch, and data order
    config.batch_size = 64  # questions per micro-batch (global): finetune_rag's 8 GPUs x 8
    config.train_steps = 12_000  # optimizer steps: ~10 epochs of NQ's 79,168 questions
    config.log_every = 50  # steps between metric lines (JSONL, TensorBoard)
    config.progress = True  # a tqdm bar in the terminal (process 0)

    config.model = ml_collections.ConfigDict()
    # BERT_q: a BERT / DPR / sentence-transformers dir (the paper starts from DPR's NQ encoder)
    config.model.question_encoder = "checkpoints/dpr-question_encoder-single-nq-base"
    config.model.generator = "checkpoints/bart-large"  # a BART dir; empty: build generator_init
    config.model.generator_tokenizer = ""  # empty: the generator's dir, else BERT_q's
    # A BERT dir whose weights initialise the generator built from generator_init (encoder and
    # decoder layers, embeddings, positions; Rothe et al., 2020); empty: random initialisation.
    config.model.generator_warm_start = ""
    # Train BERT_d too (rag_jax/doc_encoder.py): d(z) of the retrieved passages is recomputed in
    # the step, and data.refresh_every re-encodes the corpus. Off: the paper's frozen index.
    config.model.train_doc_encoder = False
    config.model.doc_encoder = ""  # BERT_d's dir when it trains; empty: question_encoder's
    config.model.bf16 = True  # bf16 compute (parameters and optimizer stay float32)
    config.model.remat = False  # recompute each layer in the backward pass
    # Dropout in training, BERT_q and the generator alike (replacing their checkpoints'
    # config.json values; evaluation, decoding and load_trained run without it):
    config.model.dropout = 0.1  # embeddings, residual branches (finetune_rag --dropout)
    config.model.attention_dropout = 0.1  # attention probabilities (--attention_dropout)
    config.model.activation_dropout = 0.0  # inside the generator's feed-forward (BERT has none)
    # BartConfig fields of a generator built from scratch (model.generator empty; vocab and
    # special ids come from the generator tokenizer): BART-large's shape.
    config.model.generator_init = ml_collections.ConfigDict(
        dict(
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
        )
    )

    config.rag = ml_collections.ConfigDict()  # RagConfig: see rag_jax/rag.py
    config.rag.n_docs = 5  # K: documents per question (the paper trains with 5 or 10)
    config.rag.doc_score_scale = 1.0  # p(z|x) ∝ exp(scale · d(z)·q(x)); 20 for unit vectors
    config.rag.marginalization = "sequence"  # "sequence" (eq. 1), "token" (eq. 2), "closed_book"
    config.rag.label_smoothing = 0.1  # epsilon of label smoothing (finetune_rag)
    config.rag.max_question_length = 128  # L: query-encoder tokens (finetune_rag's source)
    config.rag.max_context_length = 300  # S: generator input tokens (passage cut first)
    config.rag.max_target_length = 25  # T: answer tokens with BOS/EOS (finetune_rag)
    config.rag.title_sep = " / "  # between title and text, as transformers' RagRetriever
    config.rag.doc_sep = " // "  # between passage and question
    config.rag.prefix = ""  # before every generator input

    config.data = ml_collections.ConfigDict()
    config.data.train = "data/nq/nq-train.qa.csv"  # QA JSONL / DPR json / TSV file
    config.data.index = "indexes/psgs_w100"  # index directory (python -m rag_jax.index build)
    config.data.index_backend = ""  # "exact" or "scann"; empty: what the index was built with
    config.data.skip_bad_lines = False  # skip (and count) malformed QA lines instead of failing
    # Build the next batch (retrieval + tokenization) in a background thread while the step
    # runs. Either way the next batch is retrieved with the query encoder from before the
    # current step (one step stale), so this changes speed, never results.
    config.data.prefetch = True
    # "host": search the index on the host each step; "device": an exact index's vectors and
    # the passages' tokens on the device, retrieval inside the jitted step (same losses).
    config.data.retrieval = "host"
    # Steps between re-encodings of the whole corpus with the current BERT_d (train_doc_encoder
    # and device retrieval only); 0: never (the index is still re-encoded at the start when
    # BERT_d is not the encoder that built it).
    config.data.refresh_every = 0
    # Between refreshes, over-retrieve this many candidates (L > K) from the stale index and
    # keep the K best by q(x)·d(z) with the current BERT_d (Atlas, Izacard et al., 2022);
    # 0: the top K of the index. train_doc_encoder only.
    config.data.rescore_candidates = 0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 3e-5  # peak learning rate (the paper)
    config.optimizer.schedule = "linear"  # "linear" or "cosine" decay after warmup
    config.optimizer.warmup_steps = 500  # linear warmup from 0 (finetune_rag)
    config.optimizer.end_lr_factor = 0.0  # final learning rate / peak (linear decay to 0)
    config.optimizer.decay_steps = 0  # steps of the decay's whole schedule; 0: train_steps
    config.optimizer.query_encoder_lr_factor = 1.0  # BERT_q's learning rate / the peak
    config.optimizer.generator_lr_factor = 1.0  # the generator's learning rate / the peak
    config.optimizer.doc_encoder_lr_factor = 1.0  # BERT_d's (model.train_doc_encoder) / the peak
    config.optimizer.freeze = ""  # regex: parameter paths never updated ("^generator/shared/")
    config.optimizer.b1 = 0.9  # Adam beta1
    config.optimizer.b2 = 0.999  # Adam beta2
    config.optimizer.weight_decay = 0.001  # AdamW decoupled weight decay (finetune_rag)
    config.optimizer.max_grad_norm = 0.1  # global-norm gradient clipping (finetune_rag)
    config.optimizer.grad_accum_steps = 1  # micro-batches per update (all steps count updates)
    config.optimizer.max_consecutive_nonfinite = 5  # non-finite updates in a row that stop the run

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # devices on the data axis
    config.mesh.fsdp = 0  # devices on the fsdp axis; 0: all the devices data leaves
    config.mesh.fsdp_params = True  # shard parameters over fsdp (else replicated)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000  # steps between orbax checkpoints
    config.checkpoint.keep = 3  # checkpoints kept

    config.collapse = ml_collections.ConfigDict()  # retrieval-collapse warnings
    config.collapse.window = 5000  # retrieved documents remembered
    config.collapse.min_entropy = 0.05  # warn below this mean entropy of p(z|x) (nats)
    config.collapse.min_distinct_docs = 100  # warn below this many distinct docs in the window
    config.lock()
    return config
