"""Exact intervals of values among each anchor row's boundaries, without sorting the values.

A row's boundaries (its pairs' thresholds) cut the number line into intervals; the
*interval* of a value of row r is ``r + (boundaries of earlier rows) + #{row r's boundaries
<= value}``: row r's intervals follow row r - 1's, one more than the row has boundaries.
"""

from __future__ import annotations

import math

import torch

from .segments import group, nonzero, offsets, segment_sum

__all__ = ["BUCKETS", "BUCKETS_PER_BOUNDARY", "Bins"]

# Coarse buckets per anchor row. Speed only: more buckets mean fewer values to compare
# exactly but a larger lookup table.
BUCKETS = 256
BUCKETS_PER_BOUNDARY = 4  # rows with many boundaries get more buckets...
MAX_BUCKETS = 4096  # ... up to this many


class Bins:
    """The intervals of values among each row's boundaries (see the module docstring).

    A value's key is a bucket monotone in the value within its row (``keys``): a value in a
    lower bucket than a boundary is below it, in a higher one above it. The boundaries are
    lined up bucket after bucket (one counting sort), with one +inf boundary in a key reserved
    at the end of each row, so a bucket's first boundary sits at the position that is the
    interval of the bucket's lowest values; a value adds the boundaries of its own bucket that
    are <= it. A bucket rarely holds more than one; comparing against the next position
    instead when it holds none is harmless, as that boundary lies in a higher bucket.
    """

    def __init__(self, bound_parts: tuple[torch.Tensor, ...], part_count: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, buckets: int = BUCKETS,
                 per_bound: int = BUCKETS_PER_BOUNDARY) -> None:
        """``bound_parts``: tensors of boundaries, each row after row with ``part_count`` per
        row; ``lo``/``hi``: each row's smallest and largest boundary. A row gets ``buckets``
        buckets, or ``per_bound`` per boundary when it has many."""
        n_rows = part_count.shape[0]
        n_buckets = (part_count * (per_bound * len(bound_parts))).clamp_(buckets, MAX_BUCKETS)
        row_base = offsets(n_buckets + 1)  # one reserved key at the end of each row
        # key = trunc(max(x, lo) * scale + offset) maps [lo, hi] onto row r's keys
        # row_base[r] + [1, n_buckets[r] - 1]; every value is <= hi (candidates were taken
        # below it), so the reserved key row_base[r] + n_buckets[r] is never reached.
        span = hi - lo
        usable = torch.isfinite(span) & (span > 0)  # else one bucket for the row
        span, lo = torch.where(usable, span, 1.0), torch.where(usable, lo, 0.0)
        ftype = lo.dtype
        blur = float((torch.where(usable, hi, 0.0).abs() * n_buckets / span).max())
        if blur * torch.finfo(ftype).eps > 0.05 or int(row_base[-1]) >= 2 ** 21:
            # float32 would blur the buckets (embeddings far from unit length) or the keys.
            ftype = torch.float64
            span, lo = span.to(ftype), lo.to(ftype)
        scale = (n_buckets - 2).to(ftype) / span
        usable &= torch.isfinite(scale)  # a subnormal span overflows it: one bucket as well
        self.ftype, self.lo = ftype, torch.where(usable, lo, 0.0)
        self.scale = torch.where(usable, scale, 0.0)
        self.offset = 1 - self.lo * self.scale + row_base[:-1].to(ftype)

        reserved = row_base[:-1] + n_buckets
        keys = torch.cat([self.keys(b, part_count) for b in bound_parts] + [reserved])
        values = torch.cat(list(bound_parts) + [torch.full(
            (n_rows,), math.inf, dtype=bound_parts[0].dtype, device=lo.device)])
        self.bounds, start = group(keys, int(row_base[-1]), values)
        # Per bucket: the position of its first boundary, times 2, + 1 if it holds several.
        several = (start[1:] - start[:-1]) > 1
        self.lookup = start[:-1]
        self.lookup *= 2
        self.lookup += several
        # Each boundary's interval: the boundaries of its row below it, i.e. its bucket's
        # first position plus the boundaries of its bucket below it.
        n_bounds = keys.shape[0] - n_rows
        self.bound_intervals = self._count(values[:n_bounds], keys[:n_bounds], strict=True)

    def keys(self, values: torch.Tensor, row_count: torch.Tensor, r0: int = 0,
             r1: int | None = None) -> torch.Tensor:
        """Bucket keys (int64) of values grouped row after row, ``row_count`` per row of rows
        ``r0:r1``.

        The same separate operations for every value (no fused multiply-add) keep the key
        monotone in the value within a row, whatever the rounding."""
        y = torch.repeat_interleave(self.lo[r0:r1], row_count)
        y = torch.maximum(y, values.to(self.ftype), out=y)
        y *= torch.repeat_interleave(self.scale[r0:r1], row_count)
        y += torch.repeat_interleave(self.offset[r0:r1], row_count)
        return y.to(torch.int64)

    def intervals(self, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Intervals (int64) of ``values``, given their bucket ``keys``."""
        return self._count(values, keys, strict=False)

    def _count(self, values: torch.Tensor, keys: torch.Tensor, strict: bool) -> torch.Tensor:
        # first position of the bucket + #{its boundaries <= value} (< value when strict)
        interval = self.lookup[keys]
        crowded = nonzero((interval & 1) != 0)
        interval >>= 1
        first = interval[crowded]
        below = self.bounds[interval]
        interval += below < values if strict else below <= values
        if crowded.shape[0]:  # buckets with several boundaries: compare with the others too
            others = self.lookup[keys[crowded] + 1] >> 1  # (the next key is in the row)
            others -= first + 1
            start = offsets(others)
            member = (torch.repeat_interleave(first + 1 - start[:-1], others)
                      + torch.arange(int(start[-1]), device=keys.device))
            b, v = self.bounds[member], torch.repeat_interleave(values[crowded], others)
            interval[crowded] += segment_sum(b < v if strict else b <= v, start)
        return interval
