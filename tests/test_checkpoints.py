"""Interrupted training on the tiny config and the toy index: SIGKILL mid-run (``train.py``
in a subprocess), SIGTERM mid-run, SIGINT (``train.py``), a crash inside a checkpoint save and
a damaged latest checkpoint. Each time running again resumes from the last intact checkpoint
and ends with the parameters, optimizer state, data position and losses of a run never
interrupted, bit for bit (dropout on).

SIGTERM and the crash are raised in this process (a subprocess would compile the step again);
:func:`train` then raises :class:`rag_jax.training.StoppedError`, which ``train.py`` turns into
a non-zero exit. The workdir rules (ours or refused, one run at a time, every setting checked
before anything is written, checkpoints that fit the model) are checked on refusals that
happen before a step is compiled.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from rag_jax import checkpoints
from rag_jax.checkpoints import DamagedCheckpointError, WorkdirError, load_trained, tree_mismatch
from rag_jax.training import Preempted, StoppedError, train
from tests.toy import DECAY_STEPS, directory_hash, final_state, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3  # checkpoints at 3, 6, 9, 12 (two kept)
OVERRIDES = {
    "train_steps": STEPS, "checkpoint.every": EVERY, "log_every": 1, "rag.n_docs": 4,
    "optimizer.decay_steps": DECAY_STEPS,  # train.py as tiny_config
    "model.dropout": 0.1, "model.attention_dropout": 0.1,  # its RNG streams restored too
    # One device in train.py's process too (tiny_config's default; configs/tiny.py takes all
    # of them): the straight run's program, the same arithmetic bit for bit.
    "mesh.fsdp": 1,
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
    return final_state(workdir), losses_by_step(workdir), workdir


def resume(toy, workdir: Path, caplog) -> int:
    """Runs the same training again in ``workdir``; returns the step it resumed from."""
    caplog.clear()
    with caplog.at_level("INFO", logger="rag_jax.training"):
        train(tiny_config(toy, **OVERRIDES), str(workdir))
    (message,) = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    return int(message.split("resumed from step")[1].split()[0])


def assert_same_as_straight(workdir: Path, straight) -> None:
    state, losses, _ = straight
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
    # The killed run's lock file stays behind, held by no one: the resumed run takes it over.
    assert (workdir / "lock").read_text().split()[0] == str(process.pid)
    killed_at = saved_steps(workdir)
    assert killed_at and max(killed_at) < STEPS  # killed mid-run, after a checkpoint
    assert resume(toy, workdir, caplog) == max(killed_at)
    assert not (workdir / "lock").exists()
    assert_same_as_straight(workdir, straight)


def test_sigint_saves_and_train_py_exits_non_zero_saying_where_to_resume(toy, tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command(toy, workdir), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(first_checkpoint(workdir).is_dir, alive=lambda: process.poll() is None)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "stopped by SIGINT" in line]
    stopped = int(line.split("saving step")[1].split()[0])
    assert line.endswith(f"in {workdir / 'checkpoints'}; run the same command to resume from it")
    assert EVERY <= stopped < STEPS and saved_steps(workdir)[-1] == stopped
    assert final_state(workdir)["step"] == stopped
    assert not (workdir / "lock").exists()


def test_preempted_takes_sigint_and_sigterm_and_a_second_ctrl_c_stops_at_once():
    # What was there before: Python's default for SIGINT, or SIG_IGN in a process started in
    # the background by a shell without job control (nohup ... &), which the test must allow.
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in (signal.SIGTERM, signal.SIGINT):
        with Preempted() as preempted:
            assert not preempted
            os.kill(os.getpid(), signum)
            wait_for(lambda: bool(preempted), timeout=10)
            assert preempted.signal_name == signal.Signals(signum).name
            if signum == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the handler runs between bytecodes, in this thread
    assert {signum: signal.getsignal(signum) for signum in before} == before  # put back


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
        with (
            caplog.at_level("WARNING", logger="rag_jax.training"),
            pytest.raises(StoppedError, match="stopped by SIGTERM after saving step") as stop,
        ):
            train(tiny_config(toy, **OVERRIDES), str(workdir))
        watcher.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (message,) = [r.getMessage() for r in caplog.records if "saved step" in r.getMessage()]
    stopped = int(message.split("saved step")[1].split()[0])
    assert message.startswith("SIGTERM") and stop.value.step == stopped
    assert f"in {workdir / 'checkpoints'}; run the same command to resume" in str(stop.value)
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


def test_settings_are_checked_before_anything_is_written(toy, tmp_path):
    """Each bad setting is refused in one line naming it, and the workdir (here a new one
    under a new parent) is never created: the corrected command then starts afresh."""
    workdir = tmp_path / "new" / "run"
    bad = {
        "batch_size": 0, "log_every": 0, "checkpoint.every": -1, "checkpoint.keep": 0,
        "train_steps": 0, "optimizer.grad_accum_steps": 0,
    }  # fmt: skip
    for field, value in bad.items():
        with pytest.raises(ValueError, match=rf"^config\.{field} must be a positive int, got"):
            train(tiny_config(toy, **{field: value}), str(workdir))
        assert not workdir.parent.exists(), field
    late = {  # found while building the model, the mesh, the optimizer, the first batch
        "rag.max_target_length": (1, "max_target_length 1 leaves no room"),
        "rag.n_docs": (0, "RagConfig.n_docs must be a positive int"),
        "optimizer.freeze": ("(", "freeze"),
        "mesh.data": (3, "mesh"),
    }
    for field, (value, message) in late.items():
        with pytest.raises(ValueError, match=message):
            train(tiny_config(toy, **{field: value}), str(workdir))
        assert not workdir.parent.exists(), field


def test_a_workdir_not_ours_is_refused_untouched(toy, tmp_path):
    model_dir = tmp_path / "encoder"
    shutil.copytree(toy / "encoder", model_dir)  # holds a config.json, not a run record
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    refusals = {
        model_dir: "is not a run record: a model directory",
        notes: "holds files but no config.json",
        a_file: "exists and is not a directory",
    }
    for workdir, message in refusals.items():
        before = directory_hash(tmp_path)
        with pytest.raises(WorkdirError, match=message):
            train(tiny_config(toy), str(workdir))
        assert directory_hash(tmp_path) == before


def test_tree_mismatch_names_missing_extra_and_reshaped_arrays():
    saved = {"params/a": (2, 3), "params/b": (4,), "params/layers/1/w": (2,), "opt/mu": (1,)}
    expected = {"params/a": (2, 3), "params/b": (5,), "params/c": ()}
    lines = tree_mismatch(saved, expected, parts=("params",))  # opt/ is not compared
    assert lines == [
        "1 arrays of this model are not in it: params/c",
        "1 arrays in it are not in this model: params/layers/1/w",
        "1 arrays differ in shape: params/b saved (4,), here (5,)",
    ]
    assert tree_mismatch(saved, saved) == []
    many = {f"params/x{i}": (1,) for i in range(5)}
    assert tree_mismatch(many, {}) == [
        "5 arrays in it are not in this model: params/x0, params/x1, params/x2, and 2 more"
    ]


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_naming_the_setting(
    toy, straight, tmp_path
):
    """On the uninterrupted run's workdir (checkpoints of steps 9 and 12): resumes with another
    model or optimizer layout, a second run while one holds the lock, and loads into another
    model are refused before anything is written, naming what changed."""
    workdir = tmp_path / "run"
    shutil.copytree(straight[2], workdir)
    before = directory_hash(workdir)
    refusals = {
        "optimizer.grad_accum_steps": (2, "optimizer.grad_accum_steps 1 -> 2"),
        "model.generator_init.decoder_layers": (2, "generator_init.decoder_layers 1 -> 2"),
    }
    for field, (value, changed) in refusals.items():
        with pytest.raises(WorkdirError, match=re.escape(changed)) as refused:
            train(tiny_config(toy, **OVERRIDES, **{field: value}), str(workdir))
        assert len(str(refused.value).splitlines()) <= 3, str(refused.value)
        assert directory_hash(workdir) == before
    with (
        checkpoints.locked(workdir),  # another run, alive, holds the workdir
        pytest.raises(WorkdirError, match=f"another run \\(pid {os.getpid()} on "),
    ):
        train(tiny_config(toy, **OVERRIDES), str(workdir))
    assert directory_hash(workdir) == before  # the lock file went with its holder

    # eval.py, ask, export: a model with a second decoder layer, or wider feed-forward layers.
    two_layers = tiny_config(toy, **OVERRIDES, **{"model.generator_init.decoder_layers": 2})
    with pytest.raises(WorkdirError, match="decoder_layers 1 -> 2") as refused:
        load_trained(two_layers, str(workdir))
    assert "arrays of this model are not in it: " in str(refused.value)
    assert "generator/decoder/layers/1/" in str(refused.value)
    wider = tiny_config(toy, **OVERRIDES, **{"model.generator_init.decoder_ffn_dim": 128})
    with pytest.raises(WorkdirError, match=r"arrays differ in shape: .*fc1.* saved \(32, 64\)"):
        load_trained(wider, str(workdir))
    assert directory_hash(workdir) == before

    # A damaged latest checkpoint: named, and the earlier one offered.
    # Every data file truncated: which arrays orbax writes to which file varies from save to
    # save, and load_trained reads the parameters only (truncating the largest file alone
    # sometimes hit optimizer moments only, and nothing was damaged for the load).
    state_files = list((workdir / "checkpoints" / str(STEPS) / "state").rglob("d/*"))
    assert state_files
    for state_file in state_files:
        state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(DamagedCheckpointError, match=f"checkpoints/{STEPS} is damaged") as damaged:
        load_trained(tiny_config(toy, **OVERRIDES), str(workdir))
    assert str(damaged.value).endswith(f"earlier checkpoints: steps {STEPS - EVERY}")


def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_resumed(
    toy, straight, tmp_path, caplog
):
    """Step 12's ``state/`` is gone: the run warns, resumes from step 9 (taking over a lock
    file a dead run left), moves step 12 aside, and ends as the uninterrupted run."""
    workdir = tmp_path / "run"
    shutil.copytree(straight[2], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS) / "state")
    (workdir / "lock").write_text("999999999 a-host-long-gone\n")  # no process holds it
    assert resume(toy, workdir, caplog) == STEPS - EVERY
    (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert f"the checkpoint {workdir / 'checkpoints' / str(STEPS)} is damaged" in warning
    assert (workdir / "damaged_checkpoints" / str(STEPS)).is_dir()
    assert not (workdir / "lock").exists()
    assert_same_as_straight(workdir, straight)
