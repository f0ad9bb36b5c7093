"""Input checks shared by the miner, the losses and the metrics, and their one random draw.

Each check takes what a caller passed and returns it as a tensor on the working device, or
raises an error that names the argument and says what it must be.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SELECTIONS", "bool_matrix", "check_embeddings", "check_margin", "check_selection",
           "check_studies", "label_tensor", "uniform"]

SELECTIONS = ("semihard", "hardest", "random")


def bool_matrix(matrix: torch.Tensor | np.ndarray, name: str,
                device: torch.device) -> torch.Tensor:
    """A square L×L matrix (tensor or numpy, any dtype: nonzero is True) as a bool tensor on
    ``device``; ``ValueError`` naming ``name`` if it is not square."""
    t = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"{name} must be a square L×L matrix over the label positions, "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.bool:
        t = t != 0
    return t.to(device)


def label_tensor(labels: torch.Tensor | np.ndarray, name: str, n: int, n_labels: int,
                 device: torch.device) -> torch.Tensor:
    """``n`` integer label positions in [0, n_labels) as an int64 tensor on ``device``.

    Raises ``ValueError`` (wrong shape or a position outside the matrix) or ``TypeError``
    (not integers), naming ``name``."""
    t = torch.as_tensor(labels, device=device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per embedding row ({n}), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer label positions, got dtype {t.dtype}")
    t = t.long()
    if n:
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= n_labels:
            raise ValueError(
                f"{name} must be positions into the {n_labels}×{n_labels} descendant/parent "
                f"matrix (0..{n_labels - 1}), got values in [{low}, {high}]"
            )
    return t


def check_studies(studies: torch.Tensor | np.ndarray | None, n: int,
                  device: torch.device) -> torch.Tensor | None:
    """None, or ``n`` study ids as a tensor on ``device`` (``ValueError`` if not 1-D of n)."""
    if studies is None:
        return None
    t = torch.as_tensor(studies, device=device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"studies must be None or a 1-D tensor with one entry per embedding row ({n}), "
            f"got shape {tuple(t.shape)}"
        )
    return t


def check_embeddings(embeddings: torch.Tensor) -> None:
    """``ValueError`` unless ``embeddings`` is a 2-D tensor (cells × latent_dim)."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError(
            "embeddings must be a 2-D tensor (cells × latent_dim), got "
            f"{type(embeddings).__name__} of shape {tuple(getattr(embeddings, 'shape', ()))}"
        )


def check_margin(margin: float) -> float:
    """The margin as a float; ``ValueError`` unless it is > 0."""
    if not float(margin) > 0:
        raise ValueError(f"margin must be > 0 (SCimilarity's default is 0.05), got {margin}")
    return float(margin)


def check_selection(selection: str) -> str:
    """``selection`` if it is one of ``SELECTIONS``, else ``ValueError``."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return selection


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` float32 numbers uniform in [0, 1) from ``generator``, on ``device``.

    Drawn on the generator's own device (a CUDA generator cannot fill a CPU tensor and vice
    versa), so a CPU or CUDA generator works with tensors on either. float32: half the
    generator's work of float64, and 2^-24 steps are fine enough for windows of any batch
    (the miner multiplies in float64, exactly)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return u.to(device)
