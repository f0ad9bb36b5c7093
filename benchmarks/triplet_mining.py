"""Triplet-mining speed: SCimilarity-style loop reference vs ``scimtrain.losses.mine_triplets``.

Times both on the same synthetic batches (B cells, L labels over a random ontology, clustered
unit embeddings, studies for the cross-study rule) and prints a markdown table of ms per batch,
the speed-up, the number of anchor-positive pairs, and the vectorised miner's peak extra memory
(CPU: growth of a fresh process's peak RSS over one call; CUDA:
``torch.cuda.max_memory_allocated``).

    python benchmarks/triplet_mining.py                 # CPU (and CUDA when present)
    python benchmarks/triplet_mining.py --sizes 1000 --labels 20 --skews 0
    python benchmarks/triplet_mining.py --sizes 1000 --labels 20 --breakdown

The reference is ``tests/reference_impl.py``'s ``reference_mine``: SCimilarity's
``TripletSelector`` loop (labels → pairs → numpy over one pair's candidates) with the ontology
lookups precomputed, i.e. slightly faster than SCimilarity itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the reference lives with the tests that check against it

from scimtrain.losses import mine_triplets  # noqa: E402  (after the path insert)
from tests.reference_impl import (  # noqa: E402
    descendant_matrix,
    random_ontology,
    reference_mine,
)


def make_batch(n_cells: int, n_labels: int, n_studies: int, dim: int, noise: float,
               skew: float, seed: int):
    """Embeddings (float32, unit rows), label positions, study ids, descendant matrix.

    Labels are drawn with probability ∝ 1/rank**skew (0 = uniform) over a random ontology of
    ``n_labels`` terms; a cell is its label's centre plus Gaussian noise (noise 2 puts
    same-label cells at squared distance ~1.6 and others at ~2.0, overlapping: mid-training).
    """
    rng = np.random.default_rng(seed)
    desc = descendant_matrix(random_ontology(n_labels, rng))
    weights = 1.0 / np.arange(1, n_labels + 1) ** skew
    labels = rng.choice(n_labels, size=n_cells, p=weights / weights.sum())
    centres = rng.normal(size=(n_labels, dim))
    emb = centres[labels] + noise * rng.normal(size=(n_cells, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    studies = rng.integers(0, n_studies, size=n_cells)
    return emb.astype(np.float32), labels, studies, desc


def time_both(emb, labels, studies, desc, args, device: str, reference: bool
              ) -> tuple[float, int, float | None, int | None]:
    """Median ms of the vectorised miner (``--repeats`` calls) and, if ``reference``, of the
    loop reference (``--reference-repeats`` runs), interleaved: the vectorised calls run in
    rounds between the reference runs, so that both see the same machine (a shared VM's speed
    drifts over seconds); each round starts with ``--warmup`` untimed calls. Returns
    (vectorised ms, its num_hard, reference ms, its num_hard)."""
    e = torch.from_numpy(emb).to(device)
    lab = torch.from_numpy(labels).to(device)
    st = torch.from_numpy(studies).to(device)
    d = torch.from_numpy(desc).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def run():
        out = mine_triplets(e, lab, st, d, margin=args.margin, selection=args.selection,
                            generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(args.warmup):
        run()
    rounds = args.reference_repeats if reference else 1
    times, ref_times, ref_hard = [], [], None
    for r in range(rounds):
        if reference:
            t0 = time.perf_counter()
            ref = reference_mine(emb, labels, studies, desc, args.margin, args.selection,
                                 rng=np.random.default_rng(args.seed), keep_windows=False)
            ref_times.append(time.perf_counter() - t0)
            ref_hard = ref["num_hard"]
            for _ in range(args.warmup):  # untimed again: the reference's ~0.4 s of
                run()  # single-threaded Python leaves the miner's threads asleep
        for _ in range(args.repeats * (r + 1) // rounds - args.repeats * r // rounds):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
    return (statistics.median(times) * 1e3, out[3],
            statistics.median(ref_times) * 1e3 if reference else None, ref_hard)


def size_warmup(n_cells: int, n_labels: int, args, device: str) -> None:
    """Mine one batch of the largest size before any timing.

    glibc sizes its heap policy from the largest blocks a process has freed (its dynamic
    mmap and trim thresholds): until a block as large as a B×B distance matrix has been
    freed once, freeing a call's temporaries hands their pages back to the OS and the next
    call faults them in again, a few ms at B = 1,000. A training process is past that after
    its first step; without this warm-up a row's time would depend on which sizes the
    benchmark happened to run before it."""
    emb, labels, studies, desc = make_batch(n_cells, n_labels, args.studies, args.dim,
                                            args.noise, 0.0, args.seed)
    mine_triplets(*(torch.from_numpy(x).to(device) for x in (emb, labels, studies, desc)),
                  margin=args.margin, selection=args.selection)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(emb, labels, studies, desc, args, device: str) -> float | None:
    """Peak memory one miner call adds on top of its inputs, MiB (None if not measurable).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's allocator is invisible to
    tracemalloc, so a fresh process (glibc told to mmap every block over 128 KiB, so that
    freed memory is not silently reused) resets the kernel's peak-RSS mark
    (``/proc/self/clear_refs``, Linux) and reads how far one call raises it.
    """
    if device == "cuda":
        tensors = [torch.from_numpy(x).cuda() for x in (emb, labels, studies, desc)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mine_triplets(*tensors, margin=args.margin, selection=args.selection)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.npz")
        np.savez(path, emb=emb, labels=labels, studies=studies, desc=desc)
        cmd = [sys.executable, __file__, "--_memory-probe", path, "--margin", str(args.margin),
               "--selection", args.selection, "--threads", str(torch.get_num_threads())]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]) if out.returncode == 0 and lines and lines[-1] != "None" else None


def _memory_probe(path: str, args) -> None:
    data = np.load(path)
    tensors = [torch.from_numpy(data[k]) for k in ("emb", "labels", "studies", "desc")]
    small = [t[:64] if t.ndim == 1 or t.shape[0] == tensors[0].shape[0] else t for t in tensors]
    mine_triplets(*small, margin=args.margin, selection=args.selection)  # one-time setup
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print("None")
        return
    base = _proc_status_kib("VmRSS")
    mine_triplets(*tensors, margin=args.margin, selection=args.selection)
    print((_proc_status_kib("VmHWM") - base) / 1024)


def breakdown(args) -> None:
    """CPU only: where one call's time goes, per batch of ``--sizes``/``--labels``/``--skews``.

    Medians of ``--repeats`` rounds, each: the distance product, the compiled row pass on 1
    and on all torch threads (inputs prepared beforehand; each right after a distance product,
    as in a call), and the whole ``mine_triplets`` call."""
    threads = torch.get_num_threads()
    print(f"| skew | B | labels | distances ms | row pass, 1 thread ms | row pass, {threads} "
          "threads ms | whole call ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for skew in args.skews:
        for n_labels in args.labels:
            for n_cells in args.sizes:
                batch = make_batch(n_cells, n_labels, args.studies, args.dim, args.noise, skew,
                                   args.seed)
                ms = _stage_times(*batch, args, threads)
                print(f"| {skew:g} | {n_cells} | {n_labels} | {ms['dist']:.2f} | {ms[1]:.2f} | "
                      f"{ms[threads]:.2f} | {ms['call']:.2f} |", flush=True)


def _stage_times(emb, labels, studies, desc, args, threads: int) -> dict:
    """``breakdown``'s medians (ms) for one batch: "dist", 1, ``threads``, "call"."""
    from scimtrain.mining import cpu_path
    from scimtrain.mining.distances import checked_distances

    mode = cpu_path.MODES[args.selection]
    e = torch.from_numpy(emb)
    tensors = [torch.from_numpy(x) for x in (emb, labels, studies, desc)]
    pair_start, positive = cpu_path.same_label_pairs(labels, studies, len(desc))
    rows, table = cpu_path.candidate_table(labels, labels, desc)
    u = np.random.default_rng(args.seed).random(len(positive), dtype=np.float32)
    dist = checked_distances(e).numpy()
    times: dict = {}

    def timed(name, fn, *fn_args, **fn_kwargs):
        t0 = time.perf_counter()
        fn(*fn_args, **fn_kwargs)
        times.setdefault(name, []).append(time.perf_counter() - t0)

    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            times.clear()
        timed("dist", checked_distances, e)
        for t in (1, threads):
            checked_distances(e)
            timed(t, cpu_path.mine_rows, dist, table, rows, pair_start, positive,
                  args.margin, u, mode, t)
        timed("call", mine_triplets, *tensors, margin=args.margin, selection=args.selection)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000],
                   help="batch sizes B")
    p.add_argument("--labels", type=int, nargs="+", default=[20, 100], help="labels per batch")
    p.add_argument("--studies", type=int, default=10,
                   help="studies per batch (cross-study rule on)")
    p.add_argument("--selection", default="semihard", choices=["semihard", "hardest", "random"])
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--noise", type=float, default=2.0, help="within-label spread (see make_batch)")
    p.add_argument("--skews", type=float, nargs="+", default=[0.0, 1.0],
                   help="label frequency ∝ 1/rank**skew: 0 = uniform (fewest pairs), 1 = "
                        "Zipf-like, as batches drawn from a real atlas")
    p.add_argument("--repeats", type=int, default=30, help="timed vectorised calls (median)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed vectorised calls first, and again after each reference run")
    p.add_argument("--reference-repeats", type=int, default=3,
                   help="timed reference runs (median), with the vectorised calls between them")
    p.add_argument("--skip-reference-above", type=int, default=None, metavar="B",
                   help="do not run the loop reference for batches larger than B")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="default: cpu, plus cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--no-size-warmup", action="store_true",
                   help="do not mine one batch of the largest size before timing (see "
                        "size_warmup)")
    p.add_argument("--breakdown", action="store_true",
                   help="CPU only: time the distance product, the row pass (1 and all threads) "
                        "and the whole call instead of comparing with the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_probe:
        _memory_probe(args._memory_probe, args)
        return
    if args.breakdown:
        breakdown(args)
        return
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print(f"selection={args.selection} margin={args.margin} studies={args.studies} "
          f"dim={args.dim} noise={args.noise} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()}"
          + (f" gpu={torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print()
    print("| device | skew | B | labels | pairs | loop reference (CPU) ms | vectorised ms "
          "| speed-up | peak extra MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference_ms: dict[tuple[float, int, int], float] = {}
    configs = [(s, n_labels, n_cells) for s in args.skews for n_labels in args.labels
               for n_cells in args.sizes]
    for device in devices:
        if not args.no_size_warmup:
            size_warmup(max(args.sizes), max(args.labels), args, device)
        for skew, n_labels, n_cells in configs:
            emb, labels, studies, desc = make_batch(n_cells, n_labels, args.studies,
                                                    args.dim, args.noise, skew, args.seed)
            pairs = sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(labels))
            key = (skew, n_cells, n_labels)
            with_reference = key not in reference_ms and (
                args.skip_reference_above is None or n_cells <= args.skip_reference_above)
            vec_ms, vec_hard, ref_ms, ref_hard = time_both(emb, labels, studies, desc, args,
                                                           device, with_reference)
            if with_reference:
                reference_ms[key] = ref_ms
                # float32 vs float64 distances may flip a near-tie; flag real disagreement
                if abs(ref_hard - vec_hard) > 1e-4 * max(ref_hard, 1):
                    print(f"WARNING: num_hard differs: reference {ref_hard}, "
                          f"vectorised {vec_hard}", file=sys.stderr)
            ref = reference_ms.get(key)
            mem = None if args.no_memory else peak_extra_mib(emb, labels, studies, desc,
                                                             args, device)
            mem = "n/a" if mem is None else f"{mem:.1f}"
            print(f"| {device} | {skew:g} | {n_cells} | {n_labels} | {pairs} | "
                  f"{'skipped' if ref is None else f'{ref:.0f}'} | {vec_ms:.2f} | "
                  f"{'' if ref is None else f'{ref / vec_ms:.0f}x'} | {mem} |", flush=True)
    print()
    print("pairs: same-label pairs before the cross-study rule. Reference: median of "
          "--reference-repeats runs, always on the CPU (on the first device's pass); "
          "vectorised: median of --repeats calls, in rounds between the reference runs.")


if __name__ == "__main__":
    main()
