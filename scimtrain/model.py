"""Encoder and decoder MLPs (docs/scimilarity.md §4), parameter-compatible with SCimilarity.

The module layout is part of the contract: both networks hold an ``nn.ModuleList``
called ``network`` with one ``nn.Sequential`` per hidden block and a bare ``nn.Linear``
last, so an encoder state dict reads ``network.0.1.weight`` ... ``network.3.weight`` (three
hidden blocks) and SCimilarity's ``CellEmbedding`` can load an encoder trained here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Decoder", "Encoder", "EncoderDecoder", "encoder_layer_sizes"]


def _check_sizes(n_genes: int, latent_dim: int, hidden_dim: Sequence[int]) -> list[int]:
    if int(n_genes) < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    if int(latent_dim) < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    sizes = [int(h) for h in hidden_dim]
    if not sizes or min(sizes) < 1:
        raise ValueError(
            f"hidden_dim must be a non-empty list of positive layer sizes, got {list(hidden_dim)}"
        )
    return sizes


def _check_p(name: str, p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


class Encoder(nn.Module):
    """Expression (cells × n_genes) → unit-length embedding (cells × latent_dim).

    Block i is Dropout(p_i) → Linear → BatchNorm1d → PReLU with p_0 = ``input_dropout`` and
    p_i = ``dropout`` after; a final Linear maps to ``latent_dim``; rows are L2-normalised.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 128,
        hidden_dim: Sequence[int] = (1024, 1024, 1024),
        dropout: float = 0.5,
        input_dropout: float = 0.4,
    ) -> None:
        super().__init__()
        sizes = _check_sizes(n_genes, latent_dim, hidden_dim)
        dropout = _check_p("dropout", dropout)
        input_dropout = _check_p("input_dropout", input_dropout)
        self.n_genes = int(n_genes)
        self.latent_dim = int(latent_dim)
        self.network = nn.ModuleList()
        fan_in = self.n_genes
        for i, h in enumerate(sizes):
            self.network.append(
                nn.Sequential(
                    nn.Dropout(p=input_dropout if i == 0 else dropout),
                    nn.Linear(fan_in, h),
                    nn.BatchNorm1d(h),
                    nn.PReLU(),
                )
            )
            fan_in = h
        self.network.append(nn.Linear(fan_in, self.latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.network:
            x = layer(x)
        return F.normalize(x, p=2, dim=1)


class Decoder(nn.Module):
    """Embedding (cells × latent_dim) → reconstruction (cells × n_genes), no output activation.

    ``hidden_dim`` is in the decoder's own order, i.e. the encoder's sizes reversed (as in
    SCimilarity; ``EncoderDecoder`` does the reversal). The first block is Linear →
    BatchNorm1d → PReLU, later blocks Dropout(``dropout``) → Linear → BatchNorm1d → PReLU,
    then a final Linear to ``n_genes``.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 128,
        hidden_dim: Sequence[int] = (1024, 1024, 1024),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        sizes = _check_sizes(n_genes, latent_dim, hidden_dim)
        dropout = _check_p("dropout", dropout)
        self.n_genes = int(n_genes)
        self.latent_dim = int(latent_dim)
        self.network = nn.ModuleList()
        fan_in = self.latent_dim
        for i, h in enumerate(sizes):
            block = [nn.Linear(fan_in, h), nn.BatchNorm1d(h), nn.PReLU()]
            if i > 0:
                block.insert(0, nn.Dropout(p=dropout))
            self.network.append(nn.Sequential(*block))
            fan_in = h
        self.network.append(nn.Linear(fan_in, self.n_genes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.network:
            z = layer(z)
        return z


class EncoderDecoder(nn.Module):
    """Both networks; ``forward(x)`` returns ``(embedding, reconstruction)``.

    ``hidden_dim`` is in the encoder's order; the decoder gets it reversed. Save
    ``model.encoder.state_dict()`` and ``model.decoder.state_dict()`` separately for a
    SCimilarity-style model folder (docs/scimilarity.md §7).
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int = 128,
        hidden_dim: Sequence[int] = (1024, 1024, 1024),
        dropout: float = 0.5,
        input_dropout: float = 0.4,
    ) -> None:
        super().__init__()
        self.hidden_dim = [int(h) for h in hidden_dim]
        self.encoder = Encoder(n_genes, latent_dim, self.hidden_dim, dropout, input_dropout)
        self.decoder = Decoder(n_genes, latent_dim, self.hidden_dim[::-1], dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def encoder_layer_sizes(encoder: nn.Module) -> dict[str, list[int]]:
    """``{state-dict key: shape as a list}`` for ``layer_sizes.json`` (docs/scimilarity.md §7).

    Buffers are included as in SCimilarity (BatchNorm's ``num_batches_tracked`` maps to
    ``[]``), because its inference code rebuilds the architecture from this file.
    """
    return {name: list(t.shape) for name, t in encoder.state_dict().items()}
