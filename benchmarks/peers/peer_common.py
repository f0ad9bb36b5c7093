"""What every peer runner shares; runs inside a peer's own virtual environment.

Only numpy and scipy are used here (every peer installs them), never ``scimtrain``: the peers
need a newer Python and their own pins of anndata, zarr, torch. Each runner prints one JSON
line starting with ``PEER_RESULT `` that ``benchmarks/peers/runner.py`` parses.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

RESULT_PREFIX = "PEER_RESULT "


def parse_args(description: str) -> argparse.Namespace:
    """The arguments every runner takes (``runner.py`` passes all of them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--h5ad", required=True, help="the exported cells (raw counts, CSR)")
    parser.add_argument("--work", required=True,
                        help="folder for the peer's converted copy (reused when complete)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-sum", type=float, default=1e4)
    return parser.parse_args()


def lognormalize_dense(counts: sp.csr_matrix, target_sum: float,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Dense float32 ``log1p(counts / row_sum * target_sum)``, the arithmetic of
    ``scimtrain.stream.lognormalize`` (float32 per-row scale, zero rows stay zero)."""
    counts = sp.csr_matrix(counts)
    lengths = np.diff(counts.indptr)
    sums = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    sums[sums == 0] = 1.0
    scale = (target_sum / sums).astype(np.float32)
    values = counts.data.astype(np.float32, copy=True)
    values *= np.repeat(scale, lengths)
    np.log1p(values, out=values)
    if out is None:
        out = np.zeros(counts.shape, dtype=np.float32)
    sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape).toarray(out=out)
    return out


def timed_batches(batches: Iterable, n_batches: int,
                  rows: Callable[[object], int] = len) -> tuple[float, int, int]:
    """Iterates ``n_batches`` of ``batches`` (started inside the timing, as a training loop
    would); returns (seconds, cells, batches seen)."""
    start = time.perf_counter()
    cells = seen = 0
    iterator = iter(batches)
    for batch in iterator:
        cells += rows(batch)
        seen += 1
        if seen >= n_batches:
            break
    return time.perf_counter() - start, cells, seen


def peak_rss_gib() -> float:
    """Peak resident memory of this process (GiB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def done_marker(work: Path) -> Path:
    """A converted copy is complete once this file exists (written last)."""
    return work / "CONVERTED"


def report(**fields: object) -> None:
    """Prints the one result line ``runner.py`` reads."""
    print(RESULT_PREFIX + json.dumps(fields), flush=True)
