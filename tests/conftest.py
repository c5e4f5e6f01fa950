"""Test-wide set-up. Runs before any test module imports jax."""

import os

# Four simulated CPU devices, so sharding tests run in-process; single-device code is unaffected
# (arrays live on device 0 unless sharded).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Nothing may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import re

import jax
import pytest


@pytest.fixture
def dot_output_types():
    """``fn, *args -> [str]``: the result dtype of every dot_general in ``fn``'s jaxpr (nested
    jaxprs included), e.g. to check that bf16 products sum in float32."""

    def output_types(fn, *args) -> list[str]:
        text = str(jax.make_jaxpr(fn)(*args))
        return re.findall(r"dot_general\[.*?preferred_element_type=(\w+)", text, flags=re.DOTALL)

    return output_types
