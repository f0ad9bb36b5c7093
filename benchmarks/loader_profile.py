#!/usr/bin/env python
"""Where the loader's time goes, for one store: TileDB's own timers and the stream's stages.

    python benchmarks/loader_profile.py --store PATH [--batches 16] [--pool-batches 16]

1. Read amplification: one random pool (the cells of ``--pool-batches`` batches) against one
   contiguous block of as many cells, both through ``CellArrStore.read_rows``; and the cells
   TileDB decompresses per cell asked (data-tile capacity / non-zeros per cell).
2. TileDB's timers (``tiledb.stats``) for that random pool read: coordinate and attribute
   tiles read and unfiltered (decompressed), result computation, copying.
3. The stream in this process, single-threaded TileDB, by stage: TileDB query, CSR building,
   row slicing, normalisation, densifying.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tiledb

from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig, lognormalize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pool-batches", type=int, default=StreamConfig.pool_batches)
    args = parser.parse_args(argv)

    store = CellArrStore(args.store, config={"sm.compute_concurrency_level": 1,
                                             "sm.io_concurrency_level": 1,
                                             "py.init_buffer_bytes": 256 * 2**20})
    selection = select_cells(store, SelectionConfig())
    train = CellTable.from_frame(selection.train)
    config = StreamConfig(batch_size=args.batch_size, n_batches=args.batches, num_workers=0,
                          pool_batches=args.pool_batches, prefetch_pools=0, tiledb_threads=1)
    stream = CellStream(store, train, selection.gene_indices, config)
    pool = np.unique(train.cell_index[np.concatenate(
        [stream.plan.batch(0, 0, k) for k in range(min(args.pool_batches, args.batches))])])

    start = time.perf_counter()
    rows = store.read_rows(pool)
    random_rate = pool.size / (time.perf_counter() - start)
    first = int(np.random.default_rng(0).integers(0, store.n_cells - pool.size))
    start = time.perf_counter()
    store.read_rows(np.arange(first, first + pool.size))
    contiguous_rate = pool.size / (time.perf_counter() - start)
    with tiledb.open(store.counts_uri, ctx=tiledb.Ctx()) as arr:
        capacity = arr.schema.capacity
    per_cell = rows.nnz / pool.size
    print(f"store {args.store}: {store.n_cells:,} cells, {per_cell:,.0f} non-zeros per cell, "
          f"data tiles of {capacity:,} values (~{capacity / per_cell:.1f} cells)")
    print(f"one pool of {pool.size:,} cells, single-threaded TileDB: random {random_rate:,.0f} "
          f"cells/s, contiguous {contiguous_rate:,.0f} cells/s "
          f"(random/contiguous {random_rate / contiguous_rate:.2f})")

    tiledb.stats_enable()
    tiledb.stats_reset()
    store.read_rows(pool)
    stats = json.loads(tiledb.stats_dump(print_out=False, json=True))
    tiledb.stats_disable()
    timers = (stats[0] if isinstance(stats, list) else stats)["timers"]
    sums = {k.replace("Context.Query.Reader.", "").replace(".sum", ""): v
            for k, v in timers.items() if k.endswith(".sum") and "Reader" in k}
    total = sums.get("dowork", max(sums.values()))
    print("\nTileDB timers for the random pool read (seconds, share of the read):")
    for name, value in sorted(sums.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:<40} {value:7.3f}  {value / total:6.1%}")

    stages = dict.fromkeys(["tiledb query + CSR", "row slicing", "normalisation",
                            "densifying"], 0.0)
    cells = 0
    for k0 in range(0, args.batches, args.pool_batches):
        batches = [stream.plan.batch(0, 0, k)
                   for k in range(k0, min(k0 + args.pool_batches, args.batches))]
        t = time.perf_counter()
        unique, pool_rows = stream._read_pool(batches)
        stages["tiledb query + CSR"] += time.perf_counter() - t
        for positions in batches:
            t = time.perf_counter()
            counts = pool_rows[np.searchsorted(unique, train.cell_index[positions])]
            stages["row slicing"] += time.perf_counter() - t
            t = time.perf_counter()
            lognormalize(counts)
            stages["normalisation"] += time.perf_counter() - t
            t = time.perf_counter()
            counts.toarray()
            stages["densifying"] += time.perf_counter() - t
            cells += len(positions)
    total = sum(stages.values())
    print(f"\nstream stages in one process ({cells:,} cells, {cells / total:,.0f} cells/s):")
    for name, value in stages.items():
        print(f"  {name:<22} {value:7.2f} s  {value / total:6.1%}")


if __name__ == "__main__":
    main()
