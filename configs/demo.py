"""The main job (``make demo``): RAG on 10,033 Wikipedia lead sections, on a 2-core CPU.

Questions are Wikipedia short descriptions, answers the article titles (Jeopardy style);
``examples/wiki_demo.py`` prepares the data, the index and a generator warm-up, then runs
``train.py`` / ``eval.py`` machinery with this config. By hand::

    python train.py --config configs/demo.py --workdir runs/demo/rag_sequence \\
        --config.data.train=runs/demo/data/train.jsonl

Paths default to where ``examples/wiki_demo.py`` puts things.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.seed = 0  # data order (the generator comes warm-started)
    config.batch_size = 16  # questions per optimizer step
    config.train_steps = 300  # optimizer steps (about one pass over the training questions)
    config.log_every = 10  # steps between metric lines
    config.progress = True  # a tqdm bar with rate and ETA

    config.model.question_encoder = "runs/demo/minilm"  # all-MiniLM-L6-v2, fine-tuned as BERT_q
    config.model.generator = "runs/demo/generator_warm"  # the warm-up's generator (BART)
    config.model.generator_tokenizer = "runs/demo/minilm"  # MiniLM's WordPiece vocabulary
    # A generator trained from scratch (the warm-up) on MiniLM's vocabulary: 2+2 layers.
    config.model.generator_init = ml_collections.ConfigDict(
        dict(
            d_model=256,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=1024,
            decoder_ffn_dim=1024,
            max_position_embeddings=128,
            dropout=0.0,
        )
    )

    config.rag.n_docs = 4  # K documents per question in training
    config.rag.doc_score_scale = 20.0  # MiniLM's vectors are unit length: cosine x 20
    config.rag.marginalization = "sequence"  # "sequence", "token" or "closed_book"
    config.rag.max_question_length = 24  # L: descriptions are short (99% <= 18 tokens)
    config.rag.max_context_length = 64  # S: title and the start of the lead section
    config.rag.max_target_length = 8  # T: a title and [SEP] (99.5% of titles fit)

    config.data.train = "runs/demo/data/train.jsonl"  # description -> title pairs
    config.data.index = "runs/demo/index"  # MiniLM index of the 10,033 passages

    config.optimizer.learning_rate = 1e-3  # peak learning rate of the generator
    config.optimizer.query_encoder_lr_factor = 0.03  # MiniLM fine-tuned at 3e-5
    config.optimizer.warmup_steps = 20  # linear warmup from 0
    config.optimizer.end_lr_factor = 0.1  # final learning rate / peak

    config.checkpoint.every = 100  # steps between orbax checkpoints
    config.collapse.window = 800  # documents remembered for the distinct-documents count
    config.collapse.min_distinct_docs = 50  # warn below this many distinct documents
    return config
