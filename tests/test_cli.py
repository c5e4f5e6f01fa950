"""train.py and eval.py: a --config override naming no config field is one line, not a
traceback, and nothing is written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_misspelled_config_override_is_one_clear_line(script, tmp_path):
    workdir = tmp_path / "run"
    args = [
        sys.executable, str(ROOT / script), "--config", str(ROOT / "configs/tiny.py"),
        "--workdir", str(workdir), "--config.optimizer.learnin_rate=1",
    ]  # fmt: skip
    if script == "eval.py":
        args.append(f"--data={tmp_path / 'qa.jsonl'}")
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: a --config override names no config field: learnin_rate Did you mean "
        '"learning_rate" instead of "learnin_rate"?'
    ]
    assert not workdir.exists()
