"""``mine_triplets``: checks its inputs, then picks the path that mines them.

On the CPU the compiled path (``cpu_path``) runs unless the environment variable
``SCIMTRAIN_CPU_MINER`` is ``torch``; on other devices (CUDA) the torch path (``torch_path``).
Both pick the same triplets for the same generator state.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .checks import (
    bool_matrix,
    check_embeddings,
    check_margin,
    check_selection,
    check_studies,
    label_tensor,
)
from .torch_path import CHUNK_ELEMENTS, Triplets
from .torch_path import mine as mine_torch

__all__ = ["CPU_MINERS", "CPU_MINER_ENV", "mine_triplets"]

# Which miner runs on the CPU: "compiled" (default) or "torch" (read at every call, so a
# benchmark can compare them inside one training step: benchmarks/train_step.py --cpu-miner).
CPU_MINER_ENV = "SCIMTRAIN_CPU_MINER"
CPU_MINERS = ("compiled", "torch")


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
    chunk_elements: int | None = None,
) -> Triplets:
    """Mine one negative per anchor-positive pair of a batch (see ``scimtrain.mining``).

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
        chunk_elements: on the torch path, work on blocks of anchor rows of at most this many
            row × batch elements (default 2^22; the compiled CPU path goes one row at a
            time); results do not depend on it.

    Returns:
        ``(anchor, positive, negative, num_hard, num_viable)``: three int64 index tensors on
        the embeddings' device, ordered by (anchor, positive), and two python ints:
        ``num_hard`` = number of (pair, candidate) with v > 0, ``num_viable`` = number of
        (pair, candidate). A sampled negative is uniform over its pair's window; which one a
        given generator state picks is the same on every device and for any chunking.
    """
    check_embeddings(embeddings)
    margin = check_margin(margin)
    check_selection(selection)
    device = embeddings.device
    n = embeddings.shape[0]
    desc = bool_matrix(descendant, "descendant", device)
    lab = label_tensor(labels, "labels", n, desc.shape[0], device)
    neg_lab = lab if negative_labels is None else label_tensor(
        negative_labels, "negative_labels", n, desc.shape[0], device)
    st = check_studies(studies, n, device)
    if device.type == "cpu" and cpu_miner() == "compiled":
        from . import cpu_path  # imported on first use: GPU runs never load numba

        return cpu_path.mine(embeddings, lab, neg_lab, st, desc, margin, selection, generator,
                             dummy_triplet=dummy_triplet)
    return mine_torch(embeddings, lab, neg_lab, st, desc, margin, selection, generator,
                      dummy_triplet=dummy_triplet,
                      chunk_elements=CHUNK_ELEMENTS if chunk_elements is None else chunk_elements)


def cpu_miner() -> str:
    """The CPU path ``SCIMTRAIN_CPU_MINER`` asks for ("compiled" when unset); ``ValueError``
    naming the variable for any other value."""
    name = os.environ.get(CPU_MINER_ENV, "compiled")
    if name not in CPU_MINERS:
        raise ValueError(f"{CPU_MINER_ENV} must be one of {CPU_MINERS}, got {name!r}")
    return name


