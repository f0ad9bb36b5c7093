"""Build a cache folder from the store: chunks of cache rows read in parallel, then appended.

Each chunk is a run of consecutive cache rows (store cells ascending within each split, so one
chunk is one query of a few long cell ranges: the store's sequential fast path). A worker
process reads its chunk exactly as the stream reads a pool (``CellSource.read_rows``, then
the model's gene subset, then :func:`scimtrain.stream.lognormalize`: the same functions, so
the same bits) and hands the chunk's values and column indices to the parent, which appends
them in chunk order to the cache files while later chunks are still being read, and writes
the row pointers at the end. (Part files appended by the parent cost a second write of every
byte: ~25% more build time, measured.)
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from scimtrain.cache.layout import array_file, index_dtype
from scimtrain.cache.lock import HELD_LOCK_FDS
from scimtrain.source import CellSource

CHUNK_CELLS = 4096  # cells a worker reads at once: ~50 MB of TileDB results at 2,000 nnz/cell
ESTIMATE_SAMPLE = 256  # cells spread over the selection, for the non-zeros per cell
ESTIMATE_BLOCK = 512  # consecutive cells read and timed, for the build time
WRITE_BYTES_PER_S = 400e6  # appending parts to the cache files (page cache, then disk)


def single_threaded(store: CellSource) -> CellSource:
    """The store reading with one TileDB thread: the build's processes are its parallelism."""
    return store.with_config({"sm.compute_concurrency_level": 1,
                              "sm.io_concurrency_level": 1,
                              "py.init_buffer_bytes": 64 * 2**20})


def read_model_rows(store: CellSource, cells: np.ndarray,
                    genes: np.ndarray | None) -> sp.csr_matrix:
    """Counts of ``cells`` (any order) with columns in model order, as the stream reads them."""
    rows = store.read_rows(cells)
    return rows[:, genes] if genes is not None else rows


