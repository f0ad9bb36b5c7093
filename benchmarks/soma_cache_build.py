#!/usr/bin/env python
"""Building the training cache from a SOMA experiment vs from a CellArr store of the same cells.

    python benchmarks/soma_cache_build.py [--cells 40000] [--genes 5000] [--workers 2]
        [--repeats 2] [--keep DIR]

Simulates an atlas (``scimtrain.synthetic``) as a CellArr store, writes the same cells as a
SOMA experiment (``tiledbsoma.io.from_anndata``, layer ``raw``), and builds the cache of every
cell from each, in fresh cache folders, alternating. Prints cells/s of each build, the SOMA
build's time as a ratio of the CellArr build's (the baseline, measured in the same run), and
checks that both caches hold the same bits. Needs the ``soma`` extra.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=40_000)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", help="folder for the store and experiment (default: temp)")
    args = parser.parse_args(argv)

    import anndata
    import tiledbsoma.io

    from scimtrain.cache import TrainingCache
    from scimtrain.soma import SomaSource
    from scimtrain.store import CellArrStore
    from scimtrain.synthetic import SyntheticConfig, make_synthetic_store

    root = Path(args.keep or tempfile.mkdtemp(prefix="soma-bench-"))
    store_uri, experiment = root / "store", root / "experiment"
    if not store_uri.exists():
        make_synthetic_store(store_uri, SyntheticConfig(n_cells=args.cells, n_genes=args.genes),
                             progress=False)
    store = CellArrStore(store_uri)
    if not experiment.exists():
        counts = store.read_rows(np.arange(store.n_cells))
        obs = store.read_frame("cell_metadata")
        obs.index = obs.index.astype(str)
        var = store.read_frame("gene_annotation")
        var.index = var.index.astype(str)
        tiledbsoma.io.from_anndata(str(experiment), anndata.AnnData(X=counts, obs=obs, var=var),
                                   measurement_name="RNA", X_layer_name="raw")
    soma = SomaSource(experiment, gene_column=store.gene_column)
    cells = np.arange(store.n_cells, dtype=np.int64)
    nnz = store.read_rows(cells[:2000]).nnz / 2000
    print(f"{store.n_cells:,} cells x {store.n_genes:,} genes, ~{nnz:,.0f} non-zeros per cell, "
          f"{args.workers} build processes, {os.cpu_count()} cores")
    times: dict[str, list[float]] = {"cellarr": [], "soma": []}
    caches, folders = {}, []
    for _ in range(args.repeats):
        for name, source in (("cellarr", store), ("soma", soma)):
            folder = Path(tempfile.mkdtemp(prefix=f"cache-{name}-"))
            folders.append(folder)
            start = time.perf_counter()
            caches[name] = TrainingCache.ensure(source, cells, None, folder,
                                                workers=args.workers, progress=False,
                                                announce=lambda _: None)
            times[name].append(time.perf_counter() - start)
    same = all(np.array_equal(caches["soma"]._array(a), caches["cellarr"]._array(a))
               for a in ("values", "indices", "indptr"))
    best = {name: min(t) for name, t in times.items()}
    for name in ("cellarr", "soma"):
        print(f"  {name:<8} best {best[name]:6.2f} s  {store.n_cells / best[name]:>9,.0f} cells/s"
              f"  (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"  SOMA build time / CellArr build time: {best['soma'] / best['cellarr']:.2f}x; "
          f"same cache bits: {same}")
    for folder in folders if not args.keep else []:
        shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
