"""Ontology-aware triplet mining and the training losses (SPEC §5), on plain tensors.

Mining follows SCimilarity's rules exactly (same pairs, candidates, hard/viable counts and
selection windows) without its per-pair Python loop. DESIGN.md planned one sort per anchor
row plus binary searches; on the 2-core CPU torch's row sort alone takes ~25 ms at B = 1,000,
so rows are grouped instead of sorted:

* an anchor's thresholds ``D[a,p] + margin`` span [lo, hi); a monotone 8-bit key splits that
  range into 253 buckets (0 = below lo, 255 = not a candidate, or well past hi);
* a stable radix sort groups each row by key (numpy's on the CPU, ``torch.sort`` on CUDA) and
  a histogram gives where each bucket starts;
* a pair's hard count = candidates in lower buckets + an exact check of the few members of
  its threshold's bucket; the semihard window's lower edge likewise;
* a uniform pick draws j in [0, window size): an index into the run of whole buckets inside
  the window, or the j-th qualifying member of an edge bucket;
* ``hardest`` is the row's closest candidate.

Time: the B×B distance product plus a few O(B²) passes and O(pairs) work, no per-pair scan
of the batch. Memory: rows are processed in chunks of about 4M row×batch elements.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SELECTIONS",
    "LossConfig",
    "compute_loss",
    "l1_penalty",
    "mine_triplets",
    "mixed_loss",
    "perturb_labels",
    "reconstruction_loss",
    "squared_distances",
    "triplet_loss",
]

SELECTIONS = ("semihard", "hardest", "random")

# Elements of one (anchor rows × batch) chunk; bounds the miner's working set to a few
# tensors of this size (~100 MiB in all) whatever the batch size.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------- mining

_KEY_OUT = 255  # bucket of non-candidates (and of candidates well past every threshold)


def _bucket_keys(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Monotone bucket of each distance, ``trunc(clamp(x * scale + shift, 0, 255.5))``, as a
    float tensor of integers (callers cast).

    Separate kernels on purpose (no fused multiply-add), so that an element and a threshold
    with the same row constants are rounded alike and ``key(x) < key(t)`` implies ``x < t``.
    """
    return (x.to(scale.dtype) * scale).add_(shift).clamp_(0.0, _KEY_OUT + 0.5)


def _group_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group each row of uint8 keys by key.

    Returns ``order`` (R×B int64, a per-row stable argsort of the keys: columns grouped by
    key, column order inside a group) and ``starts`` (R×257 int64, ``[r, b]`` = number of
    elements of row r with key < b, so group b of row r is ``order[r, starts[r,b]:starts[r,b+1]]``).
    """
    if keys.device.type != "cpu":
        order = torch.sort(keys.to(torch.int16), dim=1, stable=True).indices
        hist = torch.zeros(keys.shape[0], 256, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(1, keys.long(), torch.ones_like(keys, dtype=torch.int64))
        return order, torch.nn.functional.pad(hist.cumsum(dim=1), (1, 0))
    # numpy's stable argsort is a radix sort for 8-bit keys, several times faster than
    # torch's comparison sort; with the histogram it is most of the miner's CPU time, so
    # blocks of rows go to torch's number of threads (numpy releases the GIL).
    k = keys.numpy()
    starts = np.zeros((k.shape[0], 257), dtype=np.int64)

    def work(lo: int, hi: int) -> np.ndarray:
        for s in range(lo, hi, 256):
            # bincount over (row within 256 rows, key) packed into 16 bits: the 64k-bin table
            # stays in cache.
            block = k[s:min(s + 256, hi)]
            packed = (np.arange(block.shape[0], dtype=np.uint16)[:, None] << 8) | block
            hist = np.bincount(packed.ravel(), minlength=block.shape[0] * 256)
            np.cumsum(hist.reshape(-1, 256), axis=1, out=starts[s:s + block.shape[0], 1:])
        return np.argsort(k[lo:hi], axis=1, kind="stable")

    n_workers = min(torch.get_num_threads(), max(1, k.shape[0] // 128))
    if n_workers == 1:
        order = work(0, k.shape[0])
    else:
        bounds = np.linspace(0, k.shape[0], n_workers + 1).astype(int)
        order = np.concatenate(list(_thread_pool(n_workers).map(work, bounds[:-1], bounds[1:])))
    return torch.from_numpy(order), torch.from_numpy(starts)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(n: int) -> ThreadPoolExecutor:
    # Keyed by process id too: a forked child inherits the dict but not the threads.
    key = (os.getpid(), n)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="scimtrain-miner")
    return _POOLS[key]


def _same_label_pairs(lab: torch.Tensor, studies: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (anchor, positive) with equal labels and anchor < positive (and, with studies,
    different studies), in (anchor, positive) order. O(pairs) work, no B×B mask."""
    n = lab.numel()
    order = torch.argsort(lab, stable=True)  # cells grouped by label, ascending index inside
    counts = torch.bincount(lab)
    group_end = counts.cumsum(0)
    place = torch.empty_like(order)
    place[order] = torch.arange(n, device=lab.device)  # each cell's slot in `order`
    later = group_end[lab] - place - 1  # same-label cells after it: its positives
    anchor = torch.repeat_interleave(torch.arange(n, device=lab.device), later)
    step = torch.arange(anchor.numel(), device=lab.device) - torch.repeat_interleave(
        later.cumsum(0) - later, later)
    positive = order[place[anchor] + 1 + step]
    if studies is not None:
        keep = studies[anchor] != studies[positive]
        anchor, positive = anchor[keep], positive[keep]
    return anchor, positive


