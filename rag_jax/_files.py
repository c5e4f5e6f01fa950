"""Reading and writing the package's files, written once: JSON, atomic writes, directory swaps.

A reader, or a crash at any moment, finds the old version of a file or directory or the new one,
never a half-written one:

* :func:`write_text` writes a temp file beside the destination and renames it over it (a rename
  replaces a file atomically).
* :func:`staged_dir` gives a private directory beside the destination to write into, and
  moves it into place (:func:`replace_dir`) when the block ends without an error; with one, it
  is deleted and the destination left as it was.
* :func:`replace_dir` moves a finished directory into place. A rename cannot replace a non-empty
  directory, so it takes two: the old directory is renamed aside to a fixed hidden sibling
  (``.<name>.replaced``), then the new one into place, then the old one is deleted; if the
  second rename fails the old one is renamed back. The old version is never deleted before the
  new one is in place. A crash between the two renames leaves it complete under the sibling name,
  and :func:`restore_replaced` (called by ``replace_dir`` and by the code that opens such
  directories) puts it back.

:func:`read_json` reads a JSON file and names the file in every error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_json(
    path: str | os.PathLike,
    error: type[Exception] = ValueError,
    *,
    expect: type | None = dict,
    unreadable: str = "not valid JSON",
    advice: str = "",
) -> Any:
    """The JSON value in ``path``, or ``error`` naming the file.

    Args:
      path: the file.
      error: the exception type raised for text that is not UTF-8 JSON, or a value that is not
        an ``expect`` (None: any JSON value).
      unreadable: says what the file is not, e.g. ``"unreadable manifest"``.
      advice: appended to every message, e.g. ``"; rebuild the index"``.
    """
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {unreadable} ({e}){advice}") from None
    if expect is not None and not isinstance(value, expect):
        wanted = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise error(f"{path}: expected a JSON {wanted}, got {type(value).__name__}{advice}")
    return value


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through ``<path>.tmp`` and a rename: all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replaced_path(target: str | os.PathLike) -> Path:
    """Where :func:`replace_dir` keeps the old ``target`` while the new one is renamed in."""
    target = Path(target)
    return target.with_name(f".{target.name}.replaced")


def restore_replaced(target: str | os.PathLike) -> None:
    """Finishes what a crash between :func:`replace_dir`'s two renames left behind.

    ``target`` missing and its old version aside: the old version goes back. Both present: the
    crash came after the swap, and the old version is deleted.
    """
    target, old = Path(target), replaced_path(target)
    if not os.path.lexists(old):
        return
    if os.path.lexists(target):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, target)


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames the finished directory ``staging`` to ``target``, replacing an existing one.

    ``staging`` must lie beside ``target`` (same file system). If moving it into place fails,
    the old ``target`` is restored and the error raised.
    """
    staging, target = Path(staging), Path(target)
    restore_replaced(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    old = replaced_path(target)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A new directory beside ``target`` to write into; moved to ``target`` (replacing an
    existing one, :func:`replace_dir`) when the block ends, deleted if it raises.

    The moved directory gets an existing ``target``'s permissions, else the usual 0o755
    (``mkdtemp`` makes it private).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        staging.chmod(target.stat().st_mode & 0o7777 if target.is_dir() else 0o755)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
