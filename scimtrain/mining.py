"""Ontology-aware triplet mining (SPEC §5) without a per-pair loop.

Same pairs, candidates, hard/viable counts and selection windows as SCimilarity's loop, in a
few passes over the batch's distance matrix and O(pairs) steps; no sort of the matrix.

For a pair (a, p) with d = D[a,p] and t = d + margin, a candidate negative x of anchor a is
hard when x < t and in the semihard window when also x > d. Those pair thresholds are the
row's *boundaries*; a candidate's *cell* is its row's offset plus the number of boundaries
below it. A pair's hard candidates then fill the row's cells up to t's, its window the cells
after (the float after) d's up to t's, so with the candidates lined up cell after cell both are
one run, and a uniform pick inside it is one index.

On the CPU, ``mining_cpu`` does it in compiled loops, one anchor row at a time. On other
devices (CUDA) the same steps run as torch tensor operations, a block of anchor rows at a time:

1. the candidates below their row's largest boundary (the rest are past every boundary: never
   hard, never picked), row after row;
2. exact cells without sorting: a monotone bucket key per row (``trunc(max(x, lo) * scale +
   offset)``, at least 256 buckets per row, 4 per boundary) indexes the boundaries counted
   per bucket (one counting sort of the boundaries); a value compares only with the few
   boundaries of its own bucket;
3. one stable sort by cell lines the candidates up, and its counts give each cell's start;
4. per pair, the cells of its own boundaries give its hard count, its window and, with one
   uniform number, its negative; ``hardest`` takes each row's closest candidate.

Both line candidates up by (cell, column), so given the same distances they pick the same
negatives for the same generator numbers: the picks do not depend on the path, the threads, the
block size or the bucket counts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["SELECTIONS", "mine_triplets", "squared_distances"]

SELECTIONS = ("semihard", "hardest", "random")

# Coarse buckets per anchor row. Speed only: more buckets mean fewer values to compare
# exactly but a larger lookup table.
_BUCKETS = 256
_BUCKETS_PER_BOUNDARY = 4  # rows with many boundaries get more buckets...
_MAX_BUCKETS = 4096  # ... up to this many

# Which miner runs on the CPU: "compiled" (mining_cpu, default) or "torch" (the tensor path
# that CUDA runs), read at every call so a benchmark can compare them in one training step.
CPU_MINER_ENV = "SCIMTRAIN_CPU_MINER"
CPU_MINERS = ("compiled", "torch")


def _cpu_miner() -> str:
    name = os.environ.get(CPU_MINER_ENV, "compiled")
    if name not in CPU_MINERS:
        raise ValueError(f"{CPU_MINER_ENV} must be one of {CPU_MINERS}, got {name!r}")
    return name


# ----------------------------------------------------------------------------- validation


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """B×d → B×B squared Euclidean distances ``|x|² + |y|² - 2x·y``, as SCimilarity's ``pdist``.

    Not clamped at 0, so values match SCimilarity's ``pdist`` to rounding. From B = 256 on, the
    lower-left quarter is the transpose of the upper-right one (the product is symmetric):
    an eighth less arithmetic, and the matrix is exactly symmetric off the diagonal blocks.
    """
    return _distances(embeddings, (embeddings * embeddings).sum(dim=1))


_HALVES_FROM = 256  # batch size from which the distance product skips its lower-left quarter


def _distances(embeddings: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``squared_distances`` given the squared norms ``sq``."""
    n = embeddings.shape[0]
    if n < _HALVES_FROM:
        return torch.addmm(sq[None, :], embeddings, embeddings.T, alpha=-2.0).add_(sq[:, None])
    out = torch.empty((n, n), dtype=embeddings.dtype, device=embeddings.device)
    h = n // 2
    for r0, r1 in ((0, h), (h, n)):  # rows r0:r1 against columns r0: (BLAS writes in place)
        block = out[r0:r1, r0:]
        torch.addmm(sq[None, r0:], embeddings[r0:r1], embeddings[r0:].T, alpha=-2.0, out=block)
        block.add_(sq[r0:r1, None])
    out[h:, :h].copy_(out[:h, h:].T)
    return out