def _candidate_table(lab: torch.Tensor, neg_lab: torch.Tensor, desc: torch.Tensor, *,
                     same_is_related: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which cells are candidate negatives, as a table over the labels present.

    Returns ``lab`` and ``neg_lab`` renumbered to the L' <= 2B labels present; ``excluded``
    (L'×L' uint8, 255 where a cell whose negative label is y is no negative for an anchor
    labelled x: the same label or an ontology ancestor/descendant; 0 elsewhere); and the
    number of candidates of an anchor of each label. When ``same_is_related`` is False
    (perturbed labels) the same-label rule is left to the caller, per cell, since it is
    decided by ``lab`` while the ontology rule uses ``neg_lab``.
    """
    n = lab.numel()
    present, inverse = torch.unique(torch.cat([lab, neg_lab]), return_inverse=True)
    lab, neg_lab = inverse[:n], inverse[n:]
    sub = desc[present][:, present]
    related = sub | sub.T
    excluded = related | torch.eye(len(present), dtype=torch.bool, device=lab.device) \
        if same_is_related else related
    # Candidates per anchor label, from joint (label, negative label) counts.
    joint = torch.zeros(len(present), len(present), device=lab.device)
    joint.index_put_((lab, neg_lab), torch.ones(n, device=lab.device), accumulate=True)
    n_excl = excluded.float() @ joint.sum(0) if same_is_related else (
        joint.sum(1) + related.float() @ joint.sum(0) - (joint * related).sum(1))
    n_cand = n - n_excl.round().long()
    return lab, neg_lab, excluded.to(torch.uint8) * _KEY_OUT, n_cand


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
        (pair, candidate).
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

    def finish(a, p, neg, hard, viable):
        if a.numel() == 0 and dummy_triplet:
            a = p = neg = torch.zeros(1, dtype=torch.long, device=device)
        return a, p, neg, int(hard), int(viable)

    pair_a, pair_p = _same_label_pairs(lab, st)
    n_pairs = pair_a.numel()
    if n_pairs == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return finish(empty, empty, empty, 0, 0)
    # One number per pair in (anchor, positive) order, drawn up front so that the result
    # does not depend on how rows are chunked.
    u = _uniform(n_pairs, generator, device) if selection != "hardest" else None

    lab, neg_lab, excluded_key, n_cand = _candidate_table(lab, neg_lab, desc,
                                                          same_is_related=negative_labels is None)
    num_viable = n_cand.index_select(0, lab.index_select(0, pair_a)).sum()

    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    dist = squared_distances(emb)
    d_ap = dist.view(-1).index_select(0, pair_a * n + pair_p)
    thr = d_ap + margin
    # Each anchor's thresholds span [lo, hi] (rows without pairs get a dummy range).
    lo = torch.full((n,), float("inf"), dtype=dist.dtype, device=device)
    lo = lo.scatter_reduce(0, pair_a, d_ap, reduce="amin")
    lo = torch.where(torch.isinf(lo), 0.0, lo)
    hi = torch.full((n,), margin, dtype=dist.dtype, device=device)
    hi = hi.scatter_reduce(0, pair_a, thr, reduce="amax")

    out_a, out_p, out_n = [], [], []
    num_hard = torch.zeros((), dtype=torch.long, device=device)
    rows_per_chunk = max(1, int(chunk_elements) // n)
    pair_bounds = torch.searchsorted(
        pair_a, torch.arange(0, n + rows_per_chunk, rows_per_chunk, device=device)).tolist()
    for i, start in enumerate(range(0, n, rows_per_chunk)):
        p0, p1 = pair_bounds[i], pair_bounds[i + 1]
        if p0 == p1:
            continue
        stop = min(start + rows_per_chunk, n)
        excl = excluded_key.index_select(0, lab[start:stop]).gather(
            1, neg_lab.expand(stop - start, n))
        if negative_labels is not None:  # same-label rule per cell (see _candidate_table)
            excl.masked_fill_(lab[start:stop, None] == lab[None, :], _KEY_OUT)
        chunk = _ChunkMiner(dist[start:stop], excl, lo[start:stop], hi[start:stop])
        a, p, neg, hard = chunk.mine(
            pair_a[p0:p1] - start, pair_p[p0:p1], d_ap[p0:p1], thr[p0:p1], selection,
            None if u is None else u[p0:p1], chunk_elements,
        )
        num_hard += hard
        out_a.append(a + start)
        out_p.append(p)
        out_n.append(neg)
    return finish(torch.cat(out_a), torch.cat(out_p), torch.cat(out_n), num_hard, num_viable)


class _ChunkMiner:
    """Distances of a block of anchor rows, grouped by a coarse per-row bucket key.

    Keys 1..254 split each row's threshold range [lo, hi) evenly; 0 is below lo, 255 holds
    non-candidates and candidates more than half a bucket past hi (so no threshold ever
    needs to look inside it). A stable radix sort groups every row by key, so a bucket's
    members are one contiguous run; the key is monotone in distance, so a threshold's count
    is "everything in lower buckets" plus an exact check of its own bucket's few members,
    and a uniform pick inside a window is one index into the runs between its edge buckets
    or one of the edge buckets' qualifying members. O(R·B) work instead of the O(R·B·log B)
    of sorting each row.
    """

    def __init__(self, d_rows: torch.Tensor, excl_key: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> None:
        self.d_flat, self.width = d_rows.reshape(-1), d_rows.shape[1]
        span = hi - lo  # >= margin, up to rounding
        # [lo, hi) -> [1.5, 254.5). Threshold hi must stay below key 255, i.e. rounding of
        # x * scale far below half a bucket: float64 where float32 falls short (only for
        # embeddings far from unit length).
        dtype = d_rows.dtype
        if float((hi.abs() / span).max()) * (_KEY_OUT - 2) * torch.finfo(dtype).eps > 0.05:
            dtype = torch.float64
        self.scale = (_KEY_OUT - 2) / span.to(dtype).clamp_min(torch.finfo(dtype).tiny)
        self.shift = 1.5 - lo.to(dtype) * self.scale
        keys = _bucket_keys(d_rows, self.scale[:, None], self.shift[:, None]).to(torch.uint8)
        self.keys = keys.bitwise_or_(excl_key)  # excl_key is 0 or 255
        order, starts = _group_rows(self.keys)
        self.order, self.starts = order.view(-1), starts.view(-1)

    def key_of(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # A threshold is <= hi, so its key is <= 254; the clamp only guards rounding.
        return _bucket_keys(x, self.scale[r], self.shift[r]).long().clamp_max_(_KEY_OUT - 1)

    def mine(self, r, positive, d_ap, thr, selection, u, chunk_elements):
        """Counts and picks for one block of pairs; returns (row, positive, negative, hard)."""
        semihard = selection == "semihard"
        if semihard:
            kt, kd = self.key_of(r.repeat(2), torch.cat([thr, d_ap])).view(2, -1)
        else:
            kt = kd = self.key_of(r, thr)
        base = r * 257
        s_t, s_t1, s_d, s_d1 = self.starts.index_select(
            0, torch.cat([base + kt, base + kt + 1, base + kd, base + kd + 1])).view(4, -1)
        size_t, size_d = s_t1 - s_t, s_d1 - s_d
        load = size_t + size_d if semihard else size_t
        if selection == "hardest":
            best_in_row = torch.where(self.keys == _KEY_OUT, float("inf"),
                                      self.d_flat.view(-1, self.width)).argmin(dim=1)
        # Sub-blocks of pairs whose bucket members add up to about chunk_elements (they are
        # ~1 per pair, but a batch of duplicate cells can fill one bucket).
        bounds = [0, r.numel()]
        total = int(load.sum())
        if total > chunk_elements:
            cut = torch.searchsorted(load.cumsum(0), torch.arange(
                chunk_elements, total, chunk_elements, device=r.device))
            bounds = [0] + sorted(set(cut.clamp(1, r.numel()).tolist()) | {r.numel()})
        rows_out, pos_out, neg_out = [], [], []
        hard = torch.zeros((), dtype=torch.long, device=r.device)
        for s, e in itertools.pairwise(bounds):
            rr = r[s:e]
            t = thr[s:e]
            tm = _Members(self, rr, s_t[s:e], size_t[s:e])
            below_t = tm.vals < t.index_select(0, tm.pair)
            hi_cnt = s_t[s:e] + tm.count(below_t)
            hard += hi_cnt.sum()
            if selection == "hardest":
                keep = (hi_cnt > 0).nonzero().squeeze(1)
                rows_out.append(rr.index_select(0, keep))
                pos_out.append(positive[s:e].index_select(0, keep))
                neg_out.append(best_in_row.index_select(0, rows_out[-1]))
                continue
            if semihard:
                d = d_ap[s:e]
                dm = _Members(self, rr, s_d[s:e], size_d[s:e])
                d_of = d.index_select(0, dm.pair)
                le_d = dm.vals <= d_of
                lo_cnt = s_d[s:e] + dm.count(le_d)
                same = kd[s:e] == kt[s:e]
                # The window: lower edge bucket's members above d (and below t when the
                # window starts and ends in that one bucket), then whole buckets, then the
                # upper edge bucket's members below t.
                low_ok = ~le_d & ~(same.index_select(0, dm.pair)
                                   & (dm.vals >= t.index_select(0, dm.pair)))
                n_low = dm.count(low_ok)
                mid_from = s_d1[s:e]
                mid_len = torch.where(same, 0, s_t[s:e] - mid_from)
                high_ok = below_t & ~same.index_select(0, tm.pair)
            else:  # random: the window is everything below t
                lo_cnt = n_low = mid_from = torch.zeros_like(hi_cnt)
                mid_len = s_t[s:e]
                high_ok = below_t
            width = hi_cnt - lo_cnt
            j = (u[s:e] * width).floor_().long().clamp_max_(width - 1).clamp_min_(0)
            in_mid = j - n_low
            neg = self.order.index_select(
                0, rr * self.width + (mid_from + in_mid).clamp_(0, self.width - 1))
            neg = torch.where(in_mid >= mid_len, tm.nth(high_ok, in_mid - mid_len), neg)
            if semihard:
                neg = torch.where(in_mid < 0, dm.nth(low_ok, j), neg)
            keep = (width > 0).nonzero().squeeze(1)
            rows_out.append(rr.index_select(0, keep))
            pos_out.append(positive[s:e].index_select(0, keep))
            neg_out.append(neg.index_select(0, keep))
        return torch.cat(rows_out), torch.cat(pos_out), torch.cat(neg_out), hard


class _Members:
    """The members of one bucket per pair, flattened pair after pair (bucket order)."""

    def __init__(self, chunk: _ChunkMiner, r: torch.Tensor, first: torch.Tensor,
                 size: torch.Tensor) -> None:
        seg_end = size.cumsum(0)
        total = int(seg_end[-1]) if seg_end.numel() else 0
        self.pair = torch.repeat_interleave(
            torch.arange(r.numel(), device=r.device), size, output_size=total)
        self.seg_start = seg_end - size
        slot = torch.arange(total, device=r.device) - self.seg_start.index_select(0, self.pair)
        row_base = r * chunk.width
        self.cols = chunk.order.index_select(0, (row_base + first).index_select(0, self.pair)
                                             + slot)
        self.vals = chunk.d_flat.index_select(0, row_base.index_select(0, self.pair)
                                              + self.cols)
        self.seg_end = seg_end

    def _running(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(mask.long().cumsum(0), (1, 0))

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """Per pair, how many of its members satisfy ``mask``."""
        running = self._running(mask)
        return running.index_select(0, self.seg_end) - running.index_select(0, self.seg_start)

    def nth(self, mask: torch.Tensor, nth: torch.Tensor) -> torch.Tensor:
        """Per pair, the column of its ``nth`` (0-based) member satisfying ``mask``; garbage
        for pairs without one (callers select those away)."""
        hits = mask.nonzero().squeeze(1)  # positions of all satisfying members, in order
        if hits.numel() == 0:
            return torch.zeros_like(nth)
        before = self._running(mask).index_select(0, self.seg_start)  # hits in earlier pairs
        at = hits.index_select(0, (before + nth.clamp_min(0)).clamp_max_(hits.numel() - 1))
        return self.cols.index_select(0, at)


@torch.no_grad()
def perturb_labels(
    labels: torch.Tensor,
    parent: torch.Tensor | np.ndarray,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SCimilarity's label coarse-graining before mining (SPEC §5, off by default).

    ``int(B * fraction)`` cells are drawn with replacement; each draw replaces the cell's
    current label with a uniformly random direct ontology parent that is among the batch's
    original labels, if it has one (a cell drawn twice can climb two levels, as in
    SCimilarity).

    Args:
        labels: B int label positions.
        parent: L×L bool over the same label positions, ``[i, j]`` True when label j is a
            direct parent of label i in the ontology. (Not derivable from the descendant
            matrix: a label's direct parent need not be a training label.)
        fraction: draws per cell, >= 0.
        generator: the only source of randomness; numbers are drawn on its device.

    Returns:
        A new int64 label tensor on ``labels``' device; ``labels`` is not modified.
    """
    if not float(fraction) >= 0:
        raise ValueError(f"fraction must be >= 0 (SCimilarity's default is 0.5), got {fraction}")
    labels = torch.as_tensor(labels)
    device = labels.device
    par = _bool_matrix(parent, "parent", device)
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of label positions, got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    lab = _label_tensor(labels, "labels", n, par.shape[0], device)
    out = lab.clone()
    k = int(n * float(fraction))
    if n == 0 or k == 0:
        return out
    gen_device = generator.device if generator is not None else device
    draws = torch.randint(0, n, (k,), generator=generator, device=gen_device).to(device)
    times = torch.bincount(draws, minlength=n)
    in_batch = torch.zeros(par.shape[0], dtype=torch.bool, device=device)
    in_batch[lab] = True
    allowed = par & in_batch[None, :]
    # Cells drawn r times climb in round 1..r; cells are independent within a round.
    for level in range(1, int(times.max()) + 1):
        cells = (times >= level).nonzero().squeeze(1)
        options = allowed[out[cells]]
        n_opt = options.sum(dim=1)
        u = _uniform(cells.numel(), generator, device)
        k_th = (u * n_opt).floor().long().clamp_max(n_opt - 1)
        choice = (options.cumsum(dim=1) > k_th[:, None]).int().argmax(dim=1)
        has = n_opt > 0
        out[cells[has]] = choice[has]
    return out


# ----------------------------------------------------------------------------- losses


def triplet_loss(
    embeddings: torch.Tensor,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max(||a-p|| - ||a-n|| + margin, 0)`` per triplet (Euclidean, not squared).

    Same as SCimilarity's ``F.triplet_margin_loss(p=2, eps=1e-6)``. Returns the mean (0 with a
    gradient path when there are no triplets) and the per-triplet losses.
    """
    margin = _check_margin(margin)
    per = F.triplet_margin_loss(
        embeddings[anchor], embeddings[positive], embeddings[negative],
        margin=margin, p=2, eps=1e-6, swap=False, reduction="none",
    )
    return per.sum() / max(per.numel(), 1), per


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} differs from input shape "
            f"{tuple(target.shape)}; the decoder's n_genes must equal the batch's gene count"
        )
    return F.mse_loss(reconstruction, target)


def mixed_loss(triplet: torch.Tensor, mse: torch.Tensor, triplet_weight: float) -> torch.Tensor:
    """``w * triplet + (1 - w) * mse``; w = 0 is mse alone and w = 1 triplet alone (so a NaN
    in the unused term cannot leak in)."""
    w = float(triplet_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"triplet_weight must be in [0, 1], got {triplet_weight}")
    if w == 0.0:
        return mse
    if w == 1.0:
        return triplet
    return w * triplet + (1.0 - w) * mse


def l1_penalty(encoder: nn.Module, l1: float, lr: float) -> torch.Tensor:
    """``l1 * lr * (sum|W| + sum|b|)`` of the encoder's first ``nn.Linear`` (SPEC §5).

    ``lr`` is the scheduler's current learning rate. Returns a 0-d tensor on the
    parameters' device (a plain 0 when ``l1 == 0``).
    """
    first = next((m for m in encoder.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("encoder has no nn.Linear layer to apply the L1 penalty to")
    if l1 == 0:
        return first.weight.new_zeros(())
    norm = sum(p.abs().sum() for p in first.parameters())
    return float(l1) * float(lr) * norm


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class LossConfig:
    """Loss settings, SCimilarity's defaults (SPEC §5, §8)."""

    margin: float = 0.05
    triplet_loss_weight: float = 0.001
    negative_selection: str = "semihard"
    sample_across_studies: bool = True
    perturb_labels: bool = False
    perturb_labels_fraction: float = 0.5
    dummy_triplet: bool = True

    def __post_init__(self) -> None:
        _check_margin(self.margin)
        if not 0.0 <= self.triplet_loss_weight <= 1.0:
            raise ValueError(
                f"triplet_loss_weight must be in [0, 1], got {self.triplet_loss_weight}")
        if self.negative_selection not in SELECTIONS:
            raise ValueError(
                f"negative_selection must be one of {SELECTIONS}, got {self.negative_selection!r}"
            )
        if not self.perturb_labels_fraction >= 0:
            raise ValueError(
                f"perturb_labels_fraction must be >= 0, got {self.perturb_labels_fraction}"
            )


def compute_loss(
    embedding: torch.Tensor,
    reconstruction: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    studies: torch.Tensor | None,
    descendant: torch.Tensor | np.ndarray,
    config: LossConfig = LossConfig(),
    *,
    parent: torch.Tensor | np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss and its SPEC §6 metrics.

    Args:
        embedding, reconstruction: the model's outputs for input ``x`` (B×d, B×genes).
        labels: B int label positions into ``descendant`` (and ``parent``).
        studies: B int study ids; ignored when ``config.sample_across_studies`` is False.
            Pass None for validation/test passes (SPEC §6: no cross-study rule there).
        descendant: L×L bool, ``[i, j]`` True when j is a strict descendant of i. Convert it
            to a tensor on the model's device once, outside the loop.
        config: margin, weight, selection, perturbation settings.
        parent: L×L bool direct-parent matrix; required when ``config.perturb_labels``.
        generator: the only source of randomness.

    Returns:
        ``(loss, metrics)``: ``loss`` carries the gradient; ``metrics`` maps ``loss``,
        ``triplet_loss``, ``mse``, ``hard_triplets`` (num_hard / num_viable, 0 when there are
        no viable triplets), ``num_nonzero_loss``, ``num_hard_triplets`` and
        ``num_viable_triplets`` to detached 0-d float tensors on the embedding's device
        (call ``.item()`` when logging, after ``backward``, to avoid an extra sync). The
        trainer adds the L1 penalty and learning rate.
    """
    mine_labels, negative_labels = labels, None
    if config.perturb_labels:
        if parent is None:
            raise ValueError("config.perturb_labels is set: pass the L×L `parent` matrix")
        mine_labels = perturb_labels(labels, parent, config.perturb_labels_fraction, generator)
        # SCimilarity excludes related negatives by the cells' original labels.
        negative_labels = labels
    anchor, positive, negative, num_hard, num_viable = mine_triplets(
        embedding,
        mine_labels,
        studies if config.sample_across_studies else None,
        descendant,
        margin=config.margin,
        selection=config.negative_selection,
        generator=generator,
        negative_labels=negative_labels,
        dummy_triplet=config.dummy_triplet,
    )
    triplet, per_triplet = triplet_loss(embedding, anchor, positive, negative, config.margin)
    mse = reconstruction_loss(reconstruction, x)
    loss = mixed_loss(triplet, mse, config.triplet_loss_weight)

    def scalar(v: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float32, device=embedding.device).detach()

    metrics = {
        "loss": scalar(loss.detach()),
        "triplet_loss": scalar(triplet.detach()),
        "mse": scalar(mse.detach()),
        "hard_triplets": scalar(num_hard / num_viable if num_viable else 0.0),
        "num_nonzero_loss": scalar((per_triplet.detach() > 0).sum()),
        "num_hard_triplets": scalar(float(num_hard)),
        "num_viable_triplets": scalar(float(num_viable)),
    }
    return loss, metrics
