"""Test-wide set-up. Runs before any test module imports jax."""

import os

# Four simulated CPU devices, so sharding tests run in-process; single-device code is unaffected
# (arrays live on device 0 unless sharded). XLA's CPU backend at optimization level 0: the
# suite's programs are tiny and most of their time is compiling, mostly LLVM optimizing code
# that then runs for milliseconds. The level changes how XLA turns a program into CPU code, not
# what it computes: the same results up to float rounding, and programs compared bit for bit are
# compiled alike (subprocesses inherit the flags: tests/toy.devices_env). The CI demo, which
# computes for real, runs at XLA's default level as `make demo` does.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
# Nothing may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# One XLA compilation cache for the whole session: the pytest-xdist workers and every
# subprocess (train.py, eval.py) inherit it through the environment, so a train step or an
# eager op compiled once is not compiled again in another process. A fresh directory each
# session (the first process to import this file makes it, the others inherit it), removed at
# exit: results never depend on an earlier run. A cache hit returns the executable XLA built
# for the identical program; a torn entry (a process killed mid-write) only warns and compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _xla_cache = tempfile.mkdtemp(prefix="rag_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    # Not the many tiny eager ops (writing each costs more than compiling it again), but
    # everything from an embedding or decode step up (the default, 1 s, misses some of those).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

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


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The toy world of tests/toy.py, built once per process (read only: tests that need
    another index or corpus write theirs under their own tmp_path)."""
    from tests.toy import toy_setup

    return toy_setup(tmp_path_factory.mktemp("toy"))


# Files that take a minute or more (mostly compiling and running train steps), slowest first.
# pytest-xdist's --dist loadfile hands out whole files in the order given here, and by default
# puts the files with the most tests first, which left these few-test files for the end, run
# one after the other on one worker while the other had nothing left. Slow files first, then
# the rest by number of tests, lets both workers finish together.
SLOW_FILES = [
    "test_training.py",
    "test_readme.py",
    "test_training_distributed.py",
    "test_evaluation.py",
    "test_checkpoints.py",
    "test_demo.py",
    "test_device_retrieval.py",
    "test_training_retrieval.py",
    "test_rag.py",
    "test_benchmarks.py",
    "test_training_bf16.py",
    "test_host_retrieval.py",
]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    counts = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def rank(item):
        name = item.path.name
        if name in SLOW_FILES:
            return (0, SLOW_FILES.index(name), "")
        return (1, -counts[name], name)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def toy(toy_world):
    """The toy world of tests/toy.py: each answer, a made-up name, is one passage's title."""
    return toy_world
