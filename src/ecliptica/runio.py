"""Run-directory I/O that cannot corrupt a run: an exclusive directory lock and atomic writes.

`DirLock` makes a directory single-writer. The lock is an `flock` on `<dir>/.ecliptica.lock`, so the
kernel drops it when its process dies, however it dies; the file also records who holds it (pid,
host, command, start time) so a second process can name the holder. A lock file left by a dead
process is detected (the flock is free) and taken over with a warning.

`atomic_write_text` / `atomic_dir` write to a temporary name and rename: a reader (or a resumed run)
sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

LOCK_NAME = ".ecliptica.lock"


class DirLockedError(RuntimeError):
    """Another live process holds the directory."""


class RunDirError(RuntimeError):
    """The directory cannot be used (not writable, a file, disk full, ...)."""


def unwritable(path: Path, e: OSError) -> RunDirError:
    reason = e.strerror or str(e)
    return RunDirError(f"{path}: cannot write here ({reason}); choose another directory or fix its permissions/space")


NO_SPACE = "no space left on device"


def write_failure_reason(e: BaseException) -> str:
    """Why a write failed, in words. safetensors reports a full disk as its own SafetensorError (not an OSError)
    holding the Rust I/O error, e.g. `IoError(Os { code: 28, kind: StorageFull, ... })`."""
    if isinstance(e, OSError):
        return NO_SPACE if e.errno == errno.ENOSPC else (e.strerror or str(e))
    text = str(e)
    if "StorageFull" in text or "No space left" in text or "code: 28," in text:
        return NO_SPACE
    return text


@contextmanager
def write_errors(path: str | Path, what: str, kept: str | Callable[[], str] = ""):
    """`with write_errors(p, "the final adapter", "the previous one is kept"):` a failed write under it (a full
    disk, a read-only or vanished directory) becomes one RunDirError naming `p`, what was being written and why,
    plus what survives (`kept`; a callable is asked only on failure), instead of a traceback or an OSError that
    names no file."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        kept = kept() if callable(kept) else kept
        tail = f"; {kept}" if kept else ""
        raise RunDirError(f"{path}: cannot write {what}: {write_failure_reason(e)}{tail}") from e


def check_free_space(directory: str | Path, needed: int, detail: str) -> None:
    """Refuse to start work that will need about `needed` bytes under `directory` when its disk has less free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RunDirError(
            f"{directory}: not enough free disk space: {format_bytes(free)} free, about "
            f"{format_bytes(needed)} needed ({detail}); free some space or choose another directory"
        )


def format_bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


_held: dict[str, list] = {}  # resolved dir -> [fd, depth]: the lock is re-entrant within one process


class DirLock:
    """`with DirLock(dir, "train"):` holds `dir` for this process; a second process gets DirLockedError.

    Acquiring also proves the directory is writable (it creates and writes the lock file), so callers
    take it before any expensive work such as loading a model.
    """

    def __init__(self, directory: str | Path, purpose: str):
        self.dir = Path(directory)
        self.purpose = purpose
        self.path = self.dir / LOCK_NAME

    def acquire(self) -> DirLock:
        key = str(self.dir.resolve())
        if key in _held:
            _held[key][1] += 1
            return self
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = self._lock_file()
        except OSError as e:
            raise unwritable(self.dir, e) from None
        _held[key] = [fd, 1]
        return self

    def _lock_file(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_holder(fd))
                os.close(fd)
                raise DirLockedError(
                    f"{self.dir} is in use by {holder}; wait for it to finish or stop that "
                    f"process (lock file {self.path})"
                ) from None
            try:  # the holder we waited on may have unlinked the file: then lock the new one instead
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous.get("pid") not in (None, os.getpid()):
                warnings.warn(
                    f"{self.dir}: taking over the lock left by {_describe(previous)}, which is no longer running",
                    RuntimeWarning,
                    stacklevel=4,
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "purpose": self.purpose,
                "command": " ".join(sys.argv)[:300],
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                os.fsync(fd)
            except OSError:
                os.close(fd)
                raise
            return fd

    def release(self) -> None:
        key = str(self.dir.resolve())
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        try:
            os.unlink(self.path)  # unlinked while still locked; a waiter re-checks the inode
        except OSError:
            pass
        os.close(entry[0])

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    what = f"process {info['pid']} on {info.get('host', '?')}"
    if info.get("purpose"):
        what += f" ({info['purpose']}: {info.get('command', '')}, since {info.get('started', '?')})"
    return what


# ------------------------------------------------------------------ names that become paths


def check_path_component(name: str, key: str) -> str:
    """`name` as one directory entry: a config value that is joined onto a directory (an arm name, an
    evaluation set's name) must not climb out of it (`..`, an absolute path), nest (`/`, `\\`) or be
    unusable (empty, `.`, NUL). The error names the config `key`."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif "\0" in name:
        problem = "contains a NUL character"
    elif name in (".", ".."):
        problem = "names the directory itself or its parent, not an entry of its own"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator ('/' or '\\')"
    if problem:
        raise ValueError(
            f"{key}: {name!r} {problem}; it becomes a directory name, so use a single plain name such as 'dpo_grit'"
        )
    return name


# ------------------------------------------------------------------ atomic writes


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:  # the text exactly as given
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path):
    """`with atomic_dir(p) as tmp:` write a directory's files into `tmp`; on success it replaces `p`.

    A crash leaves either the previous complete directory or none, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():  # put the previous version back rather than leave none
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl_tolerant(path: str | Path) -> list[dict]:
    """Rows of a JSONL log. A torn last line (the writer was killed mid-write) is dropped with a
    warning; a broken line elsewhere is an error naming the file and line."""
    path = Path(path)
    lines = path.read_text().split("\n")
    rows = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == last:
                warnings.warn(
                    f"{path}: line {i + 1} is incomplete (an interrupted write); ignoring it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """One JSON object per line, written atomically (its folder is created); text stays readable (UTF-8)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
