"""A batch's structure for mining: its anchor-positive pairs and each anchor's candidates."""

from __future__ import annotations

import torch

from .segments import nonzero, offsets

__all__ = ["candidate_table", "same_label_pairs"]


def same_label_pairs(lab: torch.Tensor, studies: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (anchor, positive) with equal labels and anchor < positive (and, with ``studies``,
    different studies), in (anchor, positive) order, as two int64 tensors.

    O(pairs) work, no B×B mask. ``lab``: B int64 label positions; ``studies``: B ids or None.
    """
    n, device = lab.shape[0], lab.device
    order = torch.argsort(lab, stable=True)  # cells grouped by label, ascending index inside
    group_end = offsets(torch.bincount(lab))[1:]
    idx = torch.arange(n, device=device)
    place = torch.zeros(n, dtype=idx.dtype, device=device)
    place[order] = idx  # each cell's slot in `order`
    later = group_end[lab] - place - 1  # same-label cells after it: its positives
    first = offsets(later)
    # the k-th positive of a cell sits k + 1 slots after it in `order`
    slot = (torch.repeat_interleave(place + 1 - first[:-1], later)
            + torch.arange(int(first[-1]), device=device))
    anchor, positive = torch.repeat_interleave(idx, later), order[slot]
    if studies is not None:
        keep = nonzero(torch.repeat_interleave(studies, later) != studies[order][slot])
        anchor, positive = anchor[keep], positive[keep]
    return anchor, positive


def candidate_table(lab: torch.Tensor, neg_lab: torch.Tensor, desc: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cells are candidate negatives for an anchor of each label present.

    Args:
        lab: B int64 label positions; ``neg_lab``: the labels that decide ontology exclusion
            (after label perturbation, the original ones); ``desc``: L×L bool descendant matrix.

    Returns:
        ``lab`` renumbered to the L' labels present, and ``table`` (L'×B bool): ``[x, n]`` is
        True when cell n's label is not x and its negative label is not a strict ontology
        ancestor or descendant of x.
    """
    n_labels, device = desc.shape[0], lab.device
    present = nonzero(torch.bincount(torch.cat([lab, neg_lab]), minlength=n_labels))
    renumber = torch.zeros(n_labels, dtype=lab.dtype, device=device)
    renumber[present] = torch.arange(present.shape[0], device=device)
    lab, neg_lab = renumber[lab], renumber[neg_lab]
    sub = desc[present][:, present]
    excluded = (sub | sub.T)[:, neg_lab]
    excluded |= torch.arange(present.shape[0], device=device)[:, None] == lab[None, :]
    return lab, ~excluded
