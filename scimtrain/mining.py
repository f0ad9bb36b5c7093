"""Ontology-aware triplet mining (SPEC §5) without a per-pair loop.

Same pairs, candidates, hard/viable counts and selection windows as SCimilarity's loop; the
work is a few passes over the batch's distance matrix plus O(pairs) steps.

How: per anchor row, the values that matter are the pairs' thresholds ("boundaries"): a
negative x is hard for pair p when ``x < t_p`` (``t_p = D[a,p] + margin``) and in its
semihard window when also ``x > D[a,p]``. Written with the neighbouring floats
(``x > d`` is ``x >= nextafter(d, +inf)``, ``x < t`` is ``x <= nextafter(t, -inf)``), every
test is "boundary <= x", so a candidate's **bin**, the number of its row's boundaries <= x,
decides everything: a pair's hard negatives are the bins up to one index and its window a
run of consecutive bins. Then:

1. keep only candidates below the row's largest threshold (a few tenths of the row);
2. bin them exactly without sorting: a coarse monotone bucket of each value
   (``trunc(x * scale + shift)``, 256 per row) indexes the boundaries counted per bucket, and
   only values sharing a bucket with a boundary (~15%) compare against those few;
3. one stable counting sort by (row, bin) lines the candidates up bin after bin (scipy's
   CSR → CSC transpose on the CPU, ``torch.sort`` elsewhere) and gives where each bin starts;
4. per pair, the bins of its own two boundaries give its hard count, its window size and, with
   one uniform number, the position of its negative; ``hardest`` is the row's closest candidate.

The same code runs on numpy (CPU: faster kernels, and row blocks run in parallel threads) or
on torch tensors (any device). Results do not depend on the backend, the block size or the
bucket resolution.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse
import torch

__all__ = ["SELECTIONS", "mine_triplets", "squared_distances"]

SELECTIONS = ("semihard", "hardest", "random")

# Elements of one block of (anchor rows × batch); bounds the miner's working set.
_CHUNK_ELEMENTS = 1 << 22
# Coarse buckets per anchor row. Speed only: more buckets mean fewer values to compare
# exactly but a larger lookup table.
_BUCKETS = 256
# Blocks smaller than this many (rows × batch) elements are not worth a thread.
_MIN_THREAD_ELEMENTS = 1 << 17


# ----------------------------------------------------------------------------- validation


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """B×d → B×B squared Euclidean distances ``|x|² + |y|² - 2x·y``, as SCimilarity's ``pdist``.

    Not clamped at 0, so values match SCimilarity's ``pdist`` to rounding.
    """
    sq = (embeddings * embeddings).sum(dim=1)
    return torch.addmm(sq[None, :], embeddings, embeddings.T, alpha=-2.0).add_(sq[:, None])


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
    if n and (int(t.min()) < 0 or int(t.max()) >= n_labels):
        raise ValueError(
            f"{name} must be positions into the {n_labels}×{n_labels} descendant/parent matrix "
            f"(0..{n_labels - 1}), got values in [{int(t.min())}, {int(t.max())}]"
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
    # vice versa), float64 so that floor(u * count) stays below count for any batch size.
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device)


# ----------------------------------------------------------------------------- backends


class _NumpyOps:
    """CPU arrays. numpy's kernels are single-threaded and release the GIL, so blocks of
    anchor rows run in parallel threads."""

    i32, i64, f64 = np.int32, np.int64, np.float64
    index = np.int32  # per-candidate keys and cells: half the memory traffic of int64

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype, copy=False)

    @staticmethod
    def arange(n, like=None):
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def cat(parts):
        return np.concatenate(parts)

    @staticmethod
    def take(x, index):
        return x.take(index)

    @staticmethod
    def where(cond, x, y):
        return np.where(cond, x, y)

    @staticmethod
    def eps(dtype):
        return float(np.finfo(dtype).eps)

    @staticmethod
    def unique_inverse(x):
        return np.unique(x, return_inverse=True)

    @staticmethod
    def nonzero(mask):
        return np.flatnonzero(mask)

    @staticmethod
    def repeat(values, counts):
        return np.repeat(values, counts)

    @staticmethod
    def bincount(x, n):
        return np.bincount(x, minlength=n)

    @staticmethod
    def offsets(counts):
        out = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=out[1:])
        return out

    @staticmethod
    def searchsorted(sorted_values, values):
        return np.searchsorted(sorted_values, values)

    @staticmethod
    def argsort_stable(x):
        return np.argsort(x, kind="stable")

    @staticmethod
    def nextafter(x, up: bool):
        return np.nextafter(x, x.dtype.type(np.inf if up else -np.inf))

    @staticmethod
    def clip_(x, lo, hi):
        return np.clip(x, lo, hi, out=x)

    @staticmethod
    def full(n, value, like):
        return np.full(n, value, dtype=like.dtype)

    @staticmethod
    def isfinite(x):
        return np.isfinite(x)

    @staticmethod
    def row_extreme(values, starts, counts, n_rows, fill, largest: bool):
        """Per row, the max (min) of ``values`` grouped row after row; ``fill`` where empty."""
        out = np.full(n_rows, fill, dtype=values.dtype)
        rows = np.flatnonzero(counts)
        if rows.size:
            out[rows] = (np.maximum if largest else np.minimum).reduceat(values, starts[rows])
        return out

    @staticmethod
    def group(keys, n_keys):
        """Stable counting sort of int keys in [0, n_keys): (order, starts), ``starts[k]`` =
        number of keys < k. Scipy's CSR → CSC transpose of a 1 × n_keys matrix is exactly
        that, in one cache-friendly pass (numpy's radix argsort is several times slower)."""
        n = keys.shape[0]
        one_row = scipy.sparse.csr_matrix(
            (np.arange(n, dtype=np.int32), keys.astype(np.int32, copy=False),
             np.array([0, n], dtype=np.int32)), shape=(1, n_keys))
        by_key = one_row.tocsc()
        return by_key.data, by_key.indptr

    @staticmethod
    def from_torch(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()


class _TorchOps:
    """Torch tensors on any device (the path CUDA takes)."""

    i32, i64, f64 = torch.int32, torch.int64, torch.float64
    index = torch.int64

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
    def eps(dtype):
        return float(torch.finfo(dtype).eps)

    @staticmethod
    def unique_inverse(x):
        return torch.unique(x, return_inverse=True)

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
    def clip_(x, lo, hi):
        return x.clamp_(lo, hi)

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
    def group(keys, n_keys):
        order = torch.argsort(keys, stable=True)
        return order, torch.nn.functional.pad(
            torch.bincount(keys, minlength=n_keys).cumsum(0), (1, 0))

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
    place = idx.copy() if ops is _NumpyOps else idx.clone()
    place[order] = idx  # each cell's slot in `order`
    later = group_end[lab] - place - 1  # same-label cells after it: its positives
    first = ops.offsets(later)
    anchor = ops.repeat(idx, later)
    step = ops.arange(anchor.shape[0], lab) - ops.repeat(first[:-1], later)
    positive = order[place[anchor] + 1 + step]
    if studies is not None:
        keep = ops.nonzero(studies[anchor] != studies[positive])
        anchor, positive = anchor[keep], positive[keep]
    return anchor, positive


def _candidate_table(ops, lab, neg_lab, desc):
    """Which cells are candidate negatives for an anchor of each label present.

    Returns ``lab`` renumbered to the L' labels present and ``table`` (L'×B bool): ``[x, n]``
    is True when cell n's label is not x and its negative label (its label, or its original
    label after perturbation, as in SCimilarity) is not a strict ontology ancestor or
    descendant of x.
    """
    n = lab.shape[0]
    present, inverse = ops.unique_inverse(ops.cat([lab, neg_lab]))
    lab, neg_lab = inverse[:n], inverse[n:]
    sub = desc[present][:, present]
    excluded = (sub | sub.T)[:, neg_lab]
    excluded |= ops.arange(present.shape[0], lab)[:, None] == lab[None, :]
    return lab, ~excluded


# ----------------------------------------------------------------------------- the miner


def _mine_block(ops, dist, cand, a, d_ap, u, margin: float, selection: str, buckets: int):
    """Counts and picks for the pairs anchored in one block of rows.

    Args:
        dist: R×B squared distances of the block's anchor rows; ``cand``: R×B bool mask of
            their candidate negatives.
        a: each pair's anchor as a row of the block (non-decreasing); ``d_ap``: D[a, p].
        u: one uniform number per pair (None for ``hardest``).

    Returns:
        ``(kept, negative, num_hard)``: the pairs that get a triplet (indices into ``a``,
        ascending), their negatives' columns, and the block's hard (pair, candidate) count.
    """
    n_rows, width = dist.shape
    n_pairs = a.shape[0]
    semihard = selection == "semihard"
    rows = ops.arange(n_rows, a)
    pair_count = ops.bincount(a, n_rows)
    pair_start = ops.offsets(pair_count)
    thr = d_ap + margin
    below_thr = ops.nextafter(thr, up=False)  # x < thr  <=>  x <= below_thr
    if semihard:
        above_d = ops.nextafter(d_ap, up=True)  # x > d  <=>  x >= above_d
        bounds, bound_row = ops.cat([above_d, thr]), ops.cat([a, a])
        queries, query_row = ops.cat([d_ap, below_thr]), bound_row
    else:
        bounds, bound_row = thr, a
        queries, query_row = below_thr, a

    # 1. The candidates below the row's largest threshold, row after row (larger ones are
    # past every boundary: never hard, never picked).
    hi = ops.row_extreme(thr, pair_start, pair_count, n_rows, -math.inf, largest=True)
    mask = dist < hi[:, None]
    mask &= cand
    flat = ops.nonzero(mask)  # positions in the block, row-major
    del mask
    row_start = ops.searchsorted(flat, ops.arange(n_rows + 1, a) * width)
    row_count = row_start[1:] - row_start[:-1]
    x = ops.take(dist, flat)

    # 2. Bins. A bucket key monotone in the value within each row: a value in a lower bucket
    # than a boundary is below it, in a higher one above it; only a shared bucket needs a
    # comparison. The same float operations on values and boundaries, as separate kernels
    # (no fused multiply-add), keep keys monotone whatever the rounding. Row r's keys are
    # r * buckets + [0, buckets): [lo, hi] maps to [1, buckets - 1].
    lo = ops.row_extreme(above_d if semihard else thr, pair_start, pair_count, n_rows,
                         math.inf, largest=False)
    span = hi - lo
    usable = ops.isfinite(span) & (span > 0)  # else one bucket for the row
    span, lo = ops.where(usable, span, 1.0), ops.where(usable, lo, 0.0)
    ftype = dist.dtype
    if (float((abs(ops.where(usable, hi, 0.0)) / span).max()) * buckets * ops.eps(ftype) > 0.05
            or n_rows * buckets >= 2 ** 24):
        # float32 would blur the buckets (embeddings far from unit length) or the keys.
        ftype = ops.f64
        span, lo = ops.cast(span, ftype), ops.cast(lo, ftype)
    scale = ops.where(usable, (buckets - 2) / span, 0.0)
    shift = 1 - lo * scale
    base = ops.cast(rows * buckets, ftype)

    def keys(values, scale, shift, base):
        y = ops.cast(values, ftype) * scale
        y += shift
        ops.clip_(y, 0, buckets - 1)
        y += base
        return ops.cast(y, ops.index)

    bound_order, bucket_start = ops.group(
        keys(bounds, scale[bound_row], shift[bound_row], base[bound_row]), n_rows * buckets)
    sorted_bounds = bounds[bound_order]
    # Cells: row r's values fall in cells ``r + (boundaries of earlier rows) + bin``, one more
    # cell than boundaries per row. ``first_cell[key]``: the cell of the bucket's lowest
    # values; ``crowded[key]``: boundaries share the bucket.
    first_cell = bucket_start[:-1] + ops.cast(ops.repeat(rows, buckets), bucket_start.dtype)
    crowded = bucket_start[1:] > bucket_start[:-1]

    def cells(values, key):
        cell = ops.take(first_cell, key)
        shared = ops.nonzero(ops.take(crowded, key))
        if shared.shape[0]:
            k = ops.cast(key[shared], ops.i64)
            first = ops.cast(bucket_start[k], ops.i64)
            n_in = ops.cast(bucket_start[k + 1], ops.i64) - first
            v = values[shared]
            extra = ops.cast(sorted_bounds[first] <= v, cell.dtype)
            more = ops.nonzero(n_in > 1)
            i = 1
            while more.shape[0]:
                extra[more] += ops.cast(sorted_bounds[first[more] + i] <= v[more], cell.dtype)
                i += 1
                more = more[n_in[more] > i]
            cell[shared] += extra
        return cell

    cell = cells(x, keys(x, ops.repeat(scale, row_count), ops.repeat(shift, row_count),
                         ops.repeat(base, row_count)))
    query_cell = ops.cast(cells(queries, keys(queries, scale[query_row], shift[query_row],
                                              base[query_row])), ops.i64)
    row_cell = pair_start[:-1] * (2 if semihard else 1) + rows  # each row's bin 0
    n_cells = n_rows + bounds.shape[0]

    if selection == "hardest":
        # Hard count: per candidate, its row's thresholds above it (pairs minus its bin).
        num_hard = int((pair_count * row_count).sum() + (row_cell * row_count).sum()
                       - ops.cast(cell, ops.i64).sum())
        best = ops.row_extreme(x, row_start, row_count, n_rows, math.inf, largest=False)
        kept = ops.nonzero(best[a] < thr)
        if not kept.shape[0]:
            return kept, kept, num_hard
        # The first (lowest column) of each row's closest candidates.
        hit = ops.nonzero(x == ops.repeat(best, row_count))
        first = hit[ops.searchsorted(hit, row_start[:-1]).clip(0, hit.shape[0] - 1)]
        closest = flat[first] - rows * width
        return kept, closest[a[kept]], num_hard

    # 3. Candidates lined up cell after cell (row, then bin; column order inside a cell).
    order, cell_start = ops.group(cell, n_cells)
    del cell
    row_first = ops.cast(cell_start[row_cell[a]], ops.i64)
    end = ops.cast(cell_start[query_cell[n_pairs:] + 1 if semihard else query_cell + 1],
                   ops.i64)
    num_hard = int((end - row_first).sum())
    start = ops.cast(cell_start[query_cell[:n_pairs] + 1], ops.i64) if semihard else row_first

    # 4. One uniform pick per pair inside its run [start, end).
    size = end - start
    kept = ops.nonzero(size > 0)
    size = size[kept]
    j = ops.cast(u[kept] * size, ops.i64)
    j = j - (j >= size)  # u * size rounds up to size only when u is within 2^-53 of 1
    negative = flat[ops.cast(order[start[kept] + j], ops.i64)] - a[kept] * width
    return kept, negative, num_hard


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
    chunk_elements: int = _CHUNK_ELEMENTS,
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
        chunk_elements: work on blocks of anchor rows of at most this many row × batch
            elements; results do not depend on it.

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
    ops = _NumpyOps if device.type == "cpu" else _TorchOps
    return _mine(ops, embeddings, lab, neg_lab, st, desc, margin, selection, generator,
                 dummy_triplet=dummy_triplet, chunk_elements=chunk_elements)


def _mine(ops, embeddings, lab, neg_lab, st, desc, margin, selection, generator, *,
          dummy_triplet: bool, chunk_elements: int,
          buckets: int = _BUCKETS, threads: int | None = None):
    """``mine_triplets`` after validation, on the ``ops`` backend (tests run both on CPU)."""
    device = embeddings.device
    n = embeddings.shape[0]

    def finish(a, p, neg, hard, viable):
        a, p, neg = (torch.as_tensor(t, device=device).long() for t in (a, p, neg))
        if a.numel() == 0 and dummy_triplet:
            a = p = neg = torch.zeros(1, dtype=torch.long, device=device)
        return a, p, neg, int(hard), int(viable)

    lab_x, neg_lab_x, desc_x = (ops.from_torch(t) for t in (lab, neg_lab, desc))
    st_x = None if st is None else ops.from_torch(st)
    pair_a, pair_p = _same_label_pairs(ops, lab_x, st_x)
    n_pairs = pair_a.shape[0]
    empty = pair_a[:0]
    if n_pairs == 0:
        return finish(empty, empty, empty, 0, 0)
    # One number per pair in (anchor, positive) order, drawn up front so that the result
    # does not depend on how rows are split into blocks.
    u = None if selection == "hardest" else ops.from_torch(_uniform(n_pairs, generator, device))

    lab_x, table = _candidate_table(ops, lab_x, neg_lab_x, desc_x)
    num_viable = int(table.sum(1)[lab_x[pair_a]].sum())

    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    sq = (emb * emb).sum(dim=1)
    if not bool(torch.isfinite(sq).all()) or float(sq.max()) > torch.finfo(emb.dtype).max / 8:
        raise ValueError(
            "embeddings contain NaN/inf or values too large to square (the model has "
            "diverged?): triplet mining needs finite distances")
    dist = ops.from_torch(squared_distances(emb))
    d_ap = dist.reshape(-1)[pair_a * n + pair_p]

    rows_per_block = max(1, int(chunk_elements) // max(n, 1))
    workers = threads if threads is not None else (
        torch.get_num_threads() if ops is _NumpyOps else 1)
    if workers > 1 and n * n >= 2 * _MIN_THREAD_ELEMENTS:
        rows_per_block = min(rows_per_block, -(-n // workers))
    edges = list(range(0, n, rows_per_block)) + [n]
    pair_edges = [int(i) for i in ops.searchsorted(pair_a, ops.arange(n + 1, pair_a)[edges])]

    def block(i):
        r0, r1, p0, p1 = edges[i], edges[i + 1], pair_edges[i], pair_edges[i + 1]
        if p0 == p1:
            return empty, empty, 0
        kept, negative, hard = _mine_block(
            ops, dist[r0:r1], table[lab_x[r0:r1]], pair_a[p0:p1] - r0, d_ap[p0:p1],
            None if u is None else u[p0:p1], margin, selection, buckets)
        return kept + p0, negative, hard

    n_blocks = len(edges) - 1
    if workers > 1 and n_blocks > 1:
        results = list(_thread_pool(min(workers, n_blocks)).map(block, range(n_blocks)))
    else:
        results = [block(i) for i in range(n_blocks)]
    kept = ops.cat([r[0] for r in results])
    negative = ops.cat([r[1] for r in results])
    num_hard = sum(r[2] for r in results)
    return finish(pair_a[kept], pair_p[kept], negative, num_hard, num_viable)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(n: int) -> ThreadPoolExecutor:
    # Keyed by process id too: a forked child inherits the dict but not the threads.
    key = (os.getpid(), n)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="scimtrain-miner")
    return _POOLS[key]
