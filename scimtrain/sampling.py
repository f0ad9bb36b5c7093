"""Sampling plans: which cells go in which batch, as a pure function of (seed, epoch, rank, k).

Two modes:

- ``weighted`` (SCimilarity's): each batch is ``batch_size`` cells drawn by weight *without*
  replacement inside the batch and *with* replacement across batches. A batch is drawn by
  taking i.i.d. draws from the weights (inverse CDF: O(log N) each) and keeping first
  occurrences until the batch is full. That is exactly successive sampling without
  replacement, the distribution ``np.random.choice(p=w, replace=False)`` draws, without its
  O(N) cost per batch. When the batch is a large share of the weight mass (tiny selections),
  draws are mostly repeats, and the plan switches to Gumbel top-k, which is the same
  distribution in O(N).
- ``full``: every cell once per epoch in a shuffled order, split into near-equal batches so
  that every rank gets the same number of batches and no cell is dropped or repeated.

Every batch comes from its own random stream seeded by (seed, epoch, rank, batch), so a batch
can be computed without computing the ones before it: resuming skips batches for free, and
DataLoader workers compute only the batches they serve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Mode = Literal["weighted", "full"]
# Above this share of the weight mass per batch, rejection of repeats gets slow; use top-k.
_TOPK_MASS_SHARE = 0.25


class SamplingError(ValueError):
    """Weights or sizes that cannot make a plan; the message says which and how to fix."""


@dataclass(frozen=True)
class SamplingPlan:
    """Batches of positions (``0..N-1``, into the selection's cell table) for any epoch/rank.

    Args:
        weights: one positive finite weight per cell (ignored by ``full`` mode but checked).
        batch_size: cells per batch.
        n_batches: batches per epoch *per rank* in ``weighted`` mode; ``full`` mode derives it.
        seed: the plan's seed.
        mode: ``"weighted"`` or ``"full"``.
        world_size: number of ranks sharing the plan.
    """

    weights: np.ndarray
    batch_size: int
    n_batches: int = 100
    seed: int = 0
    mode: Mode = "weighted"
    world_size: int = 1
    _cdf: np.ndarray = field(init=False, repr=False, compare=False)
    _use_topk: bool = field(init=False, repr=False, compare=False)
    _order: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        n = w.size
        if n == 0:
            raise SamplingError("the selection is empty: there are no cells to sample from")
        bad = ~np.isfinite(w) | (w <= 0)
        if bad.any():
            raise SamplingError(
                f"{int(bad.sum())} sampling weights are zero, negative or not finite (first at "
                f"position {int(np.flatnonzero(bad)[0])}: {w[bad][0]!r}); every selected cell "
                "needs a positive weight: drop those cells or fix the weights")
        if self.mode not in ("weighted", "full"):
            raise SamplingError(f"mode must be 'weighted' or 'full', not {self.mode!r}")
        if self.batch_size < 1 or (self.mode == "weighted" and self.n_batches < 1):
            raise SamplingError(f"batch_size ({self.batch_size}) and n_batches "
                                f"({self.n_batches}) must be at least 1")
        if self.world_size < 1:
            raise SamplingError(f"world_size must be at least 1, not {self.world_size}")
        if self.mode == "weighted" and self.batch_size > n:
            raise SamplingError(
                f"batch_size {self.batch_size} is larger than the {n} selected cells; a batch "
                "holds distinct cells, so lower --batch_size or select more cells")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "_cdf", np.cumsum(w))
        b = min(self.batch_size, n)
        top_mass = np.partition(w, n - b)[n - b:].sum()
        object.__setattr__(self, "_use_topk", bool(top_mass > _TOPK_MASS_SHARE * w.sum()))

    @property
    def n_cells(self) -> int:
        return self.weights.size

    def batches_per_rank(self) -> int:
        """Batches each rank yields per epoch (equal across ranks)."""
        if self.mode == "weighted":
            return self.n_batches
        per_batch_world = self.batch_size * self.world_size
        return -(-self.n_cells // per_batch_world)

    def batch(self, epoch: int, rank: int, k: int) -> np.ndarray:
        """Positions of the cells in batch ``k`` of ``epoch`` on ``rank`` (int64 array)."""
        if not 0 <= rank < self.world_size:
            raise SamplingError(f"rank {rank} is outside 0..{self.world_size - 1}")
        if not 0 <= k < self.batches_per_rank():
            raise SamplingError(f"batch {k} is outside 0..{self.batches_per_rank() - 1}")
        if self.mode == "full":
            return self._full_batch(epoch, rank, k)
        rng = np.random.default_rng([self.seed, epoch, rank, k])
        return self._weighted_batch(rng)

    def epoch(self, epoch: int, rank: int = 0) -> list[np.ndarray]:
        """Every batch of one epoch on one rank, in order."""
        return [self.batch(epoch, rank, k) for k in range(self.batches_per_rank())]

    # ------------------------------------------------------------------ internals

    def _weighted_batch(self, rng: np.random.Generator) -> np.ndarray:
        total = self._cdf[-1]
        b = self.batch_size
        if self._use_topk:
            # Gumbel top-k: keys log(w) + Gumbel; the k largest, in decreasing key order, are a
            # successive sample without replacement.
            keys = np.log(self.weights) + rng.gumbel(size=self.n_cells)
            chosen = np.argpartition(-keys, b - 1)[:b]
            return chosen[np.argsort(-keys[chosen], kind="stable")].astype(np.int64)
        picked = np.empty(0, dtype=np.int64)
        while picked.size < b:
            need = b - picked.size
            draws = np.searchsorted(self._cdf, rng.random(need + need // 8 + 8) * total,
                                    side="right")
            draws = np.minimum(draws, self.n_cells - 1)  # guard u*total rounding to total
            merged = np.concatenate([picked, draws])
            _, first = np.unique(merged, return_index=True)
            picked = merged[np.sort(first)][:b]  # first occurrences, in draw order
        return picked

    def _full_batch(self, epoch: int, rank: int, k: int) -> np.ndarray:
        order = self._order.get(epoch)
        if order is None:  # one O(N) shuffle per epoch, kept for the epoch's other batches
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_cells)
            self._order.clear()
            self._order[epoch] = order
        n_total = self.batches_per_rank() * self.world_size
        # Batch j of the epoch is the j-th of n_total near-equal slices; rank r owns j = r, r+W, ...
        j = k * self.world_size + rank
        start = (j * self.n_cells) // n_total
        stop = ((j + 1) * self.n_cells) // n_total
        return order[start:stop].astype(np.int64)
