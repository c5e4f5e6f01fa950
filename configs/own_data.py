"""RAG on your own passages and questions (README, "Your own data"): the demo's recipe with
your files. A pretrained sentence encoder (all-MiniLM-L6-v2, copied to checkpoints/minilm)
fine-tuned gently as BERT_q (3e-5, cosine x 20, the generator at a tenth), from the generator
the warm-up trained and exported (configs/own_data_warmup.py). The files::

    data/passages.jsonl   {"id": ..., "title": ..., "text": ...} a line: your knowledge
    data/qa.jsonl         {"question": ..., "answers": [...]} a line: training pairs
    runs/own/index        python -m rag_jax.index build --encoder checkpoints/minilm ...

    python train.py --config configs/own_data.py --workdir runs/own/rag
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.train_steps = 200  # optimizer steps: ~10 passes over a few hundred questions
    config.model.question_encoder = "checkpoints/minilm"  # all-MiniLM-L6-v2, as BERT_q
    config.model.generator = "runs/own/warmup/export/generator"  # the warm-up's, exported
    config.model.generator_tokenizer = "checkpoints/minilm"  # MiniLM's WordPiece vocabulary
    config.data.train = "data/qa.jsonl"  # your question -> answers pairs
    config.data.index = "runs/own/index"  # your passages, indexed with checkpoints/minilm
    config.checkpoint.every = 100  # steps between orbax checkpoints
    config.collapse.window = 400  # retrieved documents remembered (100 questions x K)
    config.collapse.min_distinct_docs = 20  # warn below this many distinct documents
    return config
