"""Files on disk: modes that follow the umask, and the build-once lock."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from privbench.util.storage import (
    atomic_write_text,
    build_dir_once,
    current_umask,
    process_start_time,
)

# ---------------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask):
    umask(0o022)
    assert current_umask() == 0o022 and current_umask() == 0o022  # reading it leaves it alone
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    umask(0o027)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640

    def build(tmp):
        atomic_write_text(tmp / "g", "1")

    umask(0o022)
    build_dir_once(tmp_path / "cell", build)
    assert (tmp_path / "cell").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "cell" / "g").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------- locks


def _lock(final):
    return final.parent / f".{final.name}.lock"


def _make(tmp):
    (tmp / "done").write_text("ok")


def test_lock_records_host_pid_and_start(tmp_path):
    final = tmp_path / "cell"
    seen = {}

    def build(tmp):
        seen.update(json.loads(_lock(final).read_text()))
        _make(tmp)

    assert build_dir_once(final, build)
    assert seen["host"] == socket.gethostname() and seen["pid"] == os.getpid()
    assert seen["start"] == process_start_time(os.getpid()) and isinstance(seen["start"], int)
    assert not _lock(final).exists()


def test_empty_lock_left_by_a_kill_is_stale(tmp_path):
    final = tmp_path / "cell"
    _lock(final).write_text("")
    old = time.time() - 60
    os.utime(_lock(final), (old, old))
    t0 = time.perf_counter()
    assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)
    assert time.perf_counter() - t0 < 5 and (final / "done").is_file()


def test_dead_and_reused_pids_do_not_keep_a_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    cases = [
        {"host": host, "pid": proc.pid, "start": 1},  # its process is gone
        # Our own pid, alive, but started at another time: the pid was reused.
        {"host": host, "pid": os.getpid(), "start": process_start_time(os.getpid()) + 1},
    ]
    for i, owner in enumerate(cases):
        final = tmp_path / f"cell{i}"
        _lock(final).write_text(json.dumps(owner))
        assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)
    final = tmp_path / "legacy"
    _lock(final).write_text(str(proc.pid))  # the bare-pid format of earlier versions
    assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)


@pytest.mark.parametrize("remote", [False, True])
def test_live_lock_is_honoured_and_the_wait_message_says_how_to_remove_it(tmp_path, remote):
    final = tmp_path / "cell"
    owner = {
        "host": "elsewhere" if remote else socket.gethostname(),
        "pid": os.getpid(),
        "start": process_start_time(os.getpid()),
    }
    _lock(final).write_text(json.dumps(owner))
    messages = []
    worker = threading.Thread(target=build_dir_once, args=(final, _make), kwargs={"poll": 0.02, "log": messages.append})
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not final.exists()  # waits for the holder
    _lock(final).unlink()  # what the message tells the user to do
    worker.join(10)
    assert (final / "done").is_file()
    assert len(messages) == 1  # said once, not every poll
    assert str(_lock(final)) in messages[0] and f"delete {_lock(final)}" in messages[0]
    assert ("another machine" in messages[0]) == remote
