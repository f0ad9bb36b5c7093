"""One run per run folder: a lock that names its holder and dies with it.

Two runs with the same name would write one log folder and race on the same checkpoint names.
A run holds an exclusive ``fcntl`` lock on ``RUN_DIR/.lock`` for as long as it trains; the
file says which process (pid, host, start time) holds it. The operating system releases the
lock when that process ends however it ends (``kill -9`` included), so a lock left by a dead
run is simply taken over; a second live run is refused with a message naming the first.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: dict[Path, tuple[int, int]] = {}  # run folder -> (file descriptor, holds), this process


class RunLockedError(RuntimeError):
    """Another live run holds the run folder; the message names it."""


def acquire(run_dir: str | os.PathLike) -> None:
    """Take the lock of ``run_dir`` (created if needed); re-entrant within a process.

    Raises:
        RunLockedError: another process holds it.
    """
    folder = Path(run_dir).resolve()
    if folder in _HELD:
        fd, holds = _HELD[folder]
        _HELD[folder] = (fd, holds + 1)
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(path)
        os.close(fd)
        raise RunLockedError(
            f"another run is training in {folder} ({holder}); wait for it to finish, stop it, "
            "or give this run another --suffix") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
    _HELD[folder] = (fd, 1)


def release(run_dir: str | os.PathLike) -> None:
    """Give back one hold of ``run_dir``'s lock; the last one unlocks it."""
    folder = Path(run_dir).resolve()
    if folder not in _HELD:
        return
    fd, holds = _HELD.pop(folder)
    if holds > 1:
        _HELD[folder] = (fd, holds - 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return (f"process {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")
