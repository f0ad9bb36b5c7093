"""The CPU path: compiled loops (numba), one pass per anchor row, blocks of rows over threads.

``dispatch.mine_triplets`` checks the inputs; on the CPU it calls ``mine`` here, which hands
numpy arrays to the compiled kernels. The mathematics is that of the package docstring and
the picks are the same as the torch path's for the same uniform numbers:

* a pair (a, p), p after a in the batch with the same label (and, with studies, another
  study), has threshold ``thr = d + margin`` (d = D[a, p]) and, for ``semihard``,
  ``above_d`` = the float just above d. A candidate negative x of row a is hard when
  x < thr, in the semihard window when also x >= above_d;
* a candidate's *interval* is the number of its row's boundaries (``thr`` of every pair of
  the row, and ``above_d`` for semihard) at or below it. Lined up by (interval, column), a
  pair's hard candidates are the run of intervals up to its ``thr``'s and its window the
  intervals after its ``above_d``'s up to that, so the hard count is a lookup and the pick,
  for the pair's uniform number u, is ``run[min(floor(u * size), size - 1)]``.

Per row (``_rows_kernel``, in named stages), without sorting anything: the row's boundaries
are counted into buckets of a key monotone in the value (``_PER_BOUND`` buckets per boundary
over the row's [lowest, highest] boundary), so a value's interval is its bucket's first
position plus the boundaries of its bucket at or below it (one comparison unless the bucket
is crowded); one counting sort by interval then lines the candidates up. O(B) per row plus
O(1) expected per candidate and per pair, O(B + pairs of a row) scratch memory per thread:
no B×B×B tensor.

Compiled on first use (several seconds once; numba caches the machine code on disk, so a
later process loads it in under a second). Blocks of rows are shared among
``torch.get_num_threads()`` threads of numba's OpenMP threading layer (why OpenMP: below).
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch
from numba.cpython.unsafe.numbers import trailing_zeros

from .checks import uniform
from .distances import checked_distances

__all__ = ["HARDEST", "MODES", "RANDOM", "SEMIHARD", "candidate_table", "mine", "mine_rows",
           "same_label_pairs"]

SEMIHARD, RANDOM, HARDEST = 0, 1, 2
MODES = {"semihard": SEMIHARD, "random": RANDOM, "hardest": HARDEST}  # by selection name
_PER_BOUND = 8  # buckets per boundary (speed only: fewer crowded buckets, larger tables)
# Row cost model for sharing rows between threads: scanning a row of B distances, plus this
# many distances' worth per pair (a pair's boundaries cost about as much as 12 scanned values).
_PAIR_COST = 12
_BLOCKS_PER_THREAD = 8  # blocks of rows per thread: small enough to even out, large to amortise

if not ({"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ)):
    # OpenMP first: with torch imported first, numba's OpenMP layer runs on torch's own
    # OpenMP runtime, whose threads spin for milliseconds after every torch operation. There
    # they take the miner's rows at once; with any other layer the miner's threads would share
    # cores with those spinning threads and gain nothing.
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _pairs_kernel(lab, studies, use_studies, n_labels):  # pragma: no cover - compiled
    # (unsigned indices, as in _rows_kernel: no negative-index wraparound code)
    n = lab.shape[0]
    lab = lab.astype(np.uint64)
    group = np.zeros(n_labels + 1, np.uint64)  # counting sort by label, stable
    for i in range(n):
        group[lab[i] + np.uint64(1)] += np.uint64(1)
    for g in range(n_labels):
        group[g + 1] += group[g]
    cursor = group[:-1].copy()
    order = np.empty(n, np.uint64)
    place = np.empty(n, np.uint64)
    for i in range(n):
        place[i] = cursor[lab[i]]
        order[place[i]] = i
        cursor[lab[i]] += np.uint64(1)
    pair_start = np.zeros(n + 1, np.int64)
    sorted_studies = np.zeros(n if use_studies else 0, studies.dtype)  # in group order:
    if use_studies:  # contiguous reads below
        for s in range(n):
            sorted_studies[s] = studies[order[s]]
    for i in range(n):  # a cell's positives: the cells after it in its label's group
        end = group[lab[i] + np.uint64(1)]
        count = end - place[i] - np.uint64(1)
        if use_studies:
            count = np.uint64(0)
            study = studies[i]
            for s in range(place[i] + np.uint64(1), end):  # (vectorised)
                count += np.uint64(sorted_studies[s] != study)
        pair_start[i + 1] = pair_start[i] + np.int64(count)
    positive = np.empty(pair_start[n] + 1, np.int64)  # (+ 1: the branch-free writes below)
    for i in range(n):
        j = np.uint64(pair_start[i])
        study = studies[i] if use_studies else 0
        for s in range(place[i] + np.uint64(1), group[lab[i] + np.uint64(1)]):
            positive[j] = order[s]
            j += np.uint64(not use_studies or sorted_studies[s] != study)
    return pair_start, positive[:pair_start[n]]


@_jit
def _table_kernel(lab, neg_lab, descendant):  # pragma: no cover - compiled
    n, n_labels = lab.shape[0], descendant.shape[0]
    row_of = np.full(n_labels, -1, np.int64)
    n_rows = 0
    for i in range(n):
        if row_of[lab[i]] < 0:
            row_of[lab[i]] = n_rows
            n_rows += 1
    table = np.empty((n_rows, n), np.bool_)
    unrelated = np.empty(n_labels, np.bool_)
    for x in range(n_labels):
        r = row_of[x]
        if r < 0:
            continue
        for y in range(n_labels):
            unrelated[y] = not descendant[x, y] and not descendant[y, x]
        trow = table[r]
        for i in range(n):
            trow[i] = (lab[i] != x) & unrelated[np.uint64(neg_lab[i])]
    rows = np.empty(n, np.int64)
    for i in range(n):
        rows[i] = row_of[lab[i]]
    return rows, table


@_jit
def _step_up(values, int_like):  # pragma: no cover - compiled
    """Each finite value replaced, in place, by the float just above it (np.nextafter(v,
    inf)): one step of its bit pattern, read as ``int_like``'s integers of the same width (a
    call to nextafter per pair cost a twentieth of the row pass)."""
    bits = values.view(int_like.dtype)
    negative_zero = np.iinfo(int_like.dtype).min
    for i in range(bits.shape[0]):
        b = bits[i]
        # sign and magnitude: up is away from zero for +, toward it for -; -0.0 -> smallest +
        bits[i] = b + 1 if b >= 0 else (b - 1 if b != negative_zero else 1)



# ----------------------------------------------------------------------------- one row's stages
# Each stage works on one anchor row in preallocated scratch arrays (``_rows_kernel`` owns
# them). Index arrays are unsigned: numba then leaves out its negative-index wraparound code,
# which otherwise costs a sixth of the time.


@_jit
def _row_boundaries(drow, positive, p0, k, semihard, margin, inf, int_like,
                    bval):  # pragma: no cover - compiled
    """The row's boundaries into ``bval``: its k pairs' ``thr = d + margin`` (in dist's dtype,
    so it rounds as torch's), then for semihard their ``above_d``. Returns (m, lo, hi): their
    number, the smallest and the largest."""
    for i in range(k):
        d = drow[positive[p0 + i]]
        bval[i] = d + margin
        if semihard:
            bval[k + i] = d
    m = 2 * k if semihard else k
    if semihard:
        _step_up(bval[k:m], int_like)  # d -> above_d
    lo, hi = inf, -inf
    for j in range(m):
        lo, hi = min(lo, bval[j]), max(hi, bval[j])
    return m, lo, hi


@_jit
def _bucket_boundaries(bval, m, lo, hi, max_scale, inf, top_key, bkey, look, bounds,
                       below):  # pragma: no cover - compiled
    """The row's m boundaries counted into ``nb = _PER_BOUND * m`` buckets and lined up bucket
    after bucket. Afterwards ``look[b]`` is bucket b's first position in ``bounds`` (``look[nb
    + 1] = m``), ``bounds[m]`` an inf sentinel, and ``below[j]`` boundary j's own interval
    (the boundaries strictly below it). Returns (scale, nb).

    A key is ``trunc((max(v, lo) - lo) * scale)``, in dist's dtype (float32: twice the vector
    lanes): the same steps for every value keep it monotone in the value, whatever the
    rounding."""
    nb = _PER_BOUND * m  # keys 0..nb (nb itself only by rounding)
    top_key[0] = nb - 1 if hi > lo else 0  # (nb - 1 in dist's dtype)
    scale = top_key[0] / (hi - lo) if hi > lo else top_key[0]
    if not scale < max_scale:  # hi - lo subnormal: keys coarser, never out of range
        scale = max_scale
    look[:nb + 2] = 0
    for j in range(m):
        key = min(int((bval[j] - lo) * scale), nb)
        bkey[j] = key
        look[key] += 1
    run = np.uint32(0)
    for b in range(nb + 1):  # bucket ends (the running sum in a register, not memory)
        run += look[b]
        look[b] = run
    for j in range(m):  # scattered backwards from the ends: look becomes bucket firsts
        slot = look[bkey[j]] - np.uint32(1)
        look[bkey[j]] = slot
        bounds[slot] = bval[j]
    look[nb + 1] = m
    bounds[m] = inf  # sentinel: an empty bucket compares with a higher one's
    for j in range(m):  # each boundary's own interval: the boundaries below it
        key = bkey[j]
        f, g = look[key], look[key + 1]
        count = f
        if g - f > 1:
            for q in range(f, g):
                count += bounds[q] < bval[j]
        below[j] = count
    return scale, nb


@_jit
def _row_candidates(drow, trow, hi, words, cols, xs):  # pragma: no cover - compiled
    """The row's candidates: not excluded by the table row ``trow`` and below the row's
    highest boundary ``hi`` (above it a value is never hard and never picked). Their columns
    into ``cols`` and values into ``xs``, in column order; returns their number.

    A bit per column, then the set bits' columns: cheaper than a compaction loop over every
    column."""
    n = drow.shape[0]
    for w in range(words.shape[0]):  # candidate bits, 64 columns a word (vectorised)
        b0 = w * 64
        word = np.uint64(0)
        for j in range(min(64, n - b0)):
            word |= np.uint64((drow[b0 + j] < hi) & trow[b0 + j]) << np.uint64(j)
        words[w] = word
    c = np.uint64(0)
    for w in range(words.shape[0]):  # the set bits' columns, in column order
        word = words[w]
        b0 = np.uint64(w * 64)
        while word:
            col = b0 + trailing_zeros(word)
            cols[c] = col
            xs[c] = drow[col]
            c += np.uint64(1)
            word &= word - np.uint64(1)
    return c


@_jit
def _candidate_intervals(xs, c, lo, scale, nb, look, bounds, m, keys, intervals,
                         interval_start):  # pragma: no cover - compiled
    """Each of the c candidates' interval into ``intervals``, and the number of candidates
    in each interval into ``interval_start[:m + 1]``.

    An interval is the bucket's first position, + 1 if its first boundary is <= x (an empty
    bucket's "first" lies in a higher bucket: never <= x), + the rest of a crowded bucket's
    boundaries that are <= x."""
    for i in range(c):  # bucket keys (vectorised)
        keys[i] = min(int((max(xs[i], lo) - lo) * scale), nb)
    interval_start[:m + 2] = 0
    for i in range(c):
        x = xs[i]
        key = keys[i]
        f, g = look[key], look[key + 1]
        interval = f + (bounds[f] <= x)
        if g - f > 1:
            for q in range(f + 1, g):
                interval += bounds[q] <= x
        intervals[i] = interval
        interval_start[interval] += 1


@_jit
def _closest(xs, cols, c, inf):  # pragma: no cover - compiled
    """The smallest of the c candidate values (inf if none) and its column, the lowest among
    ties."""
    best, best_col = inf, 0
    for i in range(c):
        if xs[i] < best:
            best, best_col = xs[i], cols[i]
    return best, best_col


@_jit
def _interval_firsts(interval_start, m):  # pragma: no cover - compiled
    """``interval_start[:m + 1]`` from counts to each interval's first position."""
    run = np.uint32(0)
    for b in range(m + 1):
        count = interval_start[b]
        interval_start[b] = run
        run += count


