"""Write aside, then rename: a file or folder is either absent or complete, never half-written.

Every durable output of scimtrain (checkpoints, model folders, the best weights, the demo
store, training caches, built stores) goes through :func:`written_aside`: it is filled under a
hidden temporary sibling name and renamed into place only when complete, so whatever a kill
leaves behind is a ``.tmp-*`` name that nothing reads and the next write removes.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_sibling(final: str | os.PathLike, tag: str = "") -> Path:
    """The hidden name ``final`` is written under: ``.tmp-NAME`` (``.tmp-NAME.TAG``)."""
    final = Path(final)
    return final.parent / f".tmp-{final.name}{'.' + tag if tag else ''}"


def remove(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def written_aside(final: str | os.PathLike, *, folder: bool = False, replace: bool = False,
                  tag: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path to fill; rename it to ``final`` when the block ends.

    Args:
        final: where the result goes.
        folder: the temporary path is created as an empty folder (else nothing is created).
        replace: an existing ``final`` is replaced (else ``FileExistsError`` up front).
        tag: distinguishes concurrent writers of the same name (e.g. a process id).

    On an exception inside the block the temporary path is removed and ``final`` is left as
    it was. Files are fsynced by the writer (:func:`fsync_file`); the parent folder is fsynced
    after the rename so that the new name survives a crash.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = temporary_sibling(final, tag)
    remove(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    try:
        if replace and final.is_dir() and tmp.is_dir():
            remove(final)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, final)  # a folder another writer finished first: OSError
    except OSError:
        remove(tmp)
        raise
    fsync_dir(final.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
