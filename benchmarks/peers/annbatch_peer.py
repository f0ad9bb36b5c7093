#!/usr/bin/env python
"""annbatch as a peer: convert the exported h5ad once, then time dense log-normalised batches.

Runs in its own virtual environment (Python >= 3.12; ``pip install "annbatch[zarrs]"``);
``benchmarks/loader_throughput.py --peers annbatch`` calls it. Conversion follows annbatch's
README: ``DatasetCollection.add_adatas(..., shuffle=True)`` pre-shuffles the cells into
sharded zarr. Loading follows it too: ``Loader(chunk_size=32, shuffle=True)``, ~8,192 cells
preloaded at a time, reads blocks of 32 contiguous (pre-shuffled) cells and yields CSR
batches of raw counts; each is log-normalised and densified here, as a CPU training loop
would.

annbatch reads with zarr's own threads in one process (its README advises against DataLoader
workers), so ``--workers`` is not a process count here; zarrs uses every core.
"""

from __future__ import annotations

import math
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import zarr
from peer_common import (
    done_marker,
    lognormalize_dense,
    parse_args,
    peak_rss_gib,
    report,
    timed_batches,
)

# annbatch's README: the zarrs codec pipeline is what makes sharded zarr fast on local disk.
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})

from annbatch import DatasetCollection, Loader  # noqa: E402 (after the zarr setting)

# annbatch README's loader example: blocks of 32 cells, 256 blocks (8,192 cells) preloaded.
CHUNK_SIZE, PRELOAD_CELLS = 32, 8192


def preload_nchunks(batch_size: int) -> int:
    """Blocks preloaded: about ``PRELOAD_CELLS`` cells, a whole number of batches (annbatch
    requires chunk_size x preload_nchunks to be divisible by the batch size)."""
    step = batch_size // math.gcd(CHUNK_SIZE, batch_size)
    return step * max(1, round(PRELOAD_CELLS / (CHUNK_SIZE * step)))


def convert(h5ad: Path, work: Path, seed: int) -> tuple[DatasetCollection, float | None]:
    """The pre-shuffled collection in ``work``; seconds taken, or None when reused."""
    path = work / "collection.zarr"
    if done_marker(work).exists():
        return DatasetCollection(path), None
    start = time.perf_counter()
    collection = DatasetCollection(path)
    collection.add_adatas([str(h5ad)], shuffle=True, rng=np.random.default_rng(seed))
    seconds = time.perf_counter() - start
    done_marker(work).write_text(f"{seconds:.1f}\n")
    return collection, seconds


def x_only(group: zarr.Group) -> ad.AnnData:
    """Only ``X`` (annbatch would otherwise yield every ``obs`` column with each batch)."""
    return ad.AnnData(X=ad.io.sparse_dataset(group["X"]))


def main() -> None:
    args = parse_args(__doc__)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    collection, convert_s = convert(Path(args.h5ad), work, args.seed)
    with ad.settings.override(remove_unused_categories=False):
        nchunks = preload_nchunks(args.batch_size)
        loader = Loader(batch_size=args.batch_size, chunk_size=CHUNK_SIZE,
                        preload_nchunks=nchunks, shuffle=True, drop_last=True,
                        preload_to_gpu=False, to=None, rng=np.random.default_rng(args.seed))
        loader = loader.use_collection(collection, load_adata=x_only)

    first_shape = None

    def dense(batch: dict) -> int:
        # A new array per batch, as the other loaders hand out (a training loop keeps it).
        nonlocal first_shape
        x = lognormalize_dense(batch["X"], args.target_sum)
        first_shape = first_shape or list(x.shape)
        return x.shape[0]

    seconds, cells, seen = timed_batches(loader, args.batches, rows=dense)
    report(peer="annbatch", version=version("annbatch"), zarrs=version("zarrs"),
           convert_s=convert_s, seconds=seconds, cells=cells, batches=seen,
           cells_per_s=cells / seconds, batch_shape=first_shape, peak_rss_gib=peak_rss_gib(),
           settings=f"chunk_size={CHUNK_SIZE}, preload_nchunks={nchunks}, "
                    "shuffle=True, one process (zarrs threads)")


if __name__ == "__main__":
    main()
