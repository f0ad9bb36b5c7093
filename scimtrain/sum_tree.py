"""A sum tree over N positive weights: O(log N) weighted draws and weight updates.

Layout: ``tree[N + i]`` is weight ``i`` and every internal node ``j`` in ``1..N-1`` holds
``tree[2j] + tree[2j + 1]`` (the array form of a segment tree; for N not a power of two the
leaves sit at two depths, which does not matter for sums or draws). Every internal node is
always *recomputed* from its two children, never adjusted by a difference, so the tree is a
pure function of its leaves: a tree updated batch after batch is bit-identical to one built
from the same leaves (what makes a resumed sampler exact), and no rounding drift accumulates.
Every operation is vectorised over many leaves at once (one numpy call per tree level).
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """Weights ``0..N-1`` (float64) with their partial sums.

    Args:
        weights: N >= 1 positive finite weights (copied).
    """

    def __init__(self, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"weights must be a non-empty 1-D array, got shape {w.shape}")
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("weights must be positive and finite")
        self.n = w.size
        self.tree = np.zeros(2 * self.n, dtype=np.float64)
        self.tree[self.n:] = w
        # Level by level from the bottom: nodes [lo, hi) have their children in [2lo, 2hi).
        hi = self.n
        while hi > 1:
            lo = 1 << (int(hi - 1).bit_length() - 1)
            self.tree[lo:hi] = self.tree[2 * lo:2 * hi:2] + self.tree[2 * lo + 1:2 * hi:2]
            hi = lo

    @property
    def leaves(self) -> np.ndarray:
        """The weights (a view: read it, change it only through :meth:`set`)."""
        return self.tree[self.n:]

    @property
    def total(self) -> float:
        return float(self.tree[1])  # the root (the only leaf when N == 1)

    def find(self, u: np.ndarray) -> np.ndarray:
        """Positions ``i`` with ``cumsum[i-1] <= u < cumsum[i]`` for each ``u`` in
        ``[0, total)``: weighted draws when ``u`` is uniform. A ``u`` at or past the end by
        rounding lands on a valid (positive-weight) leaf."""
        u = np.array(u, dtype=np.float64, copy=True)
        node = np.ones(u.size, dtype=np.int64)
        active = np.arange(u.size)
        while active.size:
            at = node[active]
            internal = at < self.n
            active, at = active[internal], at[internal]
            if not active.size:
                break
            left = self.tree[2 * at]
            right = u[active] >= left
            u[active] -= np.where(right, left, 0.0)
            node[active] = 2 * at + right
        return node - self.n

    def set(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Set the weights at distinct ``positions`` and recompute their ancestors."""
        nodes = np.asarray(positions, dtype=np.int64) + self.n
        self.tree[nodes] = values
        # A node's last recomputation comes after its children's last ones: a parent is one
        # more step up than its deepest changed child (leaves sit at two depths).
        nodes = _parents(nodes)
        while nodes.size:
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]
            nodes = _parents(nodes)


def _parents(nodes: np.ndarray) -> np.ndarray:
    """The distinct parents of ``nodes`` (node 1, the root, has none)."""
    parents = np.unique(nodes >> 1)
    return parents[parents >= 1]
