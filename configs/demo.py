"""The main job (``make demo``): RAG on 10,033 Wikipedia lead sections, on a 2-core CPU.

Questions are Wikipedia short descriptions, answers the article titles (Jeopardy style);
``examples/wiki/run.py`` prepares the data, the index and the generator warm-up
(``configs/demo_warmup.py``, exported with ``rag_jax.export``), then trains RAG with this
config. By hand::

    python train.py --config configs/demo.py --workdir runs/demo/runs/rag_sequence \
        --config.model.generator=runs/demo/runs/warmup-HASH/export/generator

The other paths default to where ``examples/wiki/run.py`` puts things.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.batch_size = 16  # questions per micro-batch (grad_accum_steps 1: per update)
    config.train_steps = 100  # optimizer steps (1,600 of the 8,245 training questions)
    config.log_every = 10  # steps between metric lines

    config.model.question_encoder = "runs/demo/minilm"  # all-MiniLM-L6-v2, fine-tuned as BERT_q
    config.model.generator = "runs/demo/generator"  # the warm-up's generator (BART)
    config.model.generator_tokenizer = "runs/demo/minilm"  # MiniLM's WordPiece vocabulary
    # The generator's shape, used by the warm-up that builds it (configs/demo_warmup.py): MiniLM's
    # width, heads and feed-forward size, so that its layers can warm-start it; 3+2 layers.
    config.model.generator_init.update(
        d_model=384,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_position_embeddings=64,
    )
    config.model.bf16 = False  # float32 compute: CPU
    config.model.dropout = 0.0  # the recipe the demo's numbers were measured with
    config.model.attention_dropout = 0.0  # no attention dropout

    config.rag.n_docs = 4  # K documents per question in training
    config.rag.doc_score_scale = 20.0  # MiniLM's vectors are unit length: cosine x 20
    config.rag.label_smoothing = 0.0  # plain NLL
    config.rag.max_question_length = 24  # L: descriptions are short (99% <= 18 tokens)
    config.rag.max_context_length = 32  # S: title, the start of the passage, the question
    config.rag.max_target_length = 8  # T: a title and [SEP] (99.5% of titles fit)

    config.data.train = "runs/demo/data/train.jsonl"  # description -> title pairs
    config.data.index = "runs/demo/index"  # MiniLM index of the 10,033 passages

    # The paper's learning rate for BERT_q; the generator, which already copies titles (the
    # warm-up), at a tenth of it: faster, it learns the training titles as a closed-book prior
    # and then prefers them over the unseen title of the passage it reads.
    # The schema's learning rate (3e-5) and query_encoder_lr_factor (1) are kept.
    config.optimizer.generator_lr_factor = 0.1  # the generator at 3e-6
    config.optimizer.freeze = "^generator/shared/"  # MiniLM's token embeddings, as in the warm-up
    config.optimizer.warmup_steps = 10  # linear warmup from 0
    config.optimizer.end_lr_factor = 0.1  # final learning rate / peak
    config.optimizer.weight_decay = 0.0  # no weight decay
    config.optimizer.max_grad_norm = 1.0  # global-norm gradient clipping

    config.mesh.fsdp_params = False  # parameters replicated

    config.checkpoint.every = 50  # steps between orbax checkpoints
    config.checkpoint.keep = 2  # checkpoints kept
    config.collapse.window = 800  # documents remembered for the distinct-documents count
    config.collapse.min_distinct_docs = 50  # warn below this many distinct documents
    return config
