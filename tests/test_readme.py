"""The README's code blocks run as written.

Each ```python block is executed with only what the prose around it says exists (a trained
or loaded model, token arrays of the legend's shapes; placeholder paths replaced by a real
checkpoint of that kind). Every ```bash block is either executed by a test named in
``BASH_BLOCKS`` or is one the suite cannot run here, with the reason; a new block must be
added to that table, so none goes untried by accident.
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from rag_jax.models import Bart, BartConfig, BertConfig, BertEncoder
from rag_jax.rag import RagConfig, RagModel, save_rag

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = {  # the block's first command line -> the test that runs it, or why none can
    "make install": "CI: .ci/run runs the README's set-up and test commands on a clean clone",
    "make demo": "tests/test_demo.py (the same pipeline in-process, CI-sized)",
    "python train.py --config configs/demo_warmup.py": "tests/test_demo.py: the same three "
    "steps in-process (train() on demo_warmup, export, train() on demo with the exported "
    "generator); train.py's flag parsing by tests/test_training.py's CLI test",
    "python -m rag_jax.index build": "tests/test_index_cli.py (build, search, tune)",
    "python train.py --config configs/tiny.py": "tests/test_training.py::"
    "test_cli_refuses_a_workdir_of_another_model (train.py with configs/tiny.py)",
    "python eval.py": "tests/test_evaluation.py::"
    "test_eval_end_to_end_resumes_and_refuses_a_bad_index",
    "python -m rag_jax.compile": "tests/test_compile.py",
    "python -m rag_jax.export": "tests/test_export.py",
    "python -m rag_jax.ask": "tests/test_evaluation.py (ask on a trained toy workdir)",
    "gcloud": "a TPU pod: not reachable here (tests/test_compile.py compiles the step for one)",
}
B, K, S, T, H, V = 2, 3, 10, 6, 16, 64


@pytest.fixture(scope="module")
def rag_dir(tmp_path_factory):
    """A tiny RAG checkpoint (save_rag): what "path/to/rag-sequence-nq" stands for."""
    rngs = nnx.Rngs(0)
    bert = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    bart = BartConfig(vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, max_position_embeddings=32)  # fmt: skip
    model = RagModel(
        BertEncoder(bert, pooling="cls", rngs=rngs), Bart(bart, rngs=rngs), RagConfig(n_docs=K)
    )
    path = tmp_path_factory.mktemp("readme") / "rag"
    save_rag(model, path)
    return path, model


def context(rag_dir) -> dict:
    """What the README's prose says a block may use."""
    model = rag_dir[1]
    rng = np.random.default_rng(0)
    return {
        "model": model,
        "input_ids": rng.integers(3, V, (B, S)),
        "attention_mask": np.ones((B, S), bool),
        "decoder_input_ids": rng.integers(3, V, (B, T)),
        "context_ids": rng.integers(3, V, (B, K, S)),
        "context_mask": np.ones((B, K, S), bool),
        "doc_scores": rng.normal(size=(B, K)).astype(np.float32),
    }


def test_every_block_is_run_or_says_why_not():
    assert len(PYTHON_BLOCKS) >= 3
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        first = next(line for line in block.splitlines() if line and not line.startswith("#"))
        command = first.strip().removeprefix(".venv/bin/")
        known = [key for key in BASH_BLOCKS if command.startswith(key)]
        assert known, f"README bash block starting {first!r}: run it in a test, or say why not"


@pytest.mark.parametrize("number", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(number, rag_dir):
    source = PYTHON_BLOCKS[number]
    path = str(rag_dir[0])
    source = source.replace('"path/to/dpr-question-encoder"', repr(path))
    source = source.replace('"path/to/rag-sequence-nq"', repr(path))
    assert "path/to" not in source, "a placeholder path the test does not know"
    namespace = context(rag_dir) if "import" in source else {}
    exec(compile(source, f"README.md python block {number + 1}", "exec"), namespace)
    arrays = [
        v
        for v in namespace.values()
        if isinstance(v, jax.Array) and jax.numpy.issubdtype(v.dtype, jax.numpy.floating)
    ]
    assert arrays and all(np.isfinite(np.asarray(a, np.float32)).all() for a in arrays)
