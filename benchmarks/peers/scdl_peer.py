#!/usr/bin/env python
"""BioNeMo-SCDL as a peer: convert the exported h5ad once, then time dense log-normalised
batches.

Runs in its own virtual environment (``pip install bionemo-scdl``; it needs torch);
``benchmarks/loader_throughput.py --peers scdl`` calls it. Conversion is SCDL's own:
``SingleCellMemMapDataset(data_path, h5ad_path=...)`` writes memory-mapped CSR arrays (the
export has its counts in ``X``, hence ``use_X_not_raw=True``). Loading is SCDL's documented
one: a torch ``DataLoader`` over the dataset, ``shuffle=True`` (one random cell per
``__getitem__``), ``collate_sparse_matrix_batch`` in the workers; each CSR batch is then
log-normalised and densified to full width in the training process, as SCDL's examples
densify after loading. (Densifying in the workers' collate instead, as scimtrain's workers do,
measured 1.7-2.0k against 2.8-4.3k cells/s here: the dense batch then crosses processes.)
"""

from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
from peer_common import (
    done_marker,
    lognormalize_dense,
    parse_args,
    peak_rss_gib,
    report,
    timed_batches,
)
from torch.utils.data import DataLoader


def convert(h5ad: Path, work: Path) -> tuple[SingleCellMemMapDataset, float | None]:
    """SCDL's memory-mapped copy in ``work``; seconds taken, or None when reused."""
    path = work / "scdl"
    if done_marker(work).exists():
        return SingleCellMemMapDataset(str(path)), None
    start = time.perf_counter()
    dataset = SingleCellMemMapDataset(str(path), h5ad_path=str(h5ad), use_X_not_raw=True)
    seconds = time.perf_counter() - start
    done_marker(work).write_text(f"{seconds:.1f}\n")
    return dataset, seconds


def dense(csr: torch.Tensor, n_genes: int, target_sum: float) -> np.ndarray:
    """SCDL's CSR batch (width: its largest column + 1) as full-width log-normalised float32."""
    counts = sp.csr_matrix((csr.values().numpy(), csr.col_indices().numpy(),
                            csr.crow_indices().numpy()), shape=(csr.shape[0], n_genes))
    return lognormalize_dense(counts, target_sum)


def main() -> None:
    args = parse_args(__doc__)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset, convert_s = convert(Path(args.h5ad), work)
    n_genes = int(dataset.number_of_variables()[0])
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, collate_fn=collate_sparse_matrix_batch,
                        generator=torch.Generator().manual_seed(args.seed))
    shapes: list[list[int]] = []

    def rows(batch: torch.Tensor) -> int:
        x = dense(batch, n_genes, args.target_sum)
        if not shapes:
            shapes.append(list(x.shape))
        return x.shape[0]

    seconds, cells, seen = timed_batches(loader, args.batches, rows=rows)
    report(peer="bionemo-scdl", version=version("bionemo-scdl"), torch=torch.__version__,
           convert_s=convert_s, seconds=seconds, cells=cells, batches=seen,
           cells_per_s=cells / seconds, batch_shape=shapes[0] if shapes else None,
           rows=int(dataset.number_of_rows()), peak_rss_gib=peak_rss_gib(),
           settings=f"DataLoader shuffle=True, {args.workers} workers, "
                    "collate_sparse_matrix_batch, densified in the training process")


if __name__ == "__main__":
    main()
