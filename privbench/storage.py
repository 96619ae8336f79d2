"""Atomic file writes: a temp file in the same folder, then rename. A crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_dir_once(final: str | Path, build, *, poll: float = 1.0) -> bool:
    """Create folder `final` by calling build(tmp_dir), atomically and at most once.

    The folder is built under a temporary name and renamed into place when complete, so a
    reader never sees half a run and an interrupted build leaves only a temp folder (removed
    by the next attempt). A lock file holding the builder's pid makes a second process wait
    for the first instead of building the same thing. Returns True if this call built it.
    """
    import shutil
    import time

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".{final.name}.lock"
    while True:
        if final.exists():
            return False
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and not _pid_alive(holder):
                lock.unlink(missing_ok=True)  # stale: its builder died
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        if final.exists():
            return False
        for old in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)  # left by an interrupted build
        tmp.mkdir()
        build(tmp)
        os.rename(tmp, final)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
