"""Squared Euclidean distances of a batch's embeddings, as SCimilarity's ``pdist``."""

from __future__ import annotations

import torch

__all__ = ["HALVES_FROM", "checked_distances", "squared_distances"]

HALVES_FROM = 256  # batch size from which the distance product skips its lower-left quarter


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """B×d → B×B squared Euclidean distances ``|x|² + |y|² - 2x·y``, as SCimilarity's
    ``pdist``.

    Not clamped at 0, so values match SCimilarity's ``pdist`` to rounding. From B = 256 on, the
    lower-left quarter is the transpose of the upper-right one (the product is symmetric):
    an eighth less arithmetic, and the matrix is exactly symmetric off the diagonal blocks.
    """
    return _distances(embeddings, (embeddings * embeddings).sum(dim=1))


def checked_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """``squared_distances`` of the detached embeddings (half precision in float32), after
    refusing non-finite or overflowing ones with a ``ValueError``."""
    emb = embeddings.detach()
    if emb.dtype in (torch.float16, torch.bfloat16):
        emb = emb.float()
    sq = (emb * emb).sum(dim=1)
    if not float(sq.max()) <= torch.finfo(emb.dtype).max / 8:
        raise ValueError(
            "embeddings contain NaN/inf or values too large to square (has the model "
            "diverged?): triplet mining needs finite distances")
    return _distances(emb, sq)


def _distances(embeddings: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``squared_distances`` given the squared norms ``sq``."""
    n = embeddings.shape[0]
    if n < HALVES_FROM:
        return torch.addmm(sq[None, :], embeddings, embeddings.T, alpha=-2.0).add_(sq[:, None])
    out = torch.empty((n, n), dtype=embeddings.dtype, device=embeddings.device)
    h = n // 2
    for r0, r1 in ((0, h), (h, n)):  # rows r0:r1 against columns r0: (BLAS writes in place)
        block = out[r0:r1, r0:]
        torch.addmm(sq[None, r0:], embeddings[r0:r1], embeddings[r0:].T, alpha=-2.0, out=block)
        block.add_(sq[r0:r1, None])
    out[h:, :h].copy_(out[:h, h:].T)
    return out
