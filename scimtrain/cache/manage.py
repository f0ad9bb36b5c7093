"""List and remove the training caches of a cache folder (``bin/scimtrain_cache.py``)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from scimtrain.cache.layout import (
    BUILDING_PREFIX,
    LAST_USED,
    problem,
    read_manifest,
    resolve_cache_dir,
)
from scimtrain.cache.lock import is_locked
from scimtrain.cache.training_cache import _remove, remove_stale_builds


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The caches in ``cache_dir`` (default: :func:`default_cache_dir`), most recently used
    first.

    Returns one dict per cache folder: ``path`` (Path), ``key``, ``size`` (bytes on disk),
    ``created`` and ``last_used`` (ISO times, UTC), ``store``, ``n_rows``, ``n_genes`` and
    ``status``: ``"ok"``, ``"building"`` (a build in progress), ``"stale build"`` (left by a
    builder that died) or ``"damaged: ..."``.
    """
    root = resolve_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        if folder.name.startswith(BUILDING_PREFIX):
            key = folder.name[len(BUILDING_PREFIX):].split("-", 1)[0]
            status = "building" if is_locked(root, key) else "stale build"
            found.append(_entry(folder, key, {}, status))
        elif not folder.name.startswith("."):
            manifest = read_manifest(folder) or {}
            damage = problem(folder, key=folder.name, checksums=False)
            found.append(_entry(folder, folder.name, manifest,
                                "ok" if damage is None else f"damaged: {damage}"))
    return sorted(found, key=lambda entry: entry["last_used"] or "", reverse=True)


def remove_caches(cache_dir: str | os.PathLike | None = None,
                  older_than_days: float | None = None, key: str | None = None) -> list[Path]:
    """Remove caches of ``cache_dir``; returns the folders removed.

    Args:
        cache_dir: the cache folder (default: :func:`default_cache_dir`).
        older_than_days: only caches last used more than this many days ago.
        key: only the cache whose key starts with this (at least 6 characters).

    With neither filter, every cache goes. A cache whose build is in progress is kept, and
    builds left behind by dead builders always go. Do not remove the cache of a running
    training: DataLoader workers it starts later would not find the files.
    """
    if key is not None and len(key) < 6:
        raise ValueError(f"key {key!r} is too short to pick one cache; give at least 6 "
                         "characters of it (see the list)")
    root = resolve_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    removed = remove_stale_builds(root)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        if key is not None and not folder.name.startswith(key):
            continue
        if cutoff is not None and _last_used(folder) > cutoff:
            continue
        if is_locked(root, folder.name):  # being rebuilt right now
            continue
        _remove(folder)
        removed.append(folder)
    return removed


def _entry(folder: Path, key: str, manifest: dict, status: str) -> dict:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    used = _last_used(folder) if status == "ok" or status.startswith("damaged") else None
    return {"path": folder, "key": key, "size": size, "created": manifest.get("created"),
            "last_used": None if used is None else _iso(used), "store": manifest.get("store"),
            "n_rows": manifest.get("n_rows"), "n_genes": manifest.get("n_genes"),
            "status": status}


def _last_used(folder: Path) -> float:
    """Seconds since the epoch of the last use (the manifest's time if never used)."""
    for name in (LAST_USED, "manifest.json"):
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            continue
    return folder.stat().st_mtime


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
