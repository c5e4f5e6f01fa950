"""Interrupted training on the tiny config and the toy index: SIGKILL mid-run (``train.py``
in a subprocess), SIGTERM mid-run, and a crash inside a checkpoint save. Each time running
again resumes from the last complete checkpoint and ends with the parameters, optimizer state,
data position and losses of a run never interrupted, bit for bit (dropout on).

SIGTERM and the crash are raised in this process (a subprocess would compile the step again);
``train.py`` returns from :func:`train` to exit 0, so a stop that returns is a clean exit.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from rag_jax.training import train
from tests.toy import DECAY_STEPS, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3  # checkpoints at 3, 6, 9, 12 (two kept)
OVERRIDES = {
    "train_steps": STEPS, "checkpoint.every": EVERY, "log_every": 1, "rag.n_docs": 4,
    "optimizer.decay_steps": DECAY_STEPS,  # train.py as tiny_config
    "model.dropout": 0.1, "model.attention_dropout": 0.1,  # its RNG streams restored too
}  # fmt: skip


def command(toy, workdir: Path) -> list[str]:
    overrides = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    return [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
        "--workdir", str(workdir), f"--config.model.question_encoder={toy / 'encoder'}",
        f"--config.data.index={toy / 'index'}", f"--config.data.train={toy / 'qa.jsonl'}",
        *overrides,
    ]  # fmt: skip


def first_checkpoint(workdir: Path) -> Path:
    return workdir / "checkpoints" / str(EVERY)


def wait_for(condition, alive=lambda: True, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive() and time.monotonic() < deadline
        time.sleep(0.005)


def saved_steps(workdir: Path) -> list[int]:
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        return sorted(manager.all_steps())


def final_state(workdir: Path) -> dict:
    """The latest checkpoint: its step, data position, and arrays (parameters, optimizer
    state, retrieval snapshot) by path."""
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        step = manager.latest_step()
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), position=ocp.args.JsonRestore()
            ),
        )
    arrays = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"]):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # the RNG state
            leaf = jax.random.key_data(leaf)
        arrays[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return {"step": step, "position": dict(restored["position"]), "arrays": arrays}


def losses_by_step(workdir: Path) -> dict[int, float]:
    """Each step's loss, from ``metrics.jsonl``: one line a step, even where an interrupted
    run logged steps after its last checkpoint that the resumed run did again."""
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})
    return {m["step"]: m["loss"] for m in metrics}


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory):
    """A run never interrupted."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(toy, **OVERRIDES), str(workdir))
    return final_state(workdir), losses_by_step(workdir)


def resume(toy, workdir: Path, caplog) -> int:
    """Runs the same training again in ``workdir``; returns the step it resumed from."""
    caplog.clear()
    with caplog.at_level("INFO", logger="rag_jax.training"):
        train(tiny_config(toy, **OVERRIDES), str(workdir))
    (message,) = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    return int(message.split("resumed from step")[1].split()[0])


def assert_same_as_straight(workdir: Path, straight) -> None:
    state, losses = straight
    resumed = final_state(workdir)
    assert resumed["step"] == state["step"] == STEPS
    assert resumed["position"] == state["position"]
    assert resumed["arrays"].keys() == state["arrays"].keys()
    # Bit for bit: the same program (one process, the CPU) on the same restored inputs.
    for name, value in state["arrays"].items():
        np.testing.assert_array_equal(resumed["arrays"][name], value, err_msg=name)
    resumed_losses = losses_by_step(workdir)
    assert sorted(resumed_losses) == sorted(losses) == list(range(1, STEPS + 1))
    assert [resumed_losses[s] for s in sorted(losses)] == [losses[s] for s in sorted(losses)]


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(toy, straight, tmp_path, caplog):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command(toy, workdir), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(first_checkpoint(workdir).is_dir, alive=lambda: process.poll() is None)
        process.kill()  # SIGKILL: no handler runs, a save may be half done
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    killed_at = saved_steps(workdir)
    assert killed_at and max(killed_at) < STEPS  # killed mid-run, after a checkpoint
    assert resume(toy, workdir, caplog) == max(killed_at)
    assert_same_as_straight(workdir, straight)


def test_sigterm_saves_the_current_step_and_stops(toy, straight, tmp_path, caplog):
    workdir = tmp_path / "run"

    def preempt():
        wait_for(first_checkpoint(workdir).is_dir)
        os.kill(os.getpid(), signal.SIGTERM)

    # A SIGTERM that arrives after train() has returned must not end the test session.
    previous = signal.signal(signal.SIGTERM, lambda *args: None)
    watcher = threading.Thread(target=preempt, daemon=True)
    try:
        watcher.start()
        with caplog.at_level("WARNING", logger="rag_jax.training"):
            train(tiny_config(toy, **OVERRIDES), str(workdir))
        watcher.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (message,) = [r.getMessage() for r in caplog.records if "SIGTERM" in r.getMessage()]
    stopped = int(message.split("saved step")[1].split()[0])
    assert EVERY <= stopped < STEPS
    assert saved_steps(workdir)[-1] == stopped
    assert final_state(workdir)["step"] == stopped  # complete and restorable
    assert max(losses_by_step(workdir)) == stopped  # no step after it
    assert resume(toy, workdir, caplog) == stopped
    assert_same_as_straight(workdir, straight)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(
    toy,
    straight,
    tmp_path,
    caplog,
    monkeypatch,
):
    """The save of step 6 dies after writing its files, before the rename that commits them
    (as a SIGKILL there would): step 3 stays the latest checkpoint, and the half-done save is
    neither read nor in the way of the run that resumes."""
    workdir = tmp_path / "run"
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash_at_step_6(self):
        if self._final_path.name == str(2 * EVERY):
            raise OSError("simulated crash during the save")
        return await commit(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash_at_step_6)
    with pytest.raises(Exception, match="simulated crash"):
        train(tiny_config(toy, **OVERRIDES), str(workdir))
    monkeypatch.undo()
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert any(name.startswith(f"{2 * EVERY}.") for name in leftovers), leftovers
    assert saved_steps(workdir) == [EVERY]
    assert resume(toy, workdir, caplog) == EVERY
    assert_same_as_straight(workdir, straight)
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert sorted(leftovers, key=int) == [
        str(STEPS - EVERY),
        str(STEPS),
    ]  # the half-done save: gone
