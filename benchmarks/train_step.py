#!/usr/bin/env python
"""Where a training step's time goes: data wait, forward, mining (loss), backward + optimiser.

    python benchmarks/train_step.py --store PATH [--steps 12] [--batch-size 1000]
        [--workers 2] [--device cpu|cuda] [--sparse-batches] [--cpu-miner compiled|torch]
        [--cache auto|off]

Builds the run as ``bin/train.py`` does (``build_training``: SCimilarity's default model,
filter and objective), runs its loop for one epoch of ``--steps`` steps, reads the step-time
breakdown back from the TensorBoard log it writes, and prints a table of seconds per step and
shares of the step time (the first step, which starts the loader workers, is reported apart).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scimtrain.build import build_training
from scimtrain.config import TrainingConfig
from scimtrain.mining.dispatch import CPU_MINER_ENV, CPU_MINERS
from scimtrain.stream import StreamConfig

SECTIONS = ("data_wait", "forward", "mining", "backward")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=StreamConfig.num_workers)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available")
    parser.add_argument("--sparse-batches", action="store_true",
                        help="move batches as CSR and densify on the device")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--cache", default="auto", choices=["auto", "off"],
                        help="auto: batches from the training cache (built first, untimed); "
                             "off: streamed from TileDB")
    parser.add_argument("--cpu-miner", choices=CPU_MINERS, default=None,
                        help=f"on the CPU: the compiled miner or the torch path CUDA runs "
                             f"(sets {CPU_MINER_ENV}; default: compiled)")
    args = parser.parse_args(argv)
    if args.cpu_miner:
        os.environ[CPU_MINER_ENV] = args.cpu_miner

    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    with tempfile.TemporaryDirectory() as out:
        # Built as bin/train.py builds a run: SCimilarity's model, filter and objective.
        run = build_training(TrainingConfig(
            tiledb=args.store, batch_size=args.batch_size, n_batches=args.steps, max_epochs=1,
            num_workers=args.workers, sparse_batches=args.sparse_batches,
            mixed_precision=args.mixed_precision, cpu=cpu, cache=args.cache, no_progress=True,
            model_folder=f"{out}/models", result_folder=f"{out}/results",
            log_folder=f"{out}/logs"))
        selection, accelerator = run.selection, run.accelerator
        started = time.perf_counter()
        run.trainer.fit()
        wall = time.perf_counter() - started
        events = EventAccumulator(str(run.run_dir))
        events.Reload()
        series = {name: np.array([e.value for e in events.Scalars(f"time/{name}")])
                  for name in (*SECTIONS, "step")}
        cells = np.array([e.value for e in events.Scalars("train/cells_per_s")])

    print(f"store {args.store}: {len(selection.gene_order):,} genes, batch {args.batch_size}, "
          f"{args.workers} workers, cache {args.cache}, device {accelerator.device}, "
          f"{os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, cpu miner "
          f"{os.environ.get(CPU_MINER_ENV, 'compiled')}, {args.steps} steps in {wall:.1f} s")
    print("\n| section | first step s | later steps s (mean) | share of step |")
    print("|---|---:|---:|---:|")
    later = slice(1, None)
    step_mean = series["step"][later].mean()
    for name in (*SECTIONS, "step"):
        first, mean = series[name][0], series[name][later].mean()
        print(f"| {name} | {first:.3f} | {mean:.3f} | {mean / step_mean:.1%} |")
    print(f"\ncells/s (later steps): {cells[later].mean():,.0f}")
    print(f"targets: data wait < 10%: {series['data_wait'][later].mean() / step_mean:.1%}; "
          f"mining < 5%: {series['mining'][later].mean() / step_mean:.1%}")


if __name__ == "__main__":
    main()