@_jit
def _line_up(cols, intervals, c, m, interval_start, lined):  # pragma: no cover - compiled
    """The c candidates' columns lined up by (interval, column) into ``lined``: one stable
    counting sort; ``interval_start[:m + 1]`` goes from counts to first positions."""
    run = np.uint32(0)
    for b in range(m + 1):  # interval ends
        run += interval_start[b]
        interval_start[b] = run
    for t in range(c):  # backwards from the ends (stable); interval_start becomes firsts
        i = c - np.uint64(1) - t
        interval = intervals[i]
        slot = interval_start[interval] - np.uint32(1)
        interval_start[interval] = slot
        lined[slot] = cols[i]


@_jit
def _pick_negatives(p0, k, semihard, hardest, bval, below, interval_start, lined, best,
                    best_col, u, negative):  # pragma: no cover - compiled
    """Each of the row's k pairs' negative into ``negative[p0:p0 + k]`` (-1 if none); returns
    the row's number of hard (pair, candidate).

    A pair's hard candidates are the run [0, end) (the intervals up to its thr's), its window
    [start, end) (after its above_d's); the pick is ``lined[start + floor(u * size)]``."""
    hard = 0
    for i in range(k):
        end = interval_start[below[i] + 1]
        hard += end
        if hardest:
            negative[p0 + i] = best_col if best < bval[i] else -1
            continue
        start = interval_start[below[k + i] + 1] if semihard else 0
        size = np.int64(end) - np.int64(start)  # < 0 when d + margin rounds to d
        negative[p0 + i] = (lined[start + min(int(np.float64(u[p0 + i]) * size), size - 1)]
                            if size > 0 else -1)
    return hard


