"""One builder per cache key: an exclusive ``flock`` on ``<cache_dir>/.locks/<key>.lock``.

The kernel releases a ``flock`` when its holder dies (kill -9 included), so a lock is never
left behind by a dead builder; whoever takes it next knows that any ``.building-<key>-*``
folder is stale. Processes that find the lock taken print one line and wait (DDP ranks of a
node, or several runs on one machine, sharing one build).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from scimtrain.cache.layout import LOCKS

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, concurrent builders may race
    fcntl = None

# File descriptors of held build locks: build workers close them, so that a worker outliving
# a killed builder does not keep the lock (a flock lives as long as any copy of its descriptor).
HELD_LOCK_FDS: set[int] = set()


def lock_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / LOCKS / f"{key}.lock"


@contextlib.contextmanager
def build_lock(cache_dir: Path, key: str,
               announce: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the build lock of ``key`` for the ``with`` block; if another process holds it,
    ``announce`` one line saying so, then wait for it."""
    path = lock_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                announce(f"training cache: process {holder} is building {cache_dir / key}; "
                         "waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        HELD_LOCK_FDS.add(fd)
        yield
    finally:
        HELD_LOCK_FDS.discard(fd)
        os.close(fd)  # releases the lock


def is_locked(cache_dir: Path, key: str) -> bool:
    """Whether some process (this one included) holds the build lock of ``key`` now."""
    path = lock_path(cache_dir, key)
    if fcntl is None or not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
