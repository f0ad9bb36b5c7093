#!/usr/bin/env python
"""Write a synthetic CellArr-layout store (demo, tests, benchmarks).

    python bin/make_synthetic.py OUT --cells 200000 --genes 28000
"""

from __future__ import annotations

import argparse
import time

from scimtrain.synthetic import SyntheticConfig, make_synthetic_store


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--cells", type=int, default=defaults.n_cells)
    parser.add_argument("--genes", type=int, default=defaults.n_genes)
    parser.add_argument("--studies", type=int, default=defaults.n_studies)
    parser.add_argument("--samples-per-study", type=int, default=defaults.samples_per_study)
    parser.add_argument("--mean-umis", type=float, default=defaults.mean_umis)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--chunk-cells", type=int, default=defaults.chunk_cells,
                        help="cells simulated and written at a time (bounds memory)")
    parser.add_argument("--capacity", type=int, default=defaults.capacity,
                        help="non-zeros per TileDB data tile (CellArr's default: 10000)")
    parser.add_argument("--counts-location", default=defaults.counts_location,
                        choices=["counts", "assays/counts"])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = SyntheticConfig(
        n_cells=args.cells, n_genes=args.genes, n_studies=args.studies,
        samples_per_study=args.samples_per_study, mean_umis=args.mean_umis, seed=args.seed,
        chunk_cells=args.chunk_cells, capacity=args.capacity,
        counts_location=args.counts_location)
    start = time.perf_counter()
    make_synthetic_store(args.out, config, overwrite=args.overwrite)
    print(f"wrote {args.out}: {args.cells} cells x {args.genes} genes "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
