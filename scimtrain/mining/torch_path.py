"""The torch path: mining as torch tensor operations on the embeddings' device (what CUDA
runs; ``SCIMTRAIN_CPU_MINER=torch`` runs it on the CPU too), a block of anchor rows at a time:

1. the candidates below their row's largest boundary (the rest are past every boundary: never
   hard, never picked), row after row;
2. exact intervals without sorting (``bins.Bins``): a monotone bucket key per row indexes the
   boundaries counted per bucket; a value compares only with the few boundaries of its own
   bucket;
3. one stable sort by interval lines the candidates up, and its counts give each interval's
   start;
4. per pair, the intervals of its own boundaries give its hard count, its window and, with one
   uniform number, its negative; ``hardest`` takes each row's closest candidate.

Candidates are lined up by (interval, column), as in the CPU path, so given the same distances
the same generator numbers pick the same negatives on every device and path, for any block
size or bucket count.
"""

from __future__ import annotations

import math

import torch

from .batch import candidate_table, same_label_pairs
from .bins import BUCKETS, BUCKETS_PER_BOUNDARY, Bins
from .checks import uniform
from .distances import checked_distances
from .segments import group, nonzero, offsets, row_extreme

__all__ = ["CHUNK_ELEMENTS", "Triplets", "mine"]

CHUNK_ELEMENTS = 1 << 22  # default block: anchor rows × batch elements (memory, not results)

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]