@dataclass(frozen=True)
class ChunkReader:
    """Reads one chunk of cache rows as cache arrays (runs in a worker process)."""

    store: CellSource
    genes: np.ndarray | None
    target_sum: float
    index_dtype: np.dtype

    def __call__(self, task: tuple[int, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray,
                                                             np.ndarray]:
        """``(chunk number, store cells)`` → ``(chunk number, non-zeros of each row, values,
        column indices)``."""
        # The stream's own normalisation, so cached values are its values bit for bit.
        from scimtrain.stream import lognormalize

        number, cells = task
        rows = read_model_rows(self.store, cells, self.genes)
        values = lognormalize(rows, self.target_sum)
        return (number, np.diff(rows.indptr).astype(np.int64), values,
                rows.indices.astype(self.index_dtype))


_READER: ChunkReader | None = None


def _start_worker(reader: ChunkReader) -> None:
    global _READER
    from scimtrain.stream import protect_inherited_objects

    for fd in list(HELD_LOCK_FDS):  # inherited through fork: the parent's, not ours to hold
        try:
            os.close(fd)
        except OSError:
            pass
    HELD_LOCK_FDS.clear()
    _die_with_parent()
    protect_inherited_objects()
    _READER = reader


def _run_chunk(task: tuple[int, np.ndarray]) -> tuple:
    return _READER(task)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the building process dies (kill -9
    included): an orphaned worker would otherwise wait for tasks forever."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def chunks(cells: np.ndarray, chunk_cells: int) -> list[tuple[int, np.ndarray]]:
    """Consecutive runs of cache rows, ``(chunk number, store cells)``."""
    return [(i, cells[start:start + chunk_cells])
            for i, start in enumerate(range(0, cells.size, chunk_cells))]


def build_arrays(store: CellSource, cells: np.ndarray, genes: np.ndarray | None,
                 target_sum: float, folder: Path, *, n_genes: int, workers: int,
                 chunk_cells: int = CHUNK_CELLS, progress: bool = True,
                 mp_context: str | None = None) -> dict:
    """Write the array files of a cache into the existing, empty ``folder``.

    Args:
        store: the store to read.
        cells: int64 store cells in cache-row order.
        genes: store columns in model order; None for every gene in store order.
        target_sum: the normalisation's target sum.
        folder: where the ``*.bin`` files go.
        n_genes: columns of the cache (``genes.size`` or the store's gene count).
        workers: processes reading chunks (1: read in this process).
        chunk_cells: cache rows per chunk.
        progress: show a progress bar.
        mp_context: multiprocessing start method for the workers (None: the platform's).

    Returns:
        The manifest entries describing the arrays: ``n_rows``, ``n_genes``, ``nnz``,
        ``dtypes``, ``build_seconds``, ``workers``.
    """
    # Imported here, before the workers start: forked workers inherit it (and torch, which it
    # imports) instead of each importing it again, ~2 CPU-seconds apiece.
    import scimtrain.stream  # noqa: F401

    started = time.perf_counter()
    dtype = index_dtype(n_genes)
    reader = ChunkReader(single_threaded(store) if workers > 1 else store, genes, target_sum,
                         dtype)
    tasks = chunks(cells, max(1, chunk_cells))
    workers = max(1, min(workers, len(tasks)))
    lengths = np.zeros(cells.size, dtype=np.int64)
    bar = tqdm(total=int(cells.size), desc="building training cache", unit=" cells",
               disable=not progress, dynamic_ncols=True)
    with bar, open(array_file(folder, "values"), "wb") as values, \
            open(array_file(folder, "indices"), "wb") as indices:
        for number, row_lengths, chunk_values, chunk_indices in _results(
                reader, tasks, workers, mp_context):
            start = number * max(1, chunk_cells)
            lengths[start:start + row_lengths.size] = row_lengths
            chunk_values.tofile(values)
            chunk_indices.tofile(indices)
            bar.update(row_lengths.size)
    indptr = np.zeros(cells.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indptr.tofile(array_file(folder, "indptr"))
    np.ascontiguousarray(cells, dtype=np.int64).tofile(array_file(folder, "cells"))
    gene_array = np.arange(n_genes, dtype=np.int64) if genes is None else genes
    gene_array.astype(np.int64).tofile(array_file(folder, "genes"))
    return {"n_rows": int(cells.size), "n_genes": int(n_genes), "nnz": int(indptr[-1]),
            "dtypes": {"values": "float32", "indices": dtype.name, "indptr": "int64",
                       "cells": "int64", "genes": "int64"},
            "build_seconds": round(time.perf_counter() - started, 3), "workers": workers}


def _results(reader: ChunkReader, tasks: list, workers: int, mp_context: str | None):
    """Chunk results in chunk order, from ``workers`` processes (or this one)."""
    if workers == 1:
        yield from map(reader, tasks)
        return
    context = multiprocessing.get_context(mp_context)
    with context.Pool(workers, initializer=_start_worker, initargs=(reader,)) as pool:
        yield from pool.imap(_run_chunk, tasks)


def estimate_build(store: CellSource, cells: np.ndarray, genes: np.ndarray | None,
                   n_genes: int, workers: int) -> tuple[int, float]:
    """``(bytes, seconds)`` a build of ``cells`` would take: non-zeros per cell from a sample
    spread over the selection, time per cell from a read of consecutive selected cells."""
    n = int(cells.size)
    if n == 0:
        return 8, 0.0
    spread = cells[np.unique(np.linspace(0, n - 1, min(n, ESTIMATE_SAMPLE)).astype(np.int64))]
    nnz_per_cell = read_model_rows(store, spread, genes).nnz / spread.size
    ordered = np.sort(cells)
    middle = max(0, n // 2 - ESTIMATE_BLOCK // 2)
    block = ordered[middle:middle + ESTIMATE_BLOCK]
    start = time.perf_counter()
    read_model_rows(store, block, genes)
    per_cell = (time.perf_counter() - start) / block.size
    per_nnz_bytes = 4 + index_dtype(n_genes).itemsize
    size = int(nnz_per_cell * n * per_nnz_bytes) + 16 * n + 8 * (n_genes + 1)
    parallel = max(1, min(workers, os.cpu_count() or 1))
    # Parallel reads share memory bandwidth: count ~80% per extra process.
    speedup = 1 + 0.8 * (parallel - 1)
    seconds = n * per_cell * 1.3 / speedup + size / WRITE_BYTES_PER_S  # 1.3: lognorm, writes
    return size, seconds
