"""``TrainingCache``: find, build or reuse the cache of a selection, and read rows from it.

:meth:`TrainingCache.ensure` is the one call a run makes: it computes the key, reuses the
folder of that key when its manifest and file sizes check out, and otherwise builds it under
the key's lock (so one process of a node builds while the others wait), after checking that
the disk can hold it. The returned object maps the files lazily in whichever process reads
(a DataLoader worker, forked or spawned, maps its own view of the same page-cache pages).
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from scimtrain.cache import gather
from scimtrain.cache.build import CHUNK_CELLS, build_arrays, estimate_build
from scimtrain.cache.key import cache_key, normalise_genes
from scimtrain.cache.layout import (
    BUILDING_PREFIX,
    FORMAT_VERSION,
    LAST_USED,
    NORMALISATION,
    REMOVING_PREFIX,
    CacheError,
    array_file,
    problem,
    read_manifest,
    resolve_cache_dir,
    write_manifest,
)
from scimtrain.cache.lock import build_lock, is_locked
from scimtrain.source import CellSource

SPACE_MARGIN = 1.15  # free space asked beyond the estimate: sampling error, file-system slack


class TrainingCache:
    """One complete cache folder, opened for reading (see :mod:`scimtrain.cache.layout`).

    Use :meth:`ensure` (build or reuse) or :meth:`open` (an existing folder). Rows are the
    selected cells in the order given at build time; columns the model's genes; values are
    already log-normalised float32, exactly as the TileDB stream computes them.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._pid: int | None = None
        self._arrays: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ finding and building

    @classmethod
    def open(cls, path: str | os.PathLike, checksums: bool = True) -> TrainingCache:
        """The cache in ``path``; raises :class:`CacheError` naming what is wrong with it."""
        path = Path(path)
        found = problem(path, key=path.name if not path.name.startswith(".") else None,
                        checksums=checksums)
        if found is not None:
            raise CacheError(f"{path} is not a usable training cache: {found}")
        return cls(path, read_manifest(path))

    @classmethod
    def ensure(cls, store: CellSource, cells: np.ndarray,
               gene_indices: np.ndarray | None = None,
               cache_dir: str | os.PathLike | None = None, target_sum: float = 1e4,
               workers: int | None = None, progress: bool = True, *,
               chunk_cells: int = CHUNK_CELLS, mp_context: str | None = None,
               announce: Callable[[str], None] = print) -> TrainingCache:
        """The cache of ``cells`` × ``gene_indices`` of ``store``: reused, or built now.

        Args:
            store: the store the cache is made from.
            cells: int64 store cell indices in cache-row order (train split, then validation).
            gene_indices: store columns in model order (``Selection.gene_indices``); None for
                every store gene in store order.
            cache_dir: the folder holding caches; None is :func:`default_cache_dir`.
            target_sum: the normalisation's target sum (``StreamConfig.target_sum``).
            workers: processes reading the store while building; None: one per usable core.
            progress: show a progress bar while building.
            chunk_cells: cache rows each worker reads at once.
            mp_context: multiprocessing start method of the build workers (None: default).
            announce: where the one-line messages go (the estimate; waiting for another
                builder).

        Returns:
            The opened cache. Safe to call from several processes at once: one builds, the
            others wait for it and reuse its result.

        Raises:
            CacheError: the disk cannot hold the cache (the message gives needed and free
                bytes), or the cache folder cannot be written.
        """
        cells = _check_cells(cells, store.n_cells)
        genes = normalise_genes(gene_indices, store.n_genes)
        n_genes = store.n_genes if genes is None else genes.size
        root = resolve_cache_dir(cache_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the training cache folder {root}: {exc}; pass "
                             "another cache_dir (--cache_dir)") from exc
        if not os.access(root, os.W_OK | os.X_OK):
            raise CacheError(f"the training cache folder {root} is not writable; pass another "
                             "cache_dir (--cache_dir)")
        identity = store.identity()  # lists fragments: I/O, done once
        key = cache_key(identity, cells, genes, store.n_genes, target_sum)
        final = root / key
        if final.is_dir() and problem(final, key) is None:
            return cls._use(final)
        with build_lock(root, key, announce):
            if final.exists():  # built by whoever held the lock before us, or damaged
                found = problem(final, key)
                if found is None:
                    return cls._use(final)
                warnings.warn(f"training cache {final} is damaged ({found}); rebuilding it",
                              stacklevel=2)
                _remove(final)
            remove_stale_builds(root, key)
            workers = default_workers() if workers is None else max(1, int(workers))
            size, seconds = estimate_build(store, cells, genes, n_genes, workers)
            _check_space(root, size)
            announce(f"training cache: building {cells.size:,} cells x {n_genes:,} genes into "
                     f"{final}: about {_bytes(size)}, ~{_duration(seconds)} with {workers} "
                     f"process{'es' if workers > 1 else ''}")
            temp = root / f"{BUILDING_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
            temp.mkdir()
            try:
                arrays = build_arrays(store, cells, genes, target_sum, temp, n_genes=n_genes,
                                      workers=workers, chunk_cells=chunk_cells,
                                      progress=progress, mp_context=mp_context)
                write_manifest(temp, {
                    "format_version": FORMAT_VERSION, "key": key,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "store": identity["uri"], "target_sum": float(target_sum),
                    "normalisation": NORMALISATION, **arrays})
                _publish(temp, final, key)
            except OSError as exc:
                _remove(temp)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheError(f"the disk of {root} filled up while building the "
                                     f"training cache ({_free(root)} free now): {exc}") from exc
                raise
            except BaseException:
                _remove(temp)
                raise
        return cls._use(final)

    @staticmethod
    def estimate(store: CellSource, cells: np.ndarray, gene_indices: np.ndarray | None,
                 workers: int | None = None) -> tuple[int, float]:
        """``(bytes needed, seconds to build)`` for :meth:`ensure` with these arguments,
        from a read of a few hundred cells."""
        cells = _check_cells(cells, store.n_cells)
        genes = normalise_genes(gene_indices, store.n_genes)
        n_genes = store.n_genes if genes is None else genes.size
        workers = default_workers() if workers is None else max(1, int(workers))
        return estimate_build(store, cells, genes, n_genes, workers)

    @classmethod
    def _use(cls, folder: Path) -> TrainingCache:
        cache = cls(folder, read_manifest(folder))
        cache.touch()
        return cache

    def touch(self) -> None:
        """Record now as the cache's last use (what ``list_caches`` shows)."""
        try:
            (self.path / LAST_USED).touch()
        except OSError:  # a read-only cache folder is still usable
            pass

    # ------------------------------------------------------------------ facts

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def n_genes(self) -> int:
        return int(self.manifest["n_genes"])

    @property
    def nnz(self) -> int:
        return int(self.manifest["nnz"])

    @property
    def target_sum(self) -> float:
        return float(self.manifest["target_sum"])

    @property
    def cell_index(self) -> np.ndarray:
        """The store cell of each row (int64, read-only, mapped)."""
        return self._array("cells")

    @property
    def gene_indices(self) -> np.ndarray:
        """The store column of each cache column (int64, read-only, mapped)."""
        return self._array("genes")

    def __repr__(self) -> str:
        return f"TrainingCache({str(self.path)!r}, rows={self.n_rows}, genes={self.n_genes})"

    # ------------------------------------------------------------------ reading

    def rows(self, positions: np.ndarray) -> sp.csr_matrix:
        """Rows ``positions`` as a float32 CSR matrix (log-normalised values)."""
        indptr, indices, values = self.gather_csr(positions)
        return sp.csr_matrix((values, indices, indptr), shape=(indptr.size - 1, self.n_genes))

    def gather_csr(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``positions`` as CSR arrays ``(indptr int64, indices int64, values float32)``."""
        rows = gather.check_rows(positions, self.n_rows)
        return gather.gather_csr(self._array("indptr"), self._array("indices"),
                                 self._array("values"), rows)

    def row_pointers(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(checked rows, row pointers)`` of rows ``positions`` gathered into a CSR batch:
        the first step of :meth:`fill_csr`, which needs the non-zero count to size its
        output."""
        rows = gather.check_rows(positions, self.n_rows)
        return rows, gather.row_pointers(self._array("indptr"), rows)

    def fill_csr(self, rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                 values: np.ndarray) -> None:
        """Copy the rows of :meth:`row_pointers` into ``indices`` (int64) and ``values``
        (float32), each holding ``indptr[-1]`` entries."""
        gather.copy_rows(self._array("indptr"), self._array("indices"), self._array("values"),
                         rows, indptr, indices, values)

    def gather_dense(self, positions: np.ndarray, out: np.ndarray,
                     clear: bool = False) -> np.ndarray:
        """Write rows ``positions`` into ``out`` (``(len(positions), n_genes)`` float32,
        C-contiguous). Only non-zeros are written: ``out`` must be zero-filled, or ``clear``
        zeroes it row by row first. Returns ``out``."""
        rows = gather.check_rows(positions, self.n_rows)
        if out.shape != (rows.size, self.n_genes) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(rows.size, self.n_genes)}, got "
                             f"{out.dtype} {out.shape}")
        return gather.scatter_dense(self._array("indptr"), self._array("indices"),
                                    self._array("values"), rows, out, clear)

    def warm_up(self) -> None:
        """Compile (or load from numba's disk cache) the gathers for this cache's dtypes, here:
        forked DataLoader workers inherit them instead of each compiling on its first batch."""
        if self.n_rows:
            rows, indptr = self.row_pointers(np.zeros(1, dtype=np.int64))
            self.fill_csr(rows, indptr, np.empty(int(indptr[-1]), np.int64),
                          np.empty(int(indptr[-1]), np.float32))
            self.gather_dense(rows, np.zeros((1, self.n_genes), np.float32), clear=True)

    def _array(self, name: str) -> np.ndarray:
        """One mapped array file, mapped on first use in the calling process."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        array = self._arrays.get(name)
        if array is None:
            array = _map(array_file(self.path, name), np.dtype(self.manifest["dtypes"][name]),
                         random_access=name in ("values", "indices"))
            self._arrays[name] = array
        return array

    def __getstate__(self) -> dict:
        # Maps stay in their process; the receiving process maps the files itself.
        return {"path": self.path, "manifest": self.manifest, "_pid": None, "_arrays": {}}


def default_workers() -> int:
    """Usable cores of this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def remove_stale_builds(root: Path, own_key: str | None = None) -> list[Path]:
    """Remove the ``.building-*`` folders whose builder is gone (nobody holds their key's
    lock; those of ``own_key``, whose lock the caller holds, in any case) and half-removed
    ``.removing-*`` folders. Returns the removed folders."""
    removed = []
    for folder in root.glob(f"{BUILDING_PREFIX}*"):
        folder_key = folder.name[len(BUILDING_PREFIX):].split("-", 1)[0]
        if folder_key == own_key or not is_locked(root, folder_key):
            _remove(folder)
            removed.append(folder)
    for folder in root.glob(f"{REMOVING_PREFIX}*"):
        _remove(folder)
        removed.append(folder)
    return removed


