"""The training losses (docs/scimilarity.md §5) on plain tensors: triplet, MSE, their mix, L1,
and the label perturbation SCimilarity applies before mining.

Mining itself lives in ``scimtrain.mining``; ``mine_triplets`` and ``squared_distances`` are
re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mining import SELECTIONS, mine_triplets, squared_distances  # (re-exported)
from .mining.checks import bool_matrix as _bool_matrix
from .mining.checks import check_margin as _check_margin
from .mining.checks import label_tensor as _label_tensor
from .mining.checks import uniform as _uniform

__all__ = [
    "L1_LAYERS",
    "SELECTIONS",
    "LossConfig",
    "MinedTriplets",
    "compute_loss",
    "l1_layer",
    "l1_penalty",
    "mine_triplets",
    "mixed_loss",
    "perturb_labels",
    "reconstruction_loss",
    "squared_distances",
    "triplet_loss",
]


@torch.no_grad()
def perturb_labels(
    labels: torch.Tensor,
    parent: torch.Tensor | np.ndarray,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SCimilarity's label coarse-graining before mining (docs/scimilarity.md §5, off by default).

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
    # index_select, not embeddings[anchor]: the backward of advanced indexing is index_put_
    # with accumulate=True, which on a multi-threaded CPU adds floats atomically in thread
    # timing order once triplets × d >= 32768 (two identical runs then differ, issue 17).
    # index_select's backward (index_add_) sums rows in index order: the same bits every
    # run, for any thread count, and faster (no atomic contention on the batch's rows).
    per = F.triplet_margin_loss(
        embeddings.index_select(0, anchor), embeddings.index_select(0, positive),
        embeddings.index_select(0, negative),
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


L1_LAYERS = ("last", "first")


def l1_layer(encoder: nn.Module, layer: str = "last") -> nn.Linear:
    """The encoder ``nn.Linear`` that the L1 penalty applies to (docs/scimilarity.md §5).

    ``"last"``: the bottleneck Linear, which SCimilarity's code penalises (its loop over
    ``encoder.network`` finds no other top-level Linear) and its released models were trained
    with; ``"first"``: the first hidden Linear, the documented intent (gene-level sparsity).
    """
    if layer not in L1_LAYERS:
        raise ValueError(f"layer must be one of {L1_LAYERS} (SCimilarity's code: 'last'), "
                         f"got {layer!r}")
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("encoder has no nn.Linear layer to apply the L1 penalty to")
    return linears[-1] if layer == "last" else linears[0]


def l1_penalty(encoder: nn.Module, l1: float, lr: float, layer: str = "last") -> torch.Tensor:
    """``l1 * lr * (sum|W| + sum|b|)`` of one encoder ``nn.Linear`` (docs/scimilarity.md §5).

    ``layer`` picks it (see :func:`l1_layer`): ``"last"`` (default, SCimilarity's behaviour)
    or ``"first"``. ``lr`` is the scheduler's current learning rate. Returns a 0-d tensor on
    the parameters' device (zero when ``l1 == 0``).
    """
    linear = l1_layer(encoder, layer)
    if l1 == 0:
        return linear.weight.new_zeros(())
    norm = sum(p.abs().sum() for p in linear.parameters())
    return float(l1) * float(lr) * norm


# ----------------------------------------------------------------------------- entry point


class MinedTriplets(NamedTuple):
    """The triplets a loss used: batch positions (int64, on the embeddings' device) and the
    labels they were mined with (the perturbed ones when labels are perturbed)."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class LossConfig:
    """Loss settings, SCimilarity's defaults (docs/scimilarity.md §5, §8)."""

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
    return_triplets: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[
        torch.Tensor, dict[str, torch.Tensor], MinedTriplets]:
    """One step's loss and its docs/scimilarity.md §6 metrics.

    Args:
        embedding, reconstruction: the model's outputs for input ``x`` (B×d, B×genes).
        labels: B int label positions into ``descendant`` (and ``parent``).
        studies: B int study ids; ignored when ``config.sample_across_studies`` is False.
            Pass None for validation/test passes (docs/scimilarity.md §6: no cross-study
            rule there).
        descendant: L×L bool, ``[i, j]`` True when j is a strict descendant of i. Convert it
            to a tensor on the model's device once, outside the loop.
        config: margin, weight, selection, perturbation settings.
        parent: L×L bool direct-parent matrix; required when ``config.perturb_labels``.
        generator: the only source of randomness.
        return_triplets: also return the :class:`MinedTriplets` the loss used (triplet
            tracking reads them instead of mining again).

    Returns:
        ``(loss, metrics)``: ``loss`` carries the gradient; ``metrics`` maps ``loss``,
        ``triplet_loss``, ``mse``, ``hard_triplets`` (num_hard / num_viable, 0 when there are
        no viable triplets), ``num_nonzero_loss``, ``num_hard_triplets`` and
        ``num_viable_triplets`` to detached 0-d float tensors on the embedding's device
        (call ``.item()`` when logging, after ``backward``, to avoid an extra sync). The
        trainer adds the L1 penalty and learning rate. With ``return_triplets``, a third
        element: the :class:`MinedTriplets`.
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
    if return_triplets:
        return loss, metrics, MinedTriplets(anchor, positive, negative, mine_labels)
    return loss, metrics
