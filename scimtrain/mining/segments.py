"""Tensor operations on values grouped row after row (ragged rows, one segment per row).

A segment layout is given by per-row ``counts`` or by ``starts`` (the counts' running sum with
a leading 0, one entry more than there are rows). Everything stays on the tensors' device.
"""

from __future__ import annotations

import torch

__all__ = ["group", "nonzero", "offsets", "row_extreme", "segment_sum"]


def offsets(counts: torch.Tensor) -> torch.Tensor:
    """Segment starts of ``counts``: ``[0, c0, c0 + c1, ...]`` (one entry more)."""
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0))


def nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the nonzero entries of ``mask``, ascending."""
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


def segment_sum(flags: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Per segment of ``starts``, the number of True ``flags`` (int64)."""
    segment = torch.repeat_interleave(torch.arange(starts.shape[0] - 1, device=flags.device),
                                      starts[1:] - starts[:-1], output_size=flags.shape[0])
    return torch.zeros(starts.shape[0] - 1, dtype=torch.long, device=flags.device) \
        .index_add_(0, segment, flags.long())


def row_extreme(values: torch.Tensor, counts: torch.Tensor, fill: float,
                largest: bool) -> torch.Tensor:
    """Per row (``counts`` values each), the largest or smallest value; ``fill`` if none."""
    n_rows = counts.shape[0]
    rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts,
                                   output_size=values.shape[0])
    out = torch.full((n_rows,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, rows, values, "amax" if largest else "amin")


def group(keys: torch.Tensor, n_keys: int, values: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` lined up by their ``keys`` in [0, n_keys) (stable: ties keep their order),
    and the ``n_keys + 1`` starts of each key's run."""
    sorted_keys, order = torch.sort(keys, stable=True)
    # Starts by binary search rather than bincount: deterministic on CUDA too.
    return values[order], torch.searchsorted(
        sorted_keys, torch.arange(n_keys + 1, device=keys.device))
