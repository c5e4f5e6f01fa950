"""rag_jax._files: atomic files and directory swaps, including a process killed mid-swap."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rag_jax import _files
from rag_jax.index.corpus import Passage, PassageStore
from rag_jax.models.hf_io import read_hf_config, read_state_dict, save_hf_checkpoint

# Runs ``code`` in a fresh process whose os.rename / os.replace exit the process (status 3)
# instead of moving anything onto TARGET: killed just before the new version goes into place.
_KILLER = """
import os, sys
TARGET = os.path.abspath(sys.argv[1])
for name in ("rename", "replace"):
    def killing(src, dst, _real=getattr(os, name)):
        if os.path.abspath(dst) == TARGET:
            os._exit(3)
        _real(src, dst)
    setattr(os, name, killing)
"""


def _run_killed(code: str, target) -> None:
    script = _KILLER + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert done.returncode == 3, done.stderr.decode()[-2000:]


def _passages(n: int) -> list[Passage]:
    return [Passage(str(i), f"title {i}", f"text {i}") for i in range(n)]


def test_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    _files.write_text(path, "old")
    _files.write_text(path, "new")
    assert path.read_text() == "new"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _files.write_text(path, "newer")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no temp file left


def test_replace_dir_restores_the_old_directory_when_the_move_fails(tmp_path, monkeypatch):
    target, staging = tmp_path / "store", tmp_path / "store.tmp"
    target.mkdir()
    (target / "a").write_text("old")
    staging.mkdir()
    (staging / "a").write_text("new")
    real_rename = os.rename

    def rename(source, destination):
        if source == staging:
            raise OSError("simulated failure")
        real_rename(source, destination)

    monkeypatch.setattr(_files.os, "rename", rename)
    with pytest.raises(OSError, match="simulated failure"):
        _files.replace_dir(staging, target)
    assert (target / "a").read_text() == "old"
    monkeypatch.setattr(_files.os, "rename", real_rename)
    _files.replace_dir(staging, target)
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_passage_store_survives_a_kill_between_the_renames(tmp_path):
    path = tmp_path / "passages"
    old = PassageStore.write(_passages(3), path)
    code = """
        from rag_jax.index.corpus import Passage, PassageStore
        PassageStore.write([Passage(str(i), "t", "x") for i in range(5)], TARGET)
    """
    _run_killed(code, path)
    reopened = PassageStore(path)  # the old store, whole
    assert len(reopened) == 3 and reopened.sha256 == old.sha256
    assert reopened[2] == _passages(3)[2]
    assert not _files.replaced_path(path).exists()
    assert len(PassageStore.write(_passages(5), path)) == 5  # and the next write works


def test_checkpoint_survives_a_kill_between_the_renames(tmp_path):
    path = tmp_path / "ckpt"
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_hf_checkpoint(path, weights, {"model_type": "bert"})
    code = """
        import numpy as np
        from rag_jax.models.hf_io import save_hf_checkpoint
        save_hf_checkpoint(TARGET, {"w": np.zeros((4,), np.float32)}, {"model_type": "bart"})
    """
    _run_killed(code, path)
    assert read_hf_config(path) == {"model_type": "bert"}  # the old checkpoint, whole
    np.testing.assert_array_equal(read_state_dict(path)["w"], weights["w"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["ckpt"]


def test_a_kill_after_the_swap_leaves_the_new_version_and_the_old_is_removed(tmp_path):
    path = tmp_path / "passages"
    PassageStore.write(_passages(4), path)  # the new store, in place
    PassageStore.write(_passages(3), _files.replaced_path(path))  # the old, not yet deleted
    assert len(PassageStore(path)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages"]


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"a": 1}')
    assert _files.read_json(path) == {"a": 1}
    path.write_text("{")
    with pytest.raises(KeyError, match=r"settings\.json: unreadable settings \(.*; fix it"):
        _files.read_json(path, KeyError, unreadable="unreadable settings", advice="; fix it")
    path.write_text("[1]")
    with pytest.raises(ValueError, match=r"settings\.json: expected a JSON object, got list"):
        _files.read_json(path)
    assert _files.read_json(path, expect=None) == [1]
