#!/usr/bin/env python
"""How long building a store from an h5ad file takes.

    python benchmarks/ingest_build.py WORKDIR [--cells 100000] [--genes 3000] [--nnz 1200]

Writes ``WORKDIR/cells.h5ad`` (integer counts in X as float32 CSR, ``--nnz`` genes per cell,
CL labels, 4 studies, 20 donors, doublet flags) unless it exists, then times
``bin/build_store.py`` on it in a fresh process and reports its wall time and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]


def write_h5ad(path: Path, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> None:
    """A synthetic h5ad of raw counts, written in 10,000-cell parts to bound memory."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, n_cells, 10_000):
        m = min(10_000, n_cells - start)
        keys = rng.random((m, n_genes), dtype=np.float32)  # nnz distinct genes per cell
        cols = np.sort(np.argpartition(keys, nnz, axis=1)[:, :nnz], axis=1)
        data = rng.geometric(0.4, size=m * nnz).astype(np.float32)
        indptr = np.arange(0, m * nnz + 1, nnz)
        parts.append(sp.csr_matrix((data, cols.ravel().astype(np.int32), indptr),
                                   shape=(m, n_genes)))
    labels = np.array(["CL:0000084", "CL:0000236", "CL:0000576", "CL:0000623"])
    obs = pd.DataFrame({
        "cell_type_ontology_term_id": pd.Categorical(labels[rng.integers(0, 4, n_cells)]),
        "dataset_id": pd.Categorical([f"study{i % 4}" for i in range(n_cells)]),
        "donor_id": pd.Categorical([f"donor{i % 20}" for i in range(n_cells)]),
        "disease": pd.Categorical(["normal"] * n_cells),
        "doublet": rng.random(n_cells) < 0.02,
    }, index=[f"cell{i}" for i in range(n_cells)])
    genes = [f"GENE{i}" for i in range(n_genes - 13)] + [f"MT-{i}" for i in range(13)]
    ad.AnnData(sp.vstack(parts, format="csr"), obs=obs,
               var=pd.DataFrame(index=genes)).write_h5ad(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=3_000)
    parser.add_argument("--nnz", type=int, default=1_200, help="non-zero genes per cell")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    h5ad = args.workdir / "cells.h5ad"
    if not h5ad.exists():
        write_h5ad(h5ad, args.cells, args.genes, args.nnz)
    store = args.workdir / "store"
    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, str(REPO / "bin" / "build_store.py"), str(store), str(h5ad),
               "--label-column", "cell_type_ontology_term_id", "--study-column", "dataset_id",
               "--sample-column", "donor_id", "--disease-column", "disease",
               "--doublet-column", "doublet", "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20
    print(f"{args.cells:,} cells x {args.genes:,} genes, {args.nnz:,} non-zeros per cell: "
          f"built in {wall:.1f} s, peak memory {peak:.2f} GiB, store {size:,.0f} MiB")


if __name__ == "__main__":
    main()
