"""runio: the directory lock between real processes, stale-lock takeover, unwritable directories,
atomic writes, and reading a log whose last line was torn by a kill."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecliptica.runio import (
    LOCK_NAME,
    DirLock,
    DirLockedError,
    RunDirError,
    atomic_dir,
    atomic_write_text,
    read_jsonl_tolerant,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that takes `directory` and keeps it until killed."""
    code = (
        "import sys, time; from ecliptica.runio import DirLock; DirLock(sys.argv[1], 'train').acquire(); "
        "print('held', flush=True); time.sleep(300)"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_and_told_who_holds_it(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(DirLockedError, match=rf"in use by process {holder.pid} on .*\(train: "):
            DirLock(tmp_path / "run", "train").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    holder = hold_lock(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup: its lock file stays behind
    holder.wait()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid
    with pytest.warns(RuntimeWarning, match=rf"taking over the lock left by process {holder.pid}"):
        lock = DirLock(tmp_path / "run", "train").acquire()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process_and_free_after_release(tmp_path):
    with DirLock(tmp_path, "study"):
        with DirLock(tmp_path, "study"):  # e.g. run() -> report()
            pass
        assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
    holder = hold_lock(tmp_path)  # another process can now take it
    holder.kill()
    holder.wait()


def test_a_file_where_the_directory_should_be_is_named(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(RunDirError, match=r"run: cannot write here"):
        DirLock(tmp_path / "run", "train").acquire()


@pytest.mark.parametrize(
    "err, reason", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only"), (errno.ENOSPC, "No space left")]
)
def test_unwritable_or_full_directory_is_named(tmp_path, monkeypatch, err, reason):
    # Tests run as root here, so a chmod'ed directory would still be writable: the OS error is injected
    # where the lock file is written, as a read-only mount or a full disk would raise it.
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "pwrite", fail)
    with pytest.raises(RunDirError, match=rf"{tmp_path.name}.*cannot write here \({reason}"):
        DirLock(tmp_path, "train").acquire()


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails inside the write
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    atomic_write_text(path, "new\r\n")
    assert path.read_bytes() == b"new\r\n"


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed mid-save")
    assert (target / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # moving the new folder into place fails (e.g. the directory cannot grow)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_torn_last_line_is_dropped_but_a_broken_middle_line_is_an_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match="line 3 is incomplete"):
        assert read_jsonl_tolerant(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_jsonl_tolerant(log)


def test_waiter_never_shares_a_lock_with_a_later_process(tmp_path):
    """Lock, release (which unlinks the file) and re-lock from two processes many times: at no moment do
    both hold it. Each holder appends its pid twice around a short sleep; interleaving would show."""
    log = tmp_path / "log"
    code = (
        "import sys, time, os; from ecliptica.runio import DirLock, DirLockedError\n"
        "n = 0\n"
        "while n < 15:\n"
        "    try:\n"
        "        l = DirLock(sys.argv[1], 't').acquire()\n"
        "    except DirLockedError:\n"
        "        continue\n"
        "    f = open(sys.argv[2], 'a'); f.write(f'{os.getpid()} '); f.flush(); time.sleep(0.005)\n"
        "    f.write(f'{os.getpid()}\\n'); f.close(); l.release(); n += 1\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d"), str(log)], env=env) for _ in range(2)]
    deadline = time.time() + 120
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))
        assert p.returncode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 30
    assert all(a == b for a, b in (ln.split() for ln in lines))


def test_eval_refuses_an_out_dir_another_process_holds(tmp_path, capsys):
    from ecliptica.cli import main

    root = Path(__file__).resolve().parents[1]
    holder = hold_lock(tmp_path / "eval")
    try:  # refused before any model or data loads
        assert main(["eval", str(root / "configs" / "eval_demo.yaml"), "--set", f"out_dir={tmp_path / 'eval'}"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by process {holder.pid}" in capsys.readouterr().err
