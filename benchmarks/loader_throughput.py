#!/usr/bin/env python
"""Loader throughput on one store, every way, in one run on the same cores.

    python benchmarks/loader_throughput.py --store PATH [--workers 2] [--batches 100]
        [--batch-size 1000] [--peers annbatch,scdl --peer-venv-dir DIR]

References (kept from before the cache):
(a) ceiling: a sequential scan of the counts array (TileDB's own threads): as many cells as
    one timed run delivers, from a random start, in contiguous blocks of one pool
    (batch-size x pool-batches cells) through the same read path (``read_rows``);
(b) floor: SCimilarity's read pattern: per batch, weighted ``np.random.choice`` in the main
    process, then one random ``multi_index`` query of the batch's cells in a DataLoader worker
    with TileDB single-threaded, COO -> CSR -> gene subset -> lognorm -> dense.

scimtrain (same sampling plan, same batches; DataLoader workers):
- ``cache build``: ``TrainingCache.ensure`` of the selection (train, then validation) into a
  fresh folder (``--cache-dir``, removed afterwards unless ``--keep-cache``): cells/s, wall
  seconds, size on disk;
- ``scimtrain tiledb dense``: ``CellStream`` reading pools from the store;
- ``scimtrain cache dense`` / ``scimtrain cache csr``: ``CellStream`` gathering from the cache;
- ``identical batches``: the first batches of the TileDB and the cache streams (dense and
  CSR) compared bit for bit, labels and studies too;
- memory per reading process besides the mapped cache (an untimed extra pass of the cache
  dense stream, ``/proc/PID/smaps`` sampled every 50 ms, cache files left out): proportional
  set size (shared pages split among their processes) and resident size.

Peers (``--peers``, each in its own virtual environment, ``benchmarks/peers/``): the training
cells exported once as an h5ad of raw counts, converted to the peer's format (timed apart,
reused by later runs), then dense full-width log-normalised batches timed the same way.
Output lines ``annbatch dense: N cells/s`` and ``bionemo-scdl dense: N cells/s``, then the
ratios of the cache paths to the faster peer and to (b).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import tiledb
import torch
from peers.runner import (
    PeerResult,
    data_key,
    export_h5ad,
    peer_names,
    run_peer,
    venv_python,
)
from torch.utils.data import DataLoader, Dataset

from scimtrain.cache import TrainingCache, default_cache_dir
from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import Batch, CellStream, CellTable, StreamConfig

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


class StreamRun:
    """One timed pass over a stream: cells/s overall (worker start-up included, as in a
    training epoch), the wait for the first batch, and cells/s after it."""

    def __init__(self, stream: CellStream, keep: int = 0) -> None:
        self.kept: list[Batch] = []  # the first ``keep`` batches (references, not copies)
        start = time.perf_counter()
        first_at, cells, first_cells = None, 0, 0
        for batch in stream:
            if len(self.kept) < keep:
                self.kept.append(batch)
            cells += batch.x.shape[0]
            if first_at is None:
                first_at, first_cells = time.perf_counter(), cells
        end = time.perf_counter()
        # Outside the timing: the stream's workers outlive the epoch (they run on into the
        # next one) until closed, and a stream dropped unclosed delays the next one's start.
        if hasattr(stream, "close"):
            stream.close()
        self.cells_per_s = cells / (end - start)
        self.first_batch_s = (first_at or end) - start
        rest = end - (first_at or end)
        self.after_first = (cells - first_cells) / rest if rest > 0 else float("nan")

    def detail(self) -> str:
        return (f"first batch after {self.first_batch_s:.2f} s, then "
                f"{self.after_first:,.0f} cells/s")


def same_batches(reference: list[Batch], other: list[Batch]) -> bool:
    """Bit-for-bit equality of dense (or densified CSR) batches, labels and studies."""
    if len(reference) != len(other) or not reference:
        return False
    for a, b in zip(reference, other):
        xa = a.x.to_dense() if a.x.layout == torch.sparse_csr else a.x
        xb = b.x.to_dense() if b.x.layout == torch.sparse_csr else b.x
        if xa.shape != xb.shape or not torch.equal(xa.view(torch.int32), xb.view(torch.int32)):
            return False
        if not (torch.equal(a.labels, b.labels) and torch.equal(a.studies, b.studies)):
            return False
    return True


class MemoryBesidesCache:
    """Samples, every 50 ms, this process and its worker processes from ``/proc/PID/smaps``,
    leaving out the pages of files under ``cache_path`` (the mapped cache: one copy in the page
    cache for every process). Per process: its proportional set size (PSS: each page shared
    by k processes counts 1/k, so the processes' values add up to the memory they use; a
    forked worker shares its parent's pages copy-on-write), the part of it that is
    shared-memory batches, and its resident size (RSS, every mapped page counted whole).
    ``peaks[role]``: the sample with the largest PSS of this process ("main") and of any
    worker ("worker"), as bytes (PSS, PSS of shared-memory batches, RSS)."""

    def __init__(self, cache_path: Path) -> None:
        self.cache_path = str(cache_path)
        self.peaks = {"main": (0, 0, 0), "worker": (0, 0, 0)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pid: int) -> tuple[int, int, int]:
        pss = shm = rss = 0
        kind = "other"
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if not fields:
                    continue
                if "-" in fields[0]:  # a mapping's header: range, perms, offset, dev, inode, path
                    path = fields[5] if len(fields) > 5 else ""
                    kind = ("cache" if self.cache_path in line else
                            "shm" if path.startswith(("/dev/shm", "/memfd:", "/torch_")) else
                            "other")
                elif kind == "cache":
                    continue
                elif fields[0] == "Pss:":
                    pss += int(fields[1]) * 1024
                    shm += int(fields[1]) * 1024 if kind == "shm" else 0
                elif fields[0] == "Rss:":
                    rss += int(fields[1]) * 1024
        return (pss, shm, rss)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for process in [me, *me.children(recursive=True)]:
                try:
                    sample = self._sample(process.pid)
                except (OSError, ValueError, IndexError, psutil.Error):
                    continue  # a worker that just exited
                role = "main" if process.pid == me.pid else "worker"
                self.peaks[role] = max(self.peaks[role], sample)
            self._stop.wait(0.05)

    def __enter__(self) -> MemoryBesidesCache:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def describe(peak: tuple[int, int, int]) -> str:
        pss, shm, rss = (v / 2**30 for v in peak)
        return (f"{pss:.2f} GiB PSS (shared-memory batches {shm:.2f}); RSS {rss:.2f} GiB")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError("unreachable")


def verdict(value: float, target: float, above: bool = True) -> str:
    met = value >= target if above else value < target
    close = f", {value:.3f}" if abs(value - target) < 0.01 else ""  # 0.498 prints as 0.50
    return f"target {'>=' if above else '<'} {target:g}: {'met' if met else 'NOT met'}{close}"


def run_peers(args: argparse.Namespace, store: CellArrStore, train: pd.DataFrame,
              gene_indices: np.ndarray, gene_names: list[str]) -> list[PeerResult]:
    """Exports the training cells once (reused while the store and selection are the same),
    then runs each peer in its environment; prints one line per peer."""
    names = peer_names(args.peers)
    venv_dir = Path(args.peer_venv_dir).expanduser()
    pythons = {name: venv_python(venv_dir, name) for name in names}  # fail before exporting
    cells = train.index.to_numpy(np.int64)
    work = Path(args.peer_data_dir).expanduser() / data_key(store, cells, gene_indices)
    work.mkdir(parents=True, exist_ok=True)
    h5ad = work / "cells.h5ad"
    seconds = export_h5ad(store, cells, gene_indices, gene_names, h5ad)
    print(f"peer data: {cells.size:,} training cells as raw counts in {h5ad} "
          f"({human_bytes(h5ad.stat().st_size)}"
          + (f", exported in {seconds:.1f} s)" if seconds is not None else ", reused)"))
    results = []
    for name in names:
        result = run_peer(name, pythons[name], h5ad, work / name, batch_size=args.batch_size,
                          batches=args.batches, workers=args.workers, seed=args.seed,
                          target_sum=StreamConfig.target_sum)
        convert = (f"conversion {result.convert_s:.1f} s" if result.convert_s is not None
                   else "conversion reused")
        print(f"{name} dense: {result.cells_per_s:,.0f} cells/s")
        print(f"  ({name} {result.fields.get('version')}, {convert}; "
              f"{result.fields.get('settings', '')})")
        results.append(result)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100)
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
    parser.add_argument("--cache-dir", default=None,
                        help="where the benchmark builds its cache, in a fresh subfolder "
                             "(default: the training cache folder, "
                             f"{default_cache_dir()})")
    parser.add_argument("--build-workers", type=int, default=None,
                        help="processes building the cache (default: one per core)")
    parser.add_argument("--keep-cache", action="store_true",
                        help="keep the cache built for the benchmark")
    parser.add_argument("--compare-batches", type=int, default=4,
                        help="first batches compared bit for bit")
    parser.add_argument("--peers", default="",
                        help="comma list of peers to run too: annbatch, scdl")
    parser.add_argument("--peer-venv-dir", default=os.environ.get("SCIMTRAIN_PEER_VENVS"),
                        help="folder holding one virtual environment per peer "
                             "(DIR/annbatch, DIR/bionemo-scdl; README 'Loader'); default "
                             "$SCIMTRAIN_PEER_VENVS")
    parser.add_argument("--peer-data-dir",
                        default=str(Path.home() / ".cache" / "scimtrain" / "benchmark-peers"),
                        help="where the exported h5ad and the peers' copies go (reused)")
    parser.add_argument("--skip", default="",
                        help="comma list of parts to skip: scan (a), scimilarity (b), tiledb, "
                             "memory")
    args = parser.parse_args(argv)
    if args.peers and not args.peer_venv_dir:
        parser.error("--peers needs --peer-venv-dir (or $SCIMTRAIN_PEER_VENVS)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    skip = {{"a": "scan", "b": "scimilarity"}.get(s.strip(), s.strip())
            for s in args.skip.split(",") if s.strip()}
    store = CellArrStore(args.store)
    selection = select_cells(store, SelectionConfig(filter_condition=args.filter))
    train, genes = selection.train, selection.gene_indices
    n = args.batches * args.batch_size
    print(f"store {args.store}: {store.n_cells:,} cells x {store.n_genes:,} genes, "
          f"{len(train):,} training + {len(selection.val):,} validation cells, {genes.size:,} "
          f"genes; {args.batches} batches x {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    results: dict[str, float] = {}
    if "scan" not in skip:
        block = args.batch_size * args.pool_batches
        results["scan"] = timed(lambda: sequential_scan(store, n, block, args.seed))
        print(f"(a) sequential scan (ceiling): {results['scan']:,.0f} cells/s")
    if "scimilarity" not in skip:
        results["scimilarity"] = timed(lambda: scimilarity_pattern(
            store, train, genes, args.batch_size, args.batches, args.workers, args.seed))
        print(f"(b) SCimilarity read pattern (floor): {results['scimilarity']:,.0f} cells/s")

    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix="loader-benchmark-", dir=root))
    try:
        cache_cells = np.concatenate([train.index.to_numpy(np.int64),
                                      selection.val.index.to_numpy(np.int64)])
        cache, results["build"] = build_cache(args, store, cache_cells, genes, build_dir)
        results.update(time_streams(args, store, train, genes, cache, skip))
        if "memory" not in skip:
            memory = memory_besides_cache(args, store, train, genes, cache)
            reader = "worker" if args.workers > 0 else "main"
            if memory.peaks[reader][2]:
                results["memory_gib"] = memory.peaks[reader][0] / 2**30
                print(f"memory per reading process besides the mapped cache: peak "
                      f"{memory.describe(memory.peaks[reader])}")
            else:  # every worker came and went between two samples
                print("memory per reading process: no sample (the pass took under 50 ms)")
            if args.workers > 0:
                print(f"  (the training process, which receives the batches and also ran the "
                      f"parts above: {memory.describe(memory.peaks['main'])})")
    finally:
        if not args.keep_cache:
            shutil.rmtree(build_dir, ignore_errors=True)
    peers = run_peers(args, store, train, genes, list(selection.gene_order)) \
        if args.peers else []
    print_ratios(results, peers)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def build_cache(args: argparse.Namespace, store: CellArrStore, cells: np.ndarray,
                genes: np.ndarray, build_dir: Path) -> tuple[TrainingCache, float]:
    """Builds the cache of ``cells`` in the empty ``build_dir`` (so nothing is reused), timed
    from the call (estimate and disk check included); prints its line. Returns the cache and
    cells/s."""
    start = time.perf_counter()
    cache = TrainingCache.ensure(store, cells, genes, cache_dir=build_dir,
                                 target_sum=StreamConfig.target_sum, workers=args.build_workers,
                                 progress=sys.stderr.isatty(), announce=lambda message: None)
    seconds = time.perf_counter() - start
    size = folder_bytes(cache.path)
    rate = cache.n_rows / seconds
    print(f"cache build: {rate:,.0f} cells/s ({seconds:.1f} s, {human_bytes(size)})")
    print(f"  ({cache.n_rows:,} rows, {cache.nnz / cache.n_rows:,.0f} non-zeros per row, "
          f"{(size - 16 * cache.n_rows) / cache.nnz:.2f} bytes per non-zero, "
          f"{cache.manifest.get('workers')} build process(es))")
    return cache, rate


def stream_config(args: argparse.Namespace, output: str = "dense") -> StreamConfig:
    return StreamConfig(batch_size=args.batch_size, n_batches=args.batches,
                        num_workers=args.workers, pool_batches=args.pool_batches,
                        prefetch_pools=args.prefetch_pools, seed=args.seed, output=output,
                        tiledb_threads=args.tiledb_threads,
                        tiledb_memory_mb=args.tiledb_memory_mb)


def time_streams(args: argparse.Namespace, store: CellArrStore, train: pd.DataFrame,
                 genes: np.ndarray, cache: TrainingCache, skip: set[str]) -> dict[str, float]:
    """The three timed scimtrain streams and the bit-for-bit comparison; prints their lines."""
    table, keep, runs = CellTable.from_frame(train), args.compare_batches, {}
    if "tiledb" not in skip:
        with PeakRSS() as memory:
            runs["tiledb"] = StreamRun(CellStream(store, table, genes, stream_config(args)),
                                       keep)
        print(f"scimtrain tiledb dense: {runs['tiledb'].cells_per_s:,.0f} cells/s")
        print(f"  ({runs['tiledb'].detail()}; pool {args.pool_batches} batches, prefetch "
              f"{args.prefetch_pools}; peak memory, all processes: "
              f"{memory.peak / 2**30:.2f} GiB)")
    for output in ("dense", "csr"):
        runs[output] = StreamRun(CellStream(store, table, genes, stream_config(args, output),
                                            cache=cache, cache_offset=0), keep)
        print(f"scimtrain cache {output}: {runs[output].cells_per_s:,.0f} cells/s")
        print(f"  ({runs[output].detail()})")
    if "tiledb" in runs:
        reference = runs["tiledb"].kept
        same = same_batches(reference, runs["dense"].kept) and \
            same_batches(reference, runs["csr"].kept)
        print(f"identical batches: {'yes' if same else 'no'}")
        print(f"  (first {len(reference)} batches: TileDB dense vs cache dense and cache CSR "
              "densified: values bit for bit, labels, studies)")
    return {name: run.cells_per_s for name, run in runs.items()}


def memory_besides_cache(args: argparse.Namespace, store: CellArrStore, train: pd.DataFrame,
                         genes: np.ndarray, cache: TrainingCache) -> MemoryBesidesCache:
    """Memory of an (untimed) cache dense stream's processes, besides the mapped cache."""
    stream = CellStream(store, CellTable.from_frame(train), genes, stream_config(args),
                        cache=cache, cache_offset=0)
    with MemoryBesidesCache(cache.path) as memory:
        StreamRun(stream)
    return memory


def print_ratios(results: dict[str, float], peers: list[PeerResult]) -> None:
    """Ratios of the cache paths to the faster peer and to SCimilarity, against the targets."""
    lines = []
    if peers:
        best = max(peers, key=lambda p: p.cells_per_s)
        for output, target in (("dense", 1.5), ("csr", 3.0)):
            ratio = results[output] / best.cells_per_s
            lines.append(f"cache {output} / {best.name} (faster peer): {ratio:.2f}x  "
                         f"({verdict(ratio, target)})")
    if "scimilarity" in results:
        for output in ("dense", "csr"):
            ratio = results[output] / results["scimilarity"]
            lines.append(f"cache {output} / SCimilarity: {ratio:.1f}x"
                         + ("  (" + verdict(ratio, 20) + ")" if output == "dense" else ""))
    if "tiledb" in results:
        lines.append(f"cache dense / tiledb dense: {results['dense'] / results['tiledb']:.1f}x")
    if "scan" in results:
        ratio = results["build"] / results["scan"]
        lines.append(f"cache build / sequential scan: {ratio:.2f}x  ({verdict(ratio, 0.5)})")
    if "memory_gib" in results:
        lines.append(f"memory per reading process besides the cache (PSS): "
                     f"{results['memory_gib']:.2f} GiB  "
                     f"({verdict(results['memory_gib'], 1, above=False)})")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
