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
    "mkdir -p checkpoints && cp -r": "test_your_own_data_commands_run_as_written, below",
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


def own_data_commands() -> list[str]:
    """The "Your own data" block's commands, one a line."""
    section = README[README.index("## Your own data") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


# What the test changes in the commands, and only this: MiniLM (22M parameters; the suite's
# budget) is replaced by the toy world's 16-wide BERT behind MiniLM's tokenizer, the generator
# built from it is 16 wide to match, and each run takes 2 steps.
COPY_MINILM = 'cp -r "$(python -c'
TINY_RUN = [
    "--config.train_steps=2", "--config.checkpoint.every=2", "--config.batch_size=4",
    "--config.optimizer.warmup_steps=1",
]  # fmt: skip
TINY_GENERATOR = [
    f"--config.model.generator_init.{field}={value}"
    for field, value in dict(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    ).items()
]  # fmt: skip


def test_your_own_data_commands_run_as_written(toy, tmp_path):
    import json
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    from tests.toy import FACTS, devices_env

    commands = own_data_commands()
    assert len(commands) == 8 and commands[0].startswith("mkdir -p checkpoints && " + COPY_MINILM)
    root = tmp_path / "repo"  # the commands run from a checkout's root
    shutil.copytree(ROOT / "configs", root / "configs")
    for name in ("train.py", "eval.py"):
        shutil.copy(ROOT / name, root / name)
    (root / "data").mkdir()
    shutil.copy(toy / "corpus.jsonl", root / "data" / "passages.jsonl")
    shutil.copy(toy / "qa.jsonl", root / "data" / "qa.jsonl")
    held_out = "\n".join(line for line in (toy / "qa.jsonl").read_text().splitlines()[-2:])
    (root / "data" / "qa_test.jsonl").write_text(held_out + "\n")
    (root / "checkpoints").mkdir()
    shutil.copytree(toy / "encoder", root / "checkpoints" / "minilm")  # the first command's

    bin_dir = Path(sys.executable).parent
    # `python` is this interpreter; rag_jax imports from this checkout
    env = devices_env(1, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    for command in commands[1:]:
        args = shlex.split(command)
        if args[:2] == ["python", "train.py"]:
            args += TINY_RUN + (TINY_GENERATOR if "own_data_warmup" in command else [])
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, command
    warmup = [line for line in (root / "data/warmup.jsonl").read_text().splitlines() if line]
    assert len(warmup) == len(FACTS) - 2  # the two held-out answers are never a target
    metrics = json.loads((root / "runs/own/eval/metrics.json").read_text())
    assert (metrics["n_questions"], metrics["checkpoint_step"]) == (2, 2)
    assert "a question about your passages" in done.stdout  # ask echoes what it answers