def _map(path: Path, dtype: np.dtype, random_access: bool) -> np.ndarray:
    """A read-only array over the file ``path`` (shared page-cache pages, no copy)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.empty(0, dtype=dtype)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random_access and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Rows are read a few kilobytes at a time in random order: read-ahead from disk
        # would fetch neighbours that are not wanted (no effect once in the page cache).
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype)


def _check_cells(cells: np.ndarray, n_cells: int) -> np.ndarray:
    cells = np.ascontiguousarray(cells, dtype=np.int64).ravel()
    if cells.size and (cells.min() < 0 or cells.max() >= n_cells):
        raise ValueError(f"cells must be store cell indices in 0..{n_cells - 1}; got "
                         f"{cells.min()}..{cells.max()}")
    return cells


def _check_space(root: Path, size: int) -> None:
    free = shutil.disk_usage(root).free
    needed = int(size * SPACE_MARGIN)
    if free < needed:
        raise CacheError(
            f"the training cache needs about {_bytes(needed)} in {root} but only "
            f"{_bytes(free)} are free: free some space, choose a larger disk with "
            "--cache_dir, or stream from the store with --cache off")


def _publish(temp: Path, final: Path, key: str) -> None:
    """Rename the finished ``temp`` to ``final``; if a complete one appeared meanwhile (a
    concurrent builder that bypassed the lock), keep that one."""
    try:
        os.rename(temp, final)
    except OSError:
        if final.exists() and problem(final, key, checksums=False) is None:
            _remove(temp)
            return
        raise


def _remove(folder: Path) -> None:
    """Remove a cache folder, first renaming it so a half-removed folder never looks whole."""
    if not folder.exists():
        return
    doomed = folder
    if not folder.name.startswith("."):
        doomed = folder.with_name(f"{REMOVING_PREFIX}{folder.name}-{secrets.token_hex(4)}")
        try:
            os.rename(folder, doomed)
        except OSError:
            doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def _free(root: Path) -> str:
    try:
        return _bytes(shutil.disk_usage(root).free)
    except OSError:
        return "?"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

