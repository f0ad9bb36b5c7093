#!/usr/bin/env python
"""Loader throughput on one store, three ways, in one run on the same cores.

    python benchmarks/loader_throughput.py --store PATH [--workers 2] [--batches 40]
        [--batch-size 1000] [--pool-batches 8]

(a) ceiling: a sequential scan of the counts array (TileDB's own threads): as many cells as
    (c) delivers, from a random start, in contiguous blocks of one pool (batch-size x
    pool-batches cells) through the same read path (``read_rows``);
(b) floor: SCimilarity's read pattern: per batch, weighted ``np.random.choice`` in the main
    process, then one random ``multi_index`` query of the batch's cells in a DataLoader worker
    with TileDB single-threaded, COO -> CSR -> gene subset -> lognorm -> dense;
(c) scimtrain's ``CellStream``: weighted sampling plan, pooled sorted reads, dense output.

Prints cells/s of each, the ratios c/a and c/b, and the peak memory of (c) (this process and
its workers, proportional set size, sampled). All three read the cells of the selection's training split.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Callable

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import tiledb
import torch
from torch.utils.data import DataLoader, Dataset

from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig

SINGLE_THREADED = {  # SCimilarity's collator config
    "sm.compute_concurrency_level": 1, "sm.io_concurrency_level": 1,
    "vfs.num_threads": 1,
}


class PeakRSS:
    """Samples the memory of this process and its children every 100 ms: the sum of their
    proportional set sizes (PSS), so pages shared after fork are counted once."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = sum(p.memory_full_info().pss
                            for p in [me, *me.children(recursive=True)])
            except psutil.Error:
                continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], int]) -> float:
    """Cells per second of ``fn``, which returns how many cells it delivered."""
    start = time.perf_counter()
    cells = fn()
    return cells / (time.perf_counter() - start)


def sequential_scan(store: CellArrStore, n_cells: int, block: int, seed: int) -> int:
    """(a): contiguous blocks of ``block`` cells (the stream's pool size) read with the same
    ``read_rows`` (one TileDB query, CSR out) from a random start, TileDB multi-threaded."""
    start = int(np.random.default_rng(seed).integers(0, max(1, store.n_cells - n_cells)))
    done = 0
    for lo in range(start, min(start + n_cells, store.n_cells), block):
        rows = store.read_rows(np.arange(lo, min(lo + block, store.n_cells)))
        done += rows.shape[0]
    return done


class _Cells(Dataset):
    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> int:
        return i


class _WeightedBatches:
    """SCimilarity's scSampler: np.random.choice(p=w, replace=False) per batch."""

    def __init__(self, weights: np.ndarray, batch_size: int, n_batches: int, seed: int):
        self.p = weights / weights.sum()
        self.batch_size, self.n_batches = batch_size, n_batches
        self.rng = np.random.RandomState(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            yield self.rng.choice(self.p.size, size=self.batch_size, replace=False, p=self.p)


class _ScimilarityCollate:
    """SCimilarity's scCollator: one multi_index query per batch, TileDB single-threaded."""

    def __init__(self, counts_uri: str, cell_index: np.ndarray, gene_indices: np.ndarray,
                 shape: tuple[int, int]) -> None:
        self.counts_uri, self.cell_index = counts_uri, cell_index
        self.gene_indices, self.shape = gene_indices, shape
        self._array = None

    def __call__(self, positions: list[int]) -> torch.Tensor:
        if self._array is None:  # opened in the worker, with its own context
            self._array = tiledb.open(self.counts_uri, ctx=tiledb.Ctx(SINGLE_THREADED))
        cells = self.cell_index[np.asarray(positions)].tolist()
        result = self._array.multi_index[cells, :]
        attr = self._array.schema.attr(0).name
        counts = sp.coo_matrix((result[attr], (result["cell_index"], result["gene_index"])),
                               shape=self.shape).tocsr()
        x = counts[cells, :][:, self.gene_indices].astype(np.float32)
        sums = np.ravel(x.sum(axis=1))
        sums[sums == 0] = 1
        x = sp.diags(1 / sums).dot(x).multiply(1e4).log1p()
        return torch.from_numpy(x.toarray())


def scimilarity_pattern(store: CellArrStore, cells: pd.DataFrame, gene_indices: np.ndarray,
                        batch_size: int, n_batches: int, workers: int, seed: int) -> int:
    """(b)."""
    collate = _ScimilarityCollate(store.counts_uri, cells.index.to_numpy(), gene_indices,
                                  (store.n_cells, store.n_genes))
    sampler = _WeightedBatches(cells["sampling_weight"].to_numpy(), batch_size, n_batches, seed)
    loader = DataLoader(_Cells(cells), batch_sampler=sampler, collate_fn=collate,
                        num_workers=workers)
    return sum(x.shape[0] for x in loader)


def scimtrain_stream(store: CellArrStore, cells: pd.DataFrame, gene_indices: np.ndarray,
                     config: StreamConfig) -> int:
    """(c)."""
    stream = CellStream(store, CellTable.from_frame(cells), gene_indices, config)
    return sum(batch.x.shape[0] for batch in stream)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pool-batches", type=int, default=StreamConfig.pool_batches)
    parser.add_argument("--prefetch-pools", type=int, default=StreamConfig.prefetch_pools)
    parser.add_argument("--filter", default=None,
                        help="cell filter (default: SCimilarity's)")
    parser.add_argument("--tiledb-threads", type=int, default=None,
                        help="TileDB compute/io threads per reading process (default: the "
                             "stream's choice)")
    parser.add_argument("--tiledb-memory-mb", type=int, default=StreamConfig.tiledb_memory_mb,
                        help="TileDB memory budget per reading process (sm.mem.total_budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of a,b,c to skip")
    args = parser.parse_args(argv)

    store = CellArrStore(args.store)
    selection = select_cells(store, SelectionConfig(filter_condition=args.filter))
    train = selection.train
    n = args.batches * args.batch_size
    print(f"store {args.store}: {store.n_cells:,} cells x {store.n_genes:,} genes, "
          f"{len(train):,} training cells; {args.batches} batches x {args.batch_size}, "
          f"{args.workers} workers, {os.cpu_count()} cores")
    skip = set(args.skip.split(","))
    results = {}
    if "a" not in skip:
        block = args.batch_size * args.pool_batches
        results["a"] = timed(lambda: sequential_scan(store, n, block, args.seed))
        print(f"(a) sequential scan           {results['a']:>10,.0f} cells/s")
    if "b" not in skip:
        results["b"] = timed(lambda: scimilarity_pattern(
            store, train, selection.gene_indices, args.batch_size, args.batches, args.workers,
            args.seed))
        print(f"(b) SCimilarity read pattern  {results['b']:>10,.0f} cells/s")
    config = StreamConfig(batch_size=args.batch_size, n_batches=args.batches,
                          num_workers=args.workers, pool_batches=args.pool_batches,
                          prefetch_pools=args.prefetch_pools, seed=args.seed,
                          tiledb_threads=args.tiledb_threads,
                          tiledb_memory_mb=args.tiledb_memory_mb)
    with PeakRSS() as memory:
        results["c"] = timed(lambda: scimtrain_stream(store, train, selection.gene_indices,
                                                      config))
    print(f"(c) scimtrain stream          {results['c']:>10,.0f} cells/s   "
          f"(pool {args.pool_batches} batches, prefetch {args.prefetch_pools})")
    if "a" in results:
        print(f"c/a = {results['c'] / results['a']:.2f}")
    if "b" in results:
        print(f"c/b = {results['c'] / results['b']:.2f}")
    print(f"peak memory during (c): {memory.peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