@_jit
def _rows_kernel(dist, table, rows, pair_start, positive, consts, u, mode, int_like, r0, r1,
                 negative, row_hard):  # pragma: no cover - compiled
    """Rows ``r0:r1``: each pair's negative into ``negative``, each row's hard count into
    ``row_hard``, stage after stage in scratch arrays sized for the block's largest row."""
    n = dist.shape[1]
    # in dist's dtype: thr = d + margin rounds as torch's; max_scale keeps keys finite
    margin, inf, max_scale = consts[0], consts[1], consts[2]
    semihard, hardest = mode == SEMIHARD, mode == HARDEST
    max_k = 0
    for r in range(r0, r1):
        max_k = max(max_k, pair_start[r + 1] - pair_start[r])
    m_max = max_k * (2 if semihard else 1)
    words = np.empty((n + 63) // 64, np.uint64)  # the row's candidates as bits
    cols = np.empty(n, np.uint32)  # the row's candidates, in column order
    xs = np.empty(n, dist.dtype)  # their values
    keys = np.empty(n, np.uint32)  # their buckets
    intervals = np.empty(n, np.uint32)  # their intervals
    lined = np.empty(n, np.uint32)  # their columns, lined up by (interval, column)
    bval = np.empty(m_max, dist.dtype)  # the row's boundaries: thr's, then above_d's
    bkey = np.empty(m_max, np.uint32)  # their buckets
    below = np.empty(m_max, np.uint32)  # their own intervals (boundaries strictly below)
    bounds = np.empty(m_max + 1, dist.dtype)  # the boundaries, bucket after bucket
    top_key = np.empty(1, dist.dtype)
    look = np.empty(_PER_BOUND * m_max + 2, np.uint32)  # each bucket's first boundary
    interval_start = np.empty(m_max + 2, np.uint32)
    for r in range(r0, r1):
        p0, p1 = pair_start[r], pair_start[r + 1]
        k = p1 - p0
        if k == 0:
            continue
        drow = dist[r]
        m, lo, hi = _row_boundaries(drow, positive, p0, k, semihard, margin, inf, int_like,
                                    bval)
        scale, nb = _bucket_boundaries(bval, m, lo, hi, max_scale, inf, top_key, bkey, look,
                                       bounds, below)
        c = _row_candidates(drow, table[rows[r]], hi, words, cols, xs)
        _candidate_intervals(xs, c, lo, scale, nb, look, bounds, m, keys, intervals,
                             interval_start)
        best, best_col = inf, 0
        if hardest:  # the closest candidate, the lowest column among ties
            best, best_col = _closest(xs, cols, c, inf)
            _interval_firsts(interval_start, m)
        else:
            _line_up(cols, intervals, c, m, interval_start, lined)
        interval_start[m + 1] = c
        row_hard[r] = _pick_negatives(p0, k, semihard, hardest, bval, below, interval_start,
                                      lined, best, best_col, u, negative)


@_jit
def _row_blocks(pair_start, blocks):  # pragma: no cover - compiled
    """Edges of consecutive row ranges of about equal estimated work (a row: a scan of B
    values, plus its pairs): ``edges[b]:edges[b + 1]`` is block b, no block empty."""
    n = pair_start.shape[0] - 1
    total = n * n + _PAIR_COST * pair_start[n]
    edges = np.empty(max(blocks, 1) + 1, np.int64)
    edges[0] = 0
    count, r = 1, 0
    for b in range(1, blocks):
        target = b * (total / blocks)
        while r < n and r * n + _PAIR_COST * pair_start[r] < target:  # first row at target
            r += 1
        if edges[count - 1] < r < n:
            edges[count] = r
            count += 1
    edges[count] = n
    return edges[:count + 1]


@_jit
def _collect(table, rows, pair_start, positive, negative, row_hard):  # pragma: no cover
    """The pairs that got a negative, as (anchor, positive, negative), and the hard and viable
    counts (viable: a row's pairs times its label's candidates)."""
    n_labels, n = table.shape
    allowed = np.zeros(n_labels, np.int64)
    for x in range(n_labels):
        for i in range(n):  # (vectorised)
            allowed[x] += table[x, i]
    num_hard = num_viable = 0
    for r in range(n):
        num_hard += row_hard[r]
        num_viable += (pair_start[r + 1] - pair_start[r]) * allowed[rows[r]]
    kept = 0
    for i in range(negative.shape[0]):  # (vectorised)
        kept += negative[i] >= 0
    a = np.empty(kept + 1, np.int64)  # (+ 1: the branch-free writes below)
    p = np.empty(kept + 1, np.int64)
    neg = np.empty(kept + 1, np.int64)
    j = np.uint64(0)  # (unsigned indices, as in _rows_kernel)
    for r in range(n):
        for i in range(np.uint64(pair_start[r]), np.uint64(pair_start[r + 1])):
            a[j], p[j], neg[j] = r, positive[i], negative[i]
            j += np.uint64(negative[i] >= 0)
    return a[:kept], p[:kept], neg[:kept], num_hard, num_viable


@numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def _rows_parallel(dist, table, rows, pair_start, positive, consts, u, mode, int_like, edges,
                   negative, row_hard):  # pragma: no cover - compiled
    for b in numba.prange(edges.shape[0] - 1):
        _rows_kernel(dist, table, rows, pair_start, positive, consts, u, mode, int_like,
                     edges[b], edges[b + 1], negative, row_hard)


def same_label_pairs(lab: np.ndarray, studies: np.ndarray | None, n_labels: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """All (anchor, positive) with equal labels, anchor < positive (and, with ``studies``,
    different studies), in (anchor, positive) order.

    Args:
        lab: B int label positions in [0, n_labels).
        studies: B int study ids, or None for no cross-study rule.

    Returns:
        ``(pair_start, positive)``: B + 1 offsets (row a's pairs are
        ``pair_start[a]:pair_start[a + 1]``) and each pair's positive, int64.
    """
    use_studies = studies is not None
    st = np.ascontiguousarray(studies, dtype=np.int64) if use_studies else np.zeros(0, np.int64)
    return _pairs_kernel(np.ascontiguousarray(lab, dtype=np.int64), st, use_studies, n_labels)


def candidate_table(lab: np.ndarray, neg_lab: np.ndarray, descendant: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Which cells are candidate negatives for an anchor of each label present.

    Args:
        lab: B label positions; ``neg_lab``: the labels that decide ontology exclusion (after
            label perturbation, the original ones); ``descendant``: L×L bool.

    Returns:
        ``(rows, table)``: each cell's row of ``table`` (its label renumbered), and ``table``
        (L'×B bool over the L' labels present): ``[x, n]`` True when cell n's label is not x
        and its negative label is not a strict ontology ancestor or descendant of x.
    """
    return _table_kernel(np.ascontiguousarray(lab, dtype=np.int64),
                        np.ascontiguousarray(neg_lab, dtype=np.int64),
                        np.ascontiguousarray(descendant, dtype=np.bool_))


def mine_rows(dist: np.ndarray, table: np.ndarray, rows: np.ndarray, pair_start: np.ndarray,
              positive: np.ndarray, margin: float, u: np.ndarray | None, mode: int,
              threads: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Each pair's negative, and the numbers of hard and of viable (pair, candidate).

    Args:
        dist: B×B squared distances (float32 or float64, finite).
        table, rows: from ``candidate_table``; ``pair_start``, ``positive``: from
            ``same_label_pairs``.
        margin: added to D[a, p] in ``dist``'s dtype.
        u: one uniform number in [0, 1) per pair (``SEMIHARD``, ``RANDOM``), float32.
        mode: ``SEMIHARD``, ``RANDOM`` or ``HARDEST``.
        threads: threads to share the rows (default ``torch.get_num_threads()``).

    Returns:
        ``(anchor, positive, negative, num_hard, num_viable)``: int64 arrays over the pairs
        that got a negative, in (anchor, positive) order, and two ints.
    """
    n = dist.shape[0]
    dist = np.ascontiguousarray(dist)
    consts = np.array([margin, np.inf, np.finfo(dist.dtype).max / 2**16], dtype=dist.dtype)
    u = np.zeros(0, np.float32) if u is None else np.ascontiguousarray(u)
    # the integers of dist's width: the float just above d is one step of its bit pattern
    int_like = np.zeros(0, np.int32 if dist.dtype == np.float32 else np.int64)
    args = (dist, table, rows, pair_start, positive, consts, u, mode, int_like)
    threads = max(1, min(threads or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS,
                         n // 64))
    negative = np.empty(positive.shape[0], np.int32)
    row_hard = np.zeros(n, np.int64)
    if threads == 1:
        _rows_kernel(*args, 0, n, negative, row_hard)
    else:
        edges = _row_blocks(pair_start, _BLOCKS_PER_THREAD * threads)
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            with numba.parallel_chunksize(1):  # a thread takes the next block when done
                _rows_parallel(*args, edges, negative, row_hard)
        finally:
            numba.set_num_threads(previous)
    a, p, neg, num_hard, num_viable = _collect(table, rows, pair_start, positive, negative,
                                               row_hard)
    return a, p, neg, int(num_hard), int(num_viable)


def mine(embeddings: torch.Tensor, lab: torch.Tensor, neg_lab: torch.Tensor,
         st: torch.Tensor | None, desc: torch.Tensor, margin: float, selection: str,
         generator: torch.Generator | None, *, dummy_triplet: bool, threads: int | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``mine_triplets`` on checked CPU tensors, in the compiled kernels (same return value)."""
    pair_start, positive = same_label_pairs(
        lab.numpy(), None if st is None else st.numpy(), desc.shape[0])
    n_pairs = positive.shape[0]
    a = p = negative = positive
    num_hard = num_viable = 0
    if n_pairs:
        # One number per pair in (anchor, positive) order, drawn up front (as the torch path).
        u = None if selection == "hardest" else uniform(n_pairs, generator, lab.device).numpy()
        rows, table = candidate_table(lab.numpy(), neg_lab.numpy(), desc.numpy())
        dist = checked_distances(embeddings).numpy()
        a, p, negative, num_hard, num_viable = mine_rows(
            dist, table, rows, pair_start, positive, margin, u, MODES[selection], threads)
    a, p, negative = (torch.from_numpy(t) for t in (a, p, negative))
    if a.numel() == 0 and dummy_triplet:
        a = p = negative = torch.zeros(1, dtype=torch.long)
    return a, p, negative, int(num_hard), int(num_viable)
