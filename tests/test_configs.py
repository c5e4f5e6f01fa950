"""configs/rag_sequence_nq.py and rag_token_nq.py: they load, validate, carry the paper's
setup, and comment every field as configs/tiny.py does."""

import importlib
import re
from pathlib import Path

import pytest

from configs import tiny
from rag_jax.builders import rag_config
from rag_jax.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items") and key != "generator_init":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_paper_configs_load_and_validate(marginalization):
    name = f"rag_{marginalization}_nq"
    config = importlib.import_module(f"configs.{name}").get_config()
    assert set(leaves(config)) == set(leaves(tiny.get_config()))  # train() reads every field
    rag = rag_config(config)  # RagConfig validates its fields
    assert (rag.marginalization, rag.n_docs, rag.max_context_length) == (marginalization, 5, 300)
    assert config.optimizer.learning_rate == 3e-5 and config.model.bf16
    assert "dpr-question_encoder" in config.model.question_encoder
    assert "bart-large" in config.model.generator
    make_optimizer(config)  # the optimizer builds from it
    assert config.batch_size % 8 == 0  # splits over 8 GPUs or a v4-16's 8 chips

    source = (ROOT / "configs" / f"{name}.py").read_text()
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s+config\.\w+(\.\w+)* = (?!ml_collections)", line):
            assert "#" in line or lines[i - 1].strip().startswith("#"), f"{name}.py:{i + 1}"
    docstring = source.split('"""')[1]
    assert f"python train.py --config configs/{name}.py --workdir" in docstring
    assert "--distributed" in docstring and "python -m rag_jax.index build" in docstring