def mine(embeddings: torch.Tensor, lab: torch.Tensor, neg_lab: torch.Tensor,
         st: torch.Tensor | None, desc: torch.Tensor, margin: float, selection: str,
         generator: torch.Generator | None, *, dummy_triplet: bool,
         chunk_elements: int = CHUNK_ELEMENTS, buckets: int = BUCKETS,
         per_bound: int = BUCKETS_PER_BOUNDARY) -> Triplets:
    """``mine_triplets`` on checked inputs (``buckets``/``per_bound``: see ``bins.Bins``;
    speed only, so the tests vary them)."""
    device = embeddings.device
    n = embeddings.shape[0]

    def finish(a, p, neg, hard, viable):
        """The return value; the dummy triplet when no pair got a negative."""
        if a.numel() == 0 and dummy_triplet:
            a = p = neg = torch.zeros(1, dtype=torch.long, device=device)
        return a, p, neg, int(hard), int(viable)

    a, positive = same_label_pairs(lab, st)  # anchors ascending
    n_pairs = a.shape[0]
    if n_pairs == 0:
        return finish(a, a, a, 0, 0)
    # One number per pair in (anchor, positive) order, drawn up front.
    u = None if selection == "hardest" else uniform(n_pairs, generator, device)
    lab, table = candidate_table(lab, neg_lab, desc)
    num_viable = int((torch.bincount(lab[a], minlength=table.shape[0]) * table.sum(1)).sum())

    dist = checked_distances(embeddings)
    d_ap = dist.reshape(-1)[a * n + positive]

    # Each pair's boundaries: a candidate x is hard when x < thr, in the semihard window
    # when also x > d, i.e. x >= above_d.
    semihard = selection == "semihard"
    thr = d_ap + margin
    if semihard:
        above_d = torch.nextafter(d_ap, torch.full_like(d_ap, math.inf))
        bounds = (above_d, thr)
    else:
        bounds = (thr,)
    pair_count = torch.bincount(a, minlength=n)
    pair_start = offsets(pair_count)
    lo = row_extreme(bounds[0], pair_count, math.inf, largest=False)
    hi = row_extreme(bounds[-1], pair_count, -math.inf, largest=True)
    if semihard:  # above_d passes thr only when the margin is below d's rounding step
        hi = torch.maximum(hi, row_extreme(above_d, pair_count, -math.inf, largest=True),
                           out=hi)
    bins = Bins(bounds, pair_count, lo, hi, buckets, per_bound)
    # A value is below a boundary exactly when its interval is at most the boundary's own
    # (counting only lower boundaries): a pair's hard candidates fill the intervals up to its
    # thr's, its semihard window the intervals after its above_d's up to its thr's.
    edge = bins.bound_intervals
    # Row r's intervals: row_interval[r] to row_interval[r + 1] - 1.
    row_interval = pair_start * len(bounds) + torch.arange(n + 1, device=device)

    # The candidates, block of anchor rows after block: below their row's largest boundary
    # (larger ones are past every boundary: never hard, never picked), binned, and lined up
    # interval after interval (row, then interval; column order inside an interval).
    rows_per_block = max(1, int(chunk_elements) // max(n, 1))
    position_type = torch.int32 if n * n < 2 ** 31 else torch.int64
    lined_up, interval_start, closest, n_lined, num_hard = [], [], [], 0, 0
    for r0 in range(0, n, rows_per_block):
        r1 = min(r0 + rows_per_block, n)
        flat, row_start, x = _candidate_positions(dist[r0:r1], hi[r0:r1], table[lab[r0:r1]])
        row_count = row_start[1:] - row_start[:-1]
        interval = bins.intervals(x, bins.keys(x, row_count, r0, r1))
        if selection == "hardest":
            # Hard (pair, candidate): per candidate, the thresholds of its row above it, i.e.
            # its row's pairs minus its boundaries below.
            num_hard += int((row_count * (pair_count[r0:r1] + row_interval[r0:r1])).sum()
                            - interval.sum())
            closest.append(_closest(flat, row_start, x, n))
            continue
        i0, i1 = int(row_interval[r0]), int(row_interval[r1])
        flat = flat.to(position_type) + r0 * n  # position in the batch
        flat, starts = group(interval - i0, i1 - i0, flat)
        lined_up.append(flat)
        interval_start.append(starts[:-1] + n_lined)
        n_lined += flat.shape[0]

    if selection == "hardest":  # the row's closest candidate, if below the pair's thr
        best, column = (torch.cat(c) for c in zip(*closest))
        kept = nonzero(best[a] < thr)
        return finish(a[kept], positive[kept], column[a[kept]], num_hard, num_viable)

    interval_start = torch.cat(interval_start + [torch.full((1,), n_lined, device=device)])
    lined_up = torch.cat(lined_up)
    row_first = interval_start[row_interval[a]]
    end = interval_start[edge[n_pairs * (len(bounds) - 1):] + 1]
    num_hard = int((end - row_first).sum())
    start = interval_start[edge[:n_pairs] + 1] if semihard else row_first
    # One uniform pick per pair inside its run [start, end) of lined-up candidates.
    size = end - start
    kept = nonzero(size > 0)
    size = size[kept]
    j = torch.minimum((u[kept].double() * size).long(), size - 1)
    a, positive = a[kept], positive[kept]
    negative = lined_up[start[kept] + j].long() - a * n
    return finish(a, positive, negative, num_hard, num_viable)


def _candidate_positions(dist: torch.Tensor, hi: torch.Tensor, cand: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions (row-major in the block ``dist``), row starts and values of the candidates
    (``cand``) below their row's ``hi``."""
    mask = dist < hi[:, None]
    mask &= cand
    flat = nonzero(mask)
    del mask
    row_start = torch.searchsorted(
        flat, torch.arange(dist.shape[0] + 1, device=dist.device) * dist.shape[1])
    return flat, row_start, dist.reshape(-1)[flat]


def _closest(flat: torch.Tensor, row_start: torch.Tensor, x: torch.Tensor, width: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a block: the smallest candidate value (inf if none) and its column, the
    lowest among ties (candidates are in column order)."""
    n_rows = row_start.shape[0] - 1
    row_count = row_start[1:] - row_start[:-1]
    best = row_extreme(x, row_count, math.inf, largest=False)
    hit = nonzero(x == torch.repeat_interleave(best, row_count))
    if not hit.shape[0]:
        return best, torch.zeros(n_rows, dtype=row_start.dtype, device=row_start.device)
    first = hit[torch.searchsorted(hit, row_start[:-1]).clip(0, hit.shape[0] - 1)]
    # (garbage where a row has none: its best is inf, so no pair keeps it)
    return best, flat[first] - torch.arange(n_rows, device=flat.device) * width
