"""What a training cache is on disk: one folder per key, raw binary arrays and a manifest.

::

    <cache_dir>/<key>/
        values.bin    float32, nnz        log1p(counts / row_sum * target_sum), model gene order
        indices.bin   uint8/16/32, nnz    column (model gene) of each value, the smallest type
        indptr.bin    int64, n_rows + 1   row r is values[indptr[r]:indptr[r + 1]]
        cells.bin     int64, n_rows       the store cell of each row (train cells, then val)
        genes.bin     int64, n_genes      the store column of each model gene
        manifest.json written last: format version, key inputs, dtypes, sizes, checksums
        last_used     its modification time is the last time a run used the cache

Why log-normalised float32 values and not raw counts (which would be smaller: uint16 counts,
4 bytes per non-zero instead of 6): measured on this project's 2-core VM, 40,000 x 28,000
synthetic store (~2,300 non-zeros per cell), one thread, batches of 1,000 random rows, dense
into a reused buffer: 48,000-89,000 cells/s with the values stored normalised, 12,000-35,000
when each batch normalises raw counts (``scimtrain.stream.lognormalize``, then scatter); CSR
38,000-50,000 vs 14,000-20,000. Stored values are that very function's output, computed once
at build time, so batches stay bit-identical to the TileDB path's.

A folder is built as ``<cache_dir>/.building-<key>-<pid>-<random>`` and renamed to
``<cache_dir>/<key>`` once complete, so a folder named by its key is always whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
NORMALISATION = "log1p(counts / row_sum * target_sum) float32, scimtrain.stream.lognormalize"
MANIFEST = "manifest.json"
LAST_USED = "last_used"
BUILDING_PREFIX = ".building-"
REMOVING_PREFIX = ".removing-"
LOCKS = ".locks"
# Each array: file name and the manifest entry saying its length ("nnz", "n_rows + 1", ...).
ARRAYS = ("values", "indices", "indptr", "cells", "genes")
# Checksummed on open: small next to the values (8 bytes a row), and what a reader trusts most.
CHECKSUMMED = ("indptr", "cells", "genes")


class CacheError(OSError):
    """The training cache cannot be built or used here (e.g. the disk is too small); the
    message says what is needed. Callers may fall back to reading the store directly."""


def default_cache_dir() -> Path:
    """``$SCIMTRAIN_CACHE/training-cache`` if set, else ``~/.cache/scimtrain/training-cache``
    (``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set)."""
    root = os.environ.get("SCIMTRAIN_CACHE")
    if root:
        return Path(root).expanduser() / "training-cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "scimtrain" / "training-cache"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` as an absolute path, :func:`default_cache_dir` when None."""
    return Path(cache_dir).expanduser().resolve() if cache_dir is not None \
        else default_cache_dir().resolve()


def index_dtype(n_genes: int) -> np.dtype:
    """The smallest unsigned integer type holding every column index below ``n_genes``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_genes <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise CacheError(f"{n_genes} genes do not fit uint32 column indices")


def array_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.bin"


def expected_lengths(manifest: dict) -> dict[str, int]:
    """Elements of each array file, as the manifest's counts say."""
    n_rows, nnz = manifest["n_rows"], manifest["nnz"]
    return {"values": nnz, "indices": nnz, "indptr": n_rows + 1, "cells": n_rows,
            "genes": manifest["n_genes"]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Fill in sizes and checksums of the array files of ``folder`` and write the manifest."""
    manifest = dict(manifest)
    manifest["files"] = {name: array_file(folder, name).stat().st_size for name in ARRAYS}
    manifest["sha256"] = {name: file_sha256(array_file(folder, name)) for name in CHECKSUMMED}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``; None when it is missing or unreadable."""
    try:
        with open(folder / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def problem(folder: Path, key: str | None = None, checksums: bool = True) -> str | None:
    """What is wrong with the cache in ``folder`` (None: nothing found).

    Checks the manifest (readable, this format version, ``key`` when given), that every array
    file has the size the manifest's counts and dtypes imply, and (``checksums``) the sha256 of
    the small arrays. Values are not re-read: a wrong byte inside them goes unseen.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder / MANIFEST} is missing or unreadable"
    try:
        if manifest["format_version"] != FORMAT_VERSION:
            return (f"format version {manifest['format_version']} is not this scimtrain's "
                    f"{FORMAT_VERSION}")
        if key is not None and manifest["key"] != key:
            return f"its manifest holds key {manifest['key']}, not the folder's {key}"
        lengths = expected_lengths(manifest)
        for name in ARRAYS:
            path = array_file(folder, name)
            want = lengths[name] * np.dtype(manifest["dtypes"][name]).itemsize
            if want != manifest["files"][name]:
                return f"the manifest's sizes disagree for {path.name}"
            size = path.stat().st_size if path.exists() else None
            if size != want:
                return f"{path.name} has {size} bytes, the manifest says {want}"
        if checksums:
            for name in CHECKSUMMED:
                if file_sha256(array_file(folder, name)) != manifest["sha256"][name]:
                    return f"{name}.bin does not match its checksum"
    except (KeyError, TypeError, ValueError) as exc:
        return f"its manifest lacks or garbles {exc}"
    return None
