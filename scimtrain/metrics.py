"""Validation metrics (docs/scimilarity.md §6): ontology-aware silhouette, normalised MSE,
evaluation metric.

All take plain tensors and return python floats (they are logged once per pass).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .mining import squared_distances
from .mining.checks import bool_matrix as _bool_matrix
from .mining.checks import check_embeddings as _check_embeddings
from .mining.checks import label_tensor as _label_tensor

__all__ = ["evaluation_metric", "nmse", "ontology_asw"]


@torch.no_grad()
def ontology_asw(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    descendant: torch.Tensor | np.ndarray,
) -> float:
    """Ontology-aware average silhouette width on squared Euclidean distances.

    For each cell i (docs/scimilarity.md §6, SCimilarity's ``get_asw``):

    * same cluster: other cells whose label is i's label or a descendant of it;
    * ignored: cells whose label is an ancestor of i's label;
    * every other label is its own foreign cluster;
    * ``a_i`` = sum of distances to the c same-cluster cells / (c - 1);
    * ``b_i`` = smallest mean distance to a foreign cluster with more than one cell;
    * cells with c <= 1 or without such a foreign cluster are skipped (SCimilarity raises
      when a cell's foreign clusters are all single cells; here that cell is skipped);
    * ``s_i = (b_i - a_i) / max(a_i, b_i)``, taken as 0 when both are 0.

    Args:
        embeddings: B×d, on any device; computed there in float64.
        labels: B int label positions into ``descendant``.
        descendant: L×L bool, ``[i, j]`` True when label j is a strict descendant of label i.

    Returns:
        The mean of s_i over the cells not skipped; NaN when every cell is skipped.
    """
    _check_embeddings(embeddings)
    device = embeddings.device
    n = embeddings.shape[0]
    desc = _bool_matrix(descendant, "descendant", device)
    lab = _label_tensor(labels, "labels", n, desc.shape[0], device)
    if n == 0:
        return math.nan

    present, lab = torch.unique(lab, return_inverse=True)
    sub = desc[present][:, present]
    eye = torch.eye(present.numel(), dtype=torch.bool, device=device)
    same_label = eye | sub                 # [x, y]: y is x or below x
    foreign_label = ~(same_label | sub.T)  # neither below nor above x

    dist = squared_distances(embeddings.detach().to(torch.float64))
    same = same_label[lab][:, lab]
    same.fill_diagonal_(False)
    c = same.sum(dim=1)
    a = (dist * same).sum(dim=1) / (c - 1).clamp_min(1)

    count = torch.bincount(lab, minlength=present.numel())
    per_label_sum = dist.new_zeros(n, present.numel()).index_add_(1, lab, dist)
    eligible = foreign_label[lab] & (count > 1)[None, :]
    mean_to = (per_label_sum / count.clamp_min(1)).masked_fill(~eligible, math.inf)
    b = mean_to.min(dim=1).values

    keep = (c > 1) & eligible.any(dim=1)
    if not bool(keep.any()):
        return math.nan
    a, b = a[keep], b[keep]
    denom = torch.maximum(a, b)
    s = torch.where(denom > 0, (b - a) / torch.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def nmse(mse: float | torch.Tensor, x: torch.Tensor) -> float:
    """``mse / mean(x²)``: reconstruction error relative to the input's power (0 if x is 0)."""
    power = float(torch.as_tensor(x).detach().double().pow(2).mean())
    mse = float(mse)
    return mse / power if power > 0 else (0.0 if mse == 0 else math.inf)


def evaluation_metric(asw: float, nmse: float) -> float:
    """``(1 - asw) / 2 + nmse``; lower is better (docs/scimilarity.md §6)."""
    return (1.0 - float(asw)) / 2.0 + float(nmse)
