"""Files on disk: atomic writes, guarded reads and the build-once lock.

Writes go to a temp file in the same folder, then rename: a crash never leaves half a file.
Reads of stored JSON and checkpoints turn any damage (truncated, empty, wrong type, a pickle
that would run code) into a one-line UserError naming the file; nothing in a file is executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privbench.errors import UserError

EMPTY_LOCK_STALE_SECONDS = 5.0  # a lock still empty after this long lost its writer to a kill


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (threads may be writing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; results are meant to be shared like any file the user writes.
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json(path: str | Path, *, expect: type = dict) -> Any:
    """The JSON content of `path`, which must be of type `expect` (an object by default).
    Unreadable, truncated, empty or wrong-type content raises UserError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UserError(f"{path} is damaged: the file is empty")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise UserError(f"{path} is damaged: invalid JSON ({why})") from None
    if not isinstance(obj, expect):
        raise UserError(f"{path} is damaged: holds a JSON {_json_type(obj)}, expected a JSON {_json_type(expect())}")
    return obj


def _json_type(obj: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A torch file of plain tensors/containers as a dict, loaded with weights_only=True (a
    pickle that would build other objects or run code is refused, not executed)."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UserError(f"{path} refused: it holds objects other than tensors (not loaded, nothing run)") from None
        raise UserError(f"{path} is damaged: {_first_line(exc)}") from None
    except MemoryError:
        raise UserError(f"{path} is damaged: implausible sizes") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # truncated zips and bad records surface as many types
        raise UserError(f"{path} is damaged: not a complete torch file ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), remembered per (path, size, modification time) so a
    file named by many configurations is read once."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _DIGESTS[key] = h.hexdigest()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or _first_line(exc)}") from None
    return _DIGESTS[key]


def tensor_bytes(obj: Any) -> bytes:
    """A torch file's bytes for nested dicts / lists / tuples of tensors, every tensor detached and
    moved to the CPU first: a file written on CUDA opens with a plain torch.load on a CPU-only box."""

    def on_cpu(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu()
        if isinstance(x, dict):
            return {k: on_cpu(v) for k, v in x.items()}
        return type(x)(on_cpu(v) for v in x) if isinstance(x, (list, tuple)) else x

    buf = io.BytesIO()
    torch.save(on_cpu(obj), buf)
    return buf.getvalue()


# -------------------------------------------------------------------------------- locks


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # The name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or the OS cannot say: assume alive)
    return True


def lock_owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid), "since": time.time()}


def lock_state(lock: Path, *, empty_stale: float = EMPTY_LOCK_STALE_SECONDS) -> tuple[str, str, str]:
    """(state, who holds it in words, the content judged) for lock file `lock`; state is
    "gone", "stale" (its builder is dead), "held" (alive here) or "remote" (another host)."""
    try:
        text = lock.read_text(errors="replace").strip()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "gone", "", ""
    except OSError as exc:
        return "held", f"unreadable ({exc.strerror or exc})", ""
    if text.isdigit():  # the format of earlier versions: a bare pid on this host
        info: Any = {"host": socket.gethostname(), "pid": int(text), "start": None}
    else:
        try:
            info = json.loads(text) if text else None
        except json.JSONDecodeError:
            info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        # Empty or garbled: a writer killed between creating and filling it, or one still writing.
        return ("stale" if age > empty_stale else "held"), "no owner recorded", text
    pid, host, start = info["pid"], str(info.get("host")), info.get("start")
    who = f"pid {pid} on host {host}"
    if host != socket.gethostname():
        return "remote", who + " (another machine: privbench cannot check whether it still runs)", text
    if not _pid_alive(pid):
        return "stale", who + " (no longer running)", text
    now_start = process_start_time(pid)
    if start is not None and now_start is not None and now_start != start:
        return "stale", who + " (that pid now belongs to another process)", text
    return "held", who, text


def _try_create_lock(lock: Path, content: str) -> bool:
    """Create `lock` holding `content` if it does not exist, atomically: written to a private
    file first and hard-linked into place, so the lock is never seen empty."""
    mode = 0o666 & ~current_umask()
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.new")
    try:
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode)
        except OSError as exc:
            raise UserError(f"cannot write in {lock.parent}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as f:
            f.write(content)
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # no hard links on this file system: exclusive create, then write
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


def _break_stale(lock: Path, seen: str) -> bool:
    """Remove a stale lock whose content was `seen`, without removing a fresh one that another
    waiter created meanwhile: move it aside first, check it is the one judged stale.
    False if the folder does not let us (then the caller waits and says why)."""
    aside = lock.with_name(f"{lock.name}.{os.getpid()}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if aside.read_text(errors="replace").strip() != seen:
            try:
                os.link(aside, lock)  # someone's live lock: put it back
            except OSError:
                pass
    finally:
        aside.unlink(missing_ok=True)
    return True


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_dir_once(final: str | Path, build, *, poll: float = 1.0, log: Callable[[str], None] | None = None) -> bool:
    """Create folder `final` by calling build(tmp_dir), atomically and at most once.

    The folder is built under a temporary name and renamed into place when complete, so a
    reader never sees half a run and an interrupted build leaves only a temp folder (removed
    by the next attempt). A lock file recording the builder (host, pid, process start time)
    makes a second process wait for the first instead of building the same thing; a lock whose
    builder is gone (dead, pid reused, or never recorded) is removed. `log` gets one line when
    this call has to wait (default: stderr). Returns True if this call built it.
    """

    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {final.parent}: {exc.strerror or exc}") from None
    lock = final.parent / f".{final.name}.lock"
    mine = json.dumps(lock_owner())
    told = False
    while True:
        if final.exists():
            return False
        if _try_create_lock(lock, mine):
            break
        state, who, seen = lock_state(lock)
        if state == "gone" or (state == "stale" and _break_stale(lock, seen)):
            continue
        if not told:
            told = True
            (log or _stderr)(
                f"waiting for {final.name}: another privbench build holds {lock} ({who}); "
                f"if that build is dead, delete {lock} and this one goes on"
            )
        time.sleep(poll)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        if final.exists():
            return False
        for old in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)  # left by an interrupted build
        tmp.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
        build(tmp)
        os.rename(tmp, final)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read(lock) == mine:  # never remove a lock that is not ours
            lock.unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None
