"""Ontology-aware triplet mining and the training losses (SPEC §5), on plain tensors.

Mining follows SCimilarity's rules exactly but replaces its per-pair Python loop with
one sort per anchor row (DESIGN.md, "The miner"): an anchor's candidate negatives depend
only on its label, so sorting its row of the squared-distance matrix once (non-candidates
pushed to +inf) turns every per-pair question into a binary search:

* hard count      = #candidates with ``D[a,n] < D[a,p] + margin``   (searchsorted, left)
* semihard window = ``D[a,p] < D[a,n] < D[a,p] + margin``           (two searchsorted)
* random window   = ``D[a,n] < D[a,p] + margin``
* hardest         = the row's first candidate, if it is hard.

A uniform pick inside a window is one random number per pair. Cost is
O(B² log B + pairs · log B) time and O(B²) memory (chunked over anchor rows), never
O(pairs · B).
"""

from __future__ import annotations

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
    """B×d → B×B squared Euclidean distances, ``|x|² + |y|² - 2x·y`` as SCimilarity computes them.

    Not clamped at 0, so values match SCimilarity's ``pdist`` to rounding.
    """
    sq = (embeddings * embeddings).sum(dim=1)
    return -2.0 * (embeddings @ embeddings.T) + sq[None, :] + sq[:, None]


def _bool_matrix(matrix: torch.Tensor | np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"{name} must be a square L×L matrix over the label positions, got shape {tuple(t.shape)}"
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
            if v > 0) or ``"random"`` (uniform among v > 0), with v = D[a,p] - D[a,n] + margin.
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

    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    dist = squared_distances(emb)

    # Work on the labels present only: an L'×L' relation with L' <= B.
    present, inverse = torch.unique(torch.cat([lab, neg_lab]), return_inverse=True)
    lab, neg_lab = inverse[:n], inverse[n:]
    sub = desc[present][:, present]
    related = sub | sub.T  # strict ancestor-or-descendant

    same = lab[:, None] == lab[None, :]
    pairs = torch.triu(same, diagonal=1)
    if studies is not None:
        st = torch.as_tensor(studies, device=device)
        if st.ndim != 1 or st.shape[0] != n:
            raise ValueError(
                f"studies must be None or a 1-D tensor with one entry per embedding row ({n}), "
                f"got shape {tuple(st.shape)}"
            )
        pairs &= st[:, None] != st[None, :]
    pairs_per_row = pairs.sum(dim=1)
    anchors = pairs_per_row.nonzero().squeeze(1)
    n_pairs = int(pairs_per_row.sum())

    # One number per pair in (anchor, positive) order, drawn up front so that the result
    # does not depend on how rows are chunked.
    u = _uniform(n_pairs, generator, device) if selection != "hardest" and n_pairs else None

    out_a, out_p, out_n = [], [], []
    num_hard = torch.zeros((), dtype=torch.long, device=device)
    num_viable = torch.zeros((), dtype=torch.long, device=device)
    rows_per_chunk = max(1, int(chunk_elements) // max(n, 1))
    offset = 0
    for start in range(0, anchors.numel(), rows_per_chunk):
        rows = anchors[start:start + rows_per_chunk]
        d_rows = dist[rows]
        cand = ~same[rows] & ~related[lab[rows]][:, neg_lab]
        sorted_d, order = d_rows.masked_fill(~cand, float("inf")).sort(dim=1, stable=True)
        n_cand = cand.sum(dim=1)

        row_pairs = pairs[rows]
        r, p = row_pairs.nonzero(as_tuple=True)
        # Each pair's slot within its row, so pair values form a padded R×K block that
        # searchsorted can take row by row (K = most pairs of one anchor).
        slot = row_pairs.cumsum(dim=1)[r, p] - 1
        k_max = int(pairs_per_row[rows].max())
        d_ap = d_rows[r, p]
        query = d_rows.new_full((rows.numel(), k_max), float("inf"))
        query[r, slot] = d_ap + margin
        hi = torch.searchsorted(sorted_d, query)[r, slot]  # candidates with D[a,n] < D[a,p]+m
        num_hard += hi.sum()
        num_viable += (n_cand * pairs_per_row[rows]).sum()

        if selection == "semihard":
            query[r, slot] = d_ap
            lo = torch.searchsorted(sorted_d, query, right=True)[r, slot]  # D[a,n] <= D[a,p]
        else:
            lo = torch.zeros_like(hi)
        width = hi - lo
        keep = width > 0
        if selection == "hardest":
            pick = lo
        else:
            u_chunk = u[offset:offset + r.numel()]
            pick = lo + (u_chunk * width).floor().long().clamp_max(width - 1).clamp_min(0)
        offset += r.numel()
        keep_idx = keep.nonzero().squeeze(1)
        out_a.append(rows[r[keep_idx]])
        out_p.append(p[keep_idx])
        out_n.append(order[r[keep_idx], pick[keep_idx]])

    empty = torch.zeros(0, dtype=torch.long, device=device)
    anchor = torch.cat(out_a) if out_a else empty
    positive = torch.cat(out_p) if out_p else empty
    negative = torch.cat(out_n) if out_n else empty
    if anchor.numel() == 0 and dummy_triplet:
        anchor = positive = negative = torch.zeros(1, dtype=torch.long, device=device)
    return anchor, positive, negative, int(num_hard), int(num_viable)


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
        raise ValueError(f"labels must be a 1-D tensor of label positions, got shape {tuple(labels.shape)}")
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
            raise ValueError(f"triplet_loss_weight must be in [0, 1], got {self.triplet_loss_weight}")
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