def _bool_matrix(matrix: torch.Tensor | np.ndarray, name: str,
                 device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"{name} must be a square L×L matrix over the label positions, "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.bool:
        t = t != 0
    return t.to(device)


def _label_tensor(labels: torch.Tensor | np.ndarray, name: str, n: int, n_labels: int,
                  device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(labels, device=device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per embedding row ({n}), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer label positions, got dtype {t.dtype}")
    t = t.long()
    if n:
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= n_labels:
            raise ValueError(
                f"{name} must be positions into the {n_labels}×{n_labels} descendant/parent "
                f"matrix (0..{n_labels - 1}), got values in [{low}, {high}]"
            )
    return t


def _check_embeddings(embeddings: torch.Tensor) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError(
            "embeddings must be a 2-D tensor (cells × latent_dim), got "
            f"{type(embeddings).__name__} of shape {tuple(getattr(embeddings, 'shape', ()))}"
        )


def _check_margin(margin: float) -> float:
    if not float(margin) > 0:
        raise ValueError(f"margin must be > 0 (SCimilarity's default is 0.05), got {margin}")
    return float(margin)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's own device (a CUDA generator cannot fill a CPU tensor and
    # vice versa). float32: half the generator's work of float64, and 2^-24 steps are fine
    # enough for windows of any batch; both paths multiply in float64 (exact), so they floor
    # alike.
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return u.to(device)


# ----------------------------------------------------------------------------- torch path


class _TorchOps:
    """The array operations of the torch path (``_mine``), on tensors of any device."""

    i32, i64, f64 = torch.int32, torch.int64, torch.float64
    index = torch.int64
    chunk_elements = 1 << 22

    @staticmethod
    def cast(x, dtype):
        return x.to(dtype)

    @staticmethod
    def arange(n, like):
        return torch.arange(n, device=like.device)

    @staticmethod
    def cat(parts):
        return torch.cat(parts)

    @staticmethod
    def take(x, index):
        return x.reshape(-1)[index]

    @staticmethod
    def where(cond, x, y):
        return torch.where(cond, x, y)

    @staticmethod
    def minimum(x, y):
        return torch.minimum(x, y)

    @staticmethod
    def maximum_(x, y):
        return torch.maximum(x, y, out=x)

    @staticmethod
    def segment_sum(flags, starts):
        segment = torch.repeat_interleave(torch.arange(starts.shape[0] - 1, device=flags.device),
                                          starts[1:] - starts[:-1], output_size=flags.shape[0])
        return torch.zeros(starts.shape[0] - 1, dtype=torch.long, device=flags.device) \
            .index_add_(0, segment, flags.long())

    @staticmethod
    def eps(dtype):
        return float(torch.finfo(dtype).eps)

    @staticmethod
    def nonzero(mask):
        return torch.nonzero(mask.reshape(-1)).squeeze(1)

    @staticmethod
    def repeat(values, counts):
        return torch.repeat_interleave(values, counts)

    @staticmethod
    def bincount(x, n):
        return torch.bincount(x, minlength=n)

    @staticmethod
    def offsets(counts):
        return torch.nn.functional.pad(counts.cumsum(0), (1, 0))

    @staticmethod
    def searchsorted(sorted_values, values):
        return torch.searchsorted(sorted_values, values)

    @staticmethod
    def argsort_stable(x):
        return torch.argsort(x, stable=True)

    @staticmethod
    def nextafter(x, up: bool):
        return torch.nextafter(x, torch.full_like(x, math.inf if up else -math.inf))

    @staticmethod
    def full(n, value, like):
        return torch.full((n,), value, dtype=like.dtype, device=like.device)

    @staticmethod
    def isfinite(x):
        return torch.isfinite(x)

    @staticmethod
    def row_extreme(values, starts, counts, n_rows, fill, largest: bool):
        rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts,
                                       output_size=values.shape[0])
        out = torch.full((n_rows,), fill, dtype=values.dtype, device=values.device)
        return out.scatter_reduce_(0, rows, values, "amax" if largest else "amin")

    @staticmethod
    def group(keys, n_keys, values):
        sorted_keys, order = torch.sort(keys, stable=True)
        # Starts by binary search rather than bincount: deterministic on CUDA too.
        return values[order], torch.searchsorted(
            sorted_keys, torch.arange(n_keys + 1, device=keys.device))

    @staticmethod
    def from_torch(t: torch.Tensor) -> torch.Tensor:
        return t.detach()


# ----------------------------------------------------------------------------- batch structure


def _same_label_pairs(ops, lab, studies):
    """All (anchor, positive) with equal labels and anchor < positive (and, with studies,
    different studies), in (anchor, positive) order. O(pairs) work, no B×B mask."""
    n = lab.shape[0]
    order = ops.argsort_stable(lab)  # cells grouped by label, ascending index inside
    group_end = ops.offsets(ops.bincount(lab, 0))[1:]
    idx = ops.arange(n, lab)
    place = ops.full(n, 0, idx)
    place[order] = idx  # each cell's slot in `order`
    later = group_end[lab] - place - 1  # same-label cells after it: its positives
    first = ops.offsets(later)
    # the k-th positive of a cell sits k + 1 slots after it in `order`
    slot = ops.repeat(place + 1 - first[:-1], later) + ops.arange(int(first[-1]), lab)
    anchor, positive = ops.repeat(idx, later), ops.take(order, slot)
    if studies is not None:
        keep = ops.nonzero(ops.repeat(studies, later) != ops.take(studies[order], slot))
        anchor, positive = ops.take(anchor, keep), ops.take(positive, keep)
    return anchor, positive


def _candidate_table(ops, lab, neg_lab, desc):
    """Which cells are candidate negatives for an anchor of each label present.

    Returns ``lab`` renumbered to the L' labels present and ``table`` (L'×B bool): ``[x, n]``
    is True when cell n's label is not x and its negative label (its label, or its original
    label after perturbation, as in SCimilarity) is not a strict ontology ancestor or
    descendant of x.
    """
    n_labels = desc.shape[0]
    present = ops.nonzero(ops.bincount(ops.cat([lab, neg_lab]), n_labels))
    renumber = ops.full(n_labels, 0, lab)
    renumber[present] = ops.arange(present.shape[0], lab)
    lab, neg_lab = renumber[lab], renumber[neg_lab]
    sub = desc[present][:, present]
    excluded = (sub | sub.T)[:, neg_lab]
    excluded |= ops.arange(present.shape[0], lab)[:, None] == lab[None, :]
    return lab, ~excluded


# ----------------------------------------------------------------------------- the miner


class _Bins:
    """Exact bins of values among each anchor row's boundaries, without sorting the values.

    ``cells(values, keys)`` gives the cell ``r + (boundaries of earlier rows) + #{row r's
    boundaries <= value}`` of each value of row r: row r's cells follow row r - 1's, with one
    cell more than the row has boundaries.

    A value's key is a bucket monotone in the value within its row (``keys``): a value in a
    lower bucket than a boundary is below it, in a higher one above it. The boundaries are
    lined up bucket after bucket (one counting sort), with one +inf boundary in a key reserved
    at the end of each row, so a bucket's first boundary sits at the position that is the cell
    of the bucket's lowest values; a value adds the boundaries of its own bucket that are <=
    it. A bucket rarely holds more than one; comparing against the next position instead when
    it holds none is harmless, as that boundary lies in a higher bucket.
    """

    def __init__(self, ops, bound_parts, part_count, lo, hi, n_rows: int, buckets: int,
                 per_bound: int = _BUCKETS_PER_BOUNDARY) -> None:
        """``bound_parts``: arrays of boundaries, each row after row with ``part_count`` per
        row; ``lo``/``hi``: each row's smallest and largest boundary. A row gets ``buckets``
        buckets, or ``per_bound`` per boundary when it has many."""
        self.ops = ops
        n_buckets = ops.minimum(ops.maximum_(part_count * (per_bound * len(bound_parts)),
                                             ops.full(n_rows, buckets, part_count)),
                                ops.full(n_rows, _MAX_BUCKETS, part_count))
        row_base = ops.offsets(n_buckets + 1)  # one reserved key at the end of each row
        # key = trunc(max(x, lo) * scale + offset) maps [lo, hi] onto row r's keys
        # row_base[r] + [1, n_buckets[r] - 1]; every value is <= hi (candidates were taken
        # below it), so the reserved key row_base[r] + n_buckets[r] is never reached.
        span = hi - lo
        usable = ops.isfinite(span) & (span > 0)  # else one bucket for the row
        span, lo = ops.where(usable, span, 1.0), ops.where(usable, lo, 0.0)
        ftype = lo.dtype
        if (float((abs(ops.where(usable, hi, 0.0)) * n_buckets / span).max()) * ops.eps(ftype)
                > 0.05 or int(row_base[-1]) >= 2 ** 21):
            # float32 would blur the buckets (embeddings far from unit length) or the keys.
            ftype = ops.f64
            span, lo = ops.cast(span, ftype), ops.cast(lo, ftype)
        scale = ops.cast(n_buckets - 2, ftype) / span
        usable &= ops.isfinite(scale)  # a subnormal span overflows it: one bucket as well
        self.ftype, self.lo = ftype, ops.where(usable, lo, 0.0)
        self.scale = ops.where(usable, scale, 0.0)
        self.offset = 1 - self.lo * self.scale + ops.cast(row_base[:-1], ftype)

        reserved = row_base[:-1] + n_buckets
        keys = ops.cat([self.keys(b, part_count) for b in bound_parts]
                       + [ops.cast(reserved, ops.index)])
        values = ops.cat(list(bound_parts) + [ops.full(n_rows, math.inf, bound_parts[0])])
        self.bounds, start = ops.group(keys, int(row_base[-1]), values)
        # Per bucket: the position of its first boundary, times 2, + 1 if it holds several.
        several = (start[1:] - start[:-1]) > 1
        self.lookup = start[:-1]
        self.lookup *= 2
        self.lookup += several
        # Each boundary's cell as a value: the boundaries of its row below it, i.e. its
        # bucket's first position plus the boundaries of its bucket below it.
        n_bounds = keys.shape[0] - n_rows
        self.bound_cells = self._count(values[:n_bounds], keys[:n_bounds], strict=True)

    def keys(self, values, row_count, r0: int = 0, r1: int | None = None):
        """Bucket keys of values grouped row after row, ``row_count`` per row of rows
        ``r0:r1``.

        The same separate operations for every value (no fused multiply-add) keep the key
        monotone in the value within a row, whatever the rounding."""
        ops = self.ops
        y = ops.repeat(self.lo[r0:r1], row_count)
        y = ops.maximum_(y, ops.cast(values, self.ftype))
        y *= ops.repeat(self.scale[r0:r1], row_count)
        y += ops.repeat(self.offset[r0:r1], row_count)
        return ops.cast(y, ops.index)

    def cells(self, values, keys):
        """Cells of ``values`` (their buckets ``keys``)."""
        return self._count(values, keys, strict=False)

    def _count(self, values, keys, strict: bool):
        # first position of the bucket + #{its boundaries <= value} (< value when strict)
        ops = self.ops
        cell = ops.take(self.lookup, keys)
        crowded = ops.nonzero((cell & 1) != 0)
        cell >>= 1
        first = ops.take(cell, crowded)
        below = ops.take(self.bounds, cell)
        cell += below < values if strict else below <= values
        if crowded.shape[0]:  # buckets with several boundaries: compare with the others too
            others = ops.take(self.lookup, ops.take(keys, crowded) + 1) >> 1  # the next key is
            others -= first + 1                                                # in the row
            start = ops.offsets(others)
            member = ops.repeat(first + 1 - start[:-1], others) + ops.arange(int(start[-1]), keys)
            b, v = ops.take(self.bounds, member), ops.repeat(ops.take(values, crowded), others)
            cell[crowded] += ops.segment_sum(b < v if strict else b <= v, start)
        return cell


def _candidate_positions(ops, dist, hi, cand):
    """Positions (row-major) and values of the candidates below their row's ``hi``."""
    mask = dist < hi[:, None]
    mask &= cand
    flat = ops.nonzero(mask)
    del mask
    row_start = ops.searchsorted(flat, ops.arange(dist.shape[0] + 1, hi) * dist.shape[1])
    return flat, row_start, ops.take(dist, flat)


def _closest(ops, flat, row_start, x, width):
    """Per row of a block: the smallest candidate value (inf if none) and its column, the
    lowest among ties (candidates are in column order)."""
    n_rows = row_start.shape[0] - 1
    row_count = row_start[1:] - row_start[:-1]
    best = ops.row_extreme(x, row_start, row_count, n_rows, math.inf, largest=False)
    hit = ops.nonzero(x == ops.repeat(best, row_count))
    if not hit.shape[0]:
        return best, ops.full(n_rows, 0, row_start)
    first = hit[ops.searchsorted(hit, row_start[:-1]).clip(0, hit.shape[0] - 1)]
    return best, flat[first] - ops.arange(n_rows, row_start) * width  # (garbage where none)


@torch.no_grad()
def mine_triplets(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    studies: torch.Tensor | None,
    descendant: torch.Tensor | np.ndarray,
    *,
    margin: float,
    selection: str,
    generator: torch.Generator | None = None,
    negative_labels: torch.Tensor | None = None,
    dummy_triplet: bool = True,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Mine one negative per anchor-positive pair of a batch (SPEC §5).

    Args:
        embeddings: B×d embeddings (any float dtype; half precision is mined in float32).
        labels: B int label positions into ``descendant``.
        studies: B int study ids, or None for no cross-study rule. When given, a pair's two
            cells must come from different studies.
        descendant: L×L bool (tensor or numpy), ``[i, j]`` True when label j is a strict
            descendant of label i. A negative's label must be neither the anchor's label nor
            an ancestor or descendant of it.
        margin: triplet margin (> 0), on squared distances for mining as in SCimilarity.
        selection: ``"semihard"`` (uniform among 0 < v < margin), ``"hardest"`` (argmax v
            if v > 0, the lowest index among ties) or ``"random"`` (uniform among v > 0),
            with v = D[a,p] - D[a,n] + margin.
        generator: the only source of randomness (semihard, random). Numbers are drawn on
            its device, so a CPU or CUDA generator works with embeddings on either.
        negative_labels: labels used only to exclude ontology-related negatives; defaults to
            ``labels``. After label perturbation SCimilarity excludes negatives by the
            cells' original labels, so ``compute_loss`` passes those here.
        dummy_triplet: when no pair gets a negative, return SCimilarity's single dummy
            triplet (0, 0, 0) (its loss equals the margin); False returns empty tensors.
        chunk_elements: off the CPU, work on blocks of anchor rows of at most this many
            row × batch elements (default 2^22; the CPU goes one row at a time); results do
            not depend on it.

    Returns:
        ``(anchor, positive, negative, num_hard, num_viable)``: three int64 index tensors on
        the embeddings' device, ordered by (anchor, positive), and two python ints:
        ``num_hard`` = number of (pair, candidate) with v > 0, ``num_viable`` = number of
        (pair, candidate). A sampled negative is uniform over its pair's window; which one a
        given generator state picks is the same on every device and for any chunking.
    """
    _check_embeddings(embeddings)
    margin = _check_margin(margin)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    device = embeddings.device
    n = embeddings.shape[0]
    desc = _bool_matrix(descendant, "descendant", device)
    lab = _label_tensor(labels, "labels", n, desc.shape[0], device)
    neg_lab = lab if negative_labels is None else _label_tensor(
        negative_labels, "negative_labels", n, desc.shape[0], device)
    st = None
    if studies is not None:
        st = torch.as_tensor(studies, device=device)
        if st.ndim != 1 or st.shape[0] != n:
            raise ValueError(
                f"studies must be None or a 1-D tensor with one entry per embedding row ({n}), "
                f"got shape {tuple(st.shape)}"
            )
    if device.type == "cpu" and _cpu_miner() == "compiled":
        return _mine_cpu(embeddings, lab, neg_lab, st, desc, margin, selection, generator,
                         dummy_triplet=dummy_triplet)
    return _mine(_TorchOps, embeddings, lab, neg_lab, st, desc, margin, selection, generator,
                 dummy_triplet=dummy_triplet, chunk_elements=chunk_elements)


def _finish(a, p, neg, hard, viable, device, dummy_triplet: bool):
    """The miner's return value: int64 index tensors on ``device``, ints; the dummy triplet
    when no pair got a negative."""
    a, p, neg = (torch.as_tensor(t, dtype=torch.long, device=device) for t in (a, p, neg))
    if a.numel() == 0 and dummy_triplet:
        a = p = neg = torch.zeros(1, dtype=torch.long, device=device)
    return a, p, neg, int(hard), int(viable)


def _checked_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """``squared_distances`` of the detached embeddings (half precision in float32), after
    refusing non-finite or overflowing ones."""
    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    sq = (emb * emb).sum(dim=1)
    if not float(sq.max()) <= torch.finfo(emb.dtype).max / 8:
        raise ValueError(
            "embeddings contain NaN/inf or values too large to square (has the model "
            "diverged?): triplet mining needs finite distances")
    return _distances(emb, sq)


def _mine_cpu(embeddings, lab, neg_lab, st, desc, margin, selection, generator, *,
              dummy_triplet: bool, threads: int | None = None):
    """``mine_triplets`` after validation, on the CPU (``mining_cpu``'s compiled kernels)."""
    from . import mining_cpu  # imported on first use: GPU runs never load numba

    device = embeddings.device
    pair_start, positive = mining_cpu.same_label_pairs(
        lab.numpy(), None if st is None else st.numpy(), desc.shape[0])
    n_pairs = positive.shape[0]
    if n_pairs == 0:
        return _finish(positive, positive, positive, 0, 0, device, dummy_triplet)
    # One number per pair in (anchor, positive) order, drawn up front (as the torch path).
    u = None if selection == "hardest" else _uniform(n_pairs, generator, device).numpy()
    rows, table = mining_cpu.candidate_table(lab.numpy(), neg_lab.numpy(), desc.numpy())
    dist = _checked_distances(embeddings).numpy()
    a, p, negative, num_hard, num_viable = mining_cpu.mine_rows(
        dist, table, rows, pair_start, positive, margin, u, mining_cpu.MODES[selection],
        threads)
    return _finish(a, p, negative, num_hard, num_viable, device, dummy_triplet)


def _mine(ops, embeddings, lab, neg_lab, st, desc, margin, selection, generator, *,
          dummy_triplet: bool, chunk_elements: int | None, buckets: int = _BUCKETS,
          per_bound: int = _BUCKETS_PER_BOUNDARY):
    """``mine_triplets`` after validation, as torch tensor operations on ``embeddings``'
    device (what CUDA runs; the tests also run it on the CPU against ``_mine_cpu``)."""
    device = embeddings.device
    n = embeddings.shape[0]

    def finish(a, p, neg, hard, viable):
        return _finish(a, p, neg, hard, viable, device, dummy_triplet)

    lab_x, neg_lab_x, desc_x = (ops.from_torch(t) for t in (lab, neg_lab, desc))
    st_x = None if st is None else ops.from_torch(st)
    a, positive = _same_label_pairs(ops, lab_x, st_x)  # anchors ascending
    n_pairs = a.shape[0]
    if n_pairs == 0:
        return finish(a, a, a, 0, 0)
    # One number per pair in (anchor, positive) order, drawn up front.
    u = None if selection == "hardest" else ops.from_torch(_uniform(n_pairs, generator, device))
    lab_x, table = _candidate_table(ops, lab_x, neg_lab_x, desc_x)
    num_viable = int((ops.bincount(lab_x[a], table.shape[0]) * table.sum(1)).sum())

    dist = ops.from_torch(_checked_distances(embeddings))
    d_ap = ops.take(dist, a * n + positive)

    # Each pair's boundaries: a candidate x is hard when x < thr, in the semihard window
    # when also x > d, i.e. x >= above_d.
    semihard = selection == "semihard"
    thr = d_ap + margin
    if semihard:
        above_d = ops.nextafter(d_ap, up=True)
        bounds = (above_d, thr)
    else:
        bounds = (thr,)
    pair_count = ops.bincount(a, n)
    pair_start = ops.offsets(pair_count)
    lo = ops.row_extreme(bounds[0], pair_start, pair_count, n, math.inf, largest=False)
    hi = ops.row_extreme(bounds[-1], pair_start, pair_count, n, -math.inf, largest=True)
    if semihard:  # above_d passes thr only when the margin is below d's rounding step
        hi = ops.maximum_(hi, ops.row_extreme(above_d, pair_start, pair_count, n, -math.inf,
                                              largest=True))
    bins = _Bins(ops, bounds, pair_count, lo, hi, n, buckets, per_bound)
    # A value is below a boundary exactly when its cell is at most the boundary's own
    # (counting only lower boundaries): a pair's hard candidates fill the cells up to its
    # thr's, its semihard window the cells after its above_d's up to its thr's.
    edge_cell = ops.cast(bins.bound_cells, ops.i64)
    # Row r's cells: row_cell[r] (bin 0) to row_cell[r + 1] - 1.
    row_cell = pair_start * len(bounds) + ops.arange(n + 1, a)

    # The candidates, block of anchor rows after block: below their row's largest boundary
    # (larger ones are past every boundary: never hard, never picked), binned, and lined up
    # cell after cell (row, then bin; column order inside a cell).
    if chunk_elements is None:
        chunk_elements = ops.chunk_elements
    rows_per_block = max(1, int(chunk_elements) // max(n, 1))
    position_type = ops.i32 if n * n < 2 ** 31 else ops.i64
    lined_up, cell_start, closest, n_lined, num_hard = [], [], [], 0, 0
    for r0 in range(0, n, rows_per_block):
        r1 = min(r0 + rows_per_block, n)
        flat, row_start, x = _candidate_positions(ops, dist[r0:r1], hi[r0:r1],
                                                  table[lab_x[r0:r1]])
        row_count = row_start[1:] - row_start[:-1]
        cell = bins.cells(x, bins.keys(x, row_count, r0, r1))
        if selection == "hardest":
            # Hard (pair, candidate): per candidate, the thresholds of its row above it, i.e.
            # its row's pairs minus its bin.
            num_hard += int((row_count * (pair_count[r0:r1] + row_cell[r0:r1])).sum()
                            - ops.cast(cell, ops.i64).sum())
            closest.append(_closest(ops, flat, row_start, x, n))
            continue
        c0, c1 = int(row_cell[r0]), int(row_cell[r1])
        flat = ops.cast(flat, position_type) + r0 * n  # position in the batch
        flat, starts = ops.group(cell - c0, c1 - c0, flat)
        lined_up.append(flat)
        cell_start.append(ops.cast(starts[:-1], ops.i64) + n_lined)
        n_lined += flat.shape[0]

    if selection == "hardest":  # the row's closest candidate, if below the pair's thr
        best, column = (ops.cat(c) for c in zip(*closest))
        kept = ops.nonzero(best[a] < thr)
        return finish(a[kept], positive[kept], column[a[kept]], num_hard, num_viable)

    cell_start = ops.cat(cell_start + [ops.full(1, n_lined, row_cell)])
    lined_up = ops.cat(lined_up)
    row_first = ops.take(cell_start, row_cell[a])
    end = ops.take(cell_start, edge_cell[n_pairs * (len(bounds) - 1):] + 1)
    num_hard = int((end - row_first).sum())
    start = ops.take(cell_start, edge_cell[:n_pairs] + 1) if semihard else row_first
    # One uniform pick per pair inside its run [start, end) of lined-up candidates.
    size = end - start
    kept = ops.nonzero(size > 0)
    size = size[kept]
    j = ops.minimum(ops.cast(ops.cast(u[kept], ops.f64) * size, ops.i64), size - 1)
    a, positive = a[kept], positive[kept]
    negative = ops.cast(ops.take(lined_up, ops.take(start, kept) + j), ops.i64) - a * n
    return finish(a, positive, negative, num_hard, num_viable)
