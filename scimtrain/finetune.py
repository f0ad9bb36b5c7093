"""Fine-tuning (``--init_from MODEL_FOLDER --freeze 1``, docs/scimilarity.md §9): start from a
trained model and, optionally, train only the encoder's bottleneck (and the decoder).

:func:`load_pretrained` copies a model folder's encoder and decoder (scimtrain's or one of
SCimilarity's releases, read by :func:`~scimtrain.model_folder.read_model_folder`) into a model
whose genes may differ from the folder's: the gene-facing weights (the encoder's first Linear's
columns, the decoder's last Linear's rows) are matched by gene symbol, and a gene the folder
lacks starts at zero (it adds nothing to the first layer, as a zero-filled input column would
in SCimilarity's inference). :func:`freeze_encoder` freezes what SCimilarity's
``load_state(freeze=True)`` means to freeze (its loops find nothing to freeze,
docs/scimilarity.md §9).

Frozen BatchNorm: a frozen BatchNorm layer is put in eval mode for good (its class becomes
:class:`FrozenBatchNorm1d`, whose ``train()`` keeps it in eval mode, so the Trainer's
``model.train()`` calls leave it there). It then normalises with its loaded running statistics
and never updates them. The alternative, momentum 0 in train mode, would keep the statistics
too but normalise each batch with the batch's own statistics, so the frozen layers would
compute a different function in training than at inference (where the loaded statistics are
used) and the bottleneck would be fitted to features it never sees afterwards; it would also
still count ``num_batches_tracked``. With eval mode the frozen part computes exactly the loaded
model's features in training and at inference. Dropout stays active (it has no state; it is
part of the training recipe), and so do the PReLU activations, which the intent does not name.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from scimtrain.model import EncoderDecoder
from scimtrain.model_folder import ModelFolder, ModelFolderError


class FrozenBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d that stays in eval mode: it normalises with its running statistics and
    never updates them, whatever ``train()`` says. Same parameters and buffers (and state-dict
    keys) as ``nn.BatchNorm1d``."""

    def train(self, mode: bool = True) -> FrozenBatchNorm1d:
        return super().train(False)


def load_pretrained(model: EncoderDecoder, folder: ModelFolder,
                    genes: Sequence[str]) -> list[str]:
    """Copy ``folder``'s weights into ``model``, whose inputs are ``genes`` (in model order).

    Returns the model genes the folder lacks (their weights start at zero).

    Raises:
        ModelFolderError: the folder's architecture differs from the model's (the message
            names the flags to set).
    """
    check_architecture(folder, model.encoder.latent_dim, model.hidden_dim)
    genes = list(genes)
    position = {g: i for i, g in enumerate(folder.gene_order)}
    missing = [g for g in genes if g not in position]
    if len(missing) == len(genes):
        raise ModelFolderError(f"none of the run's {len(genes)} genes is in {folder.path}'s "
                               "gene_order.tsv: check that both use the same gene naming")
    index = torch.tensor([position.get(g, -1) for g in genes], dtype=torch.long)
    encoder_state = dict(folder.encoder_state)
    decoder_state = dict(folder.decoder_state)
    first = _linear_name(model.encoder, first=True)
    last = _linear_name(model.decoder, first=False)
    encoder_state[f"{first}.weight"] = _pick(encoder_state[f"{first}.weight"], index, dim=1)
    decoder_state[f"{last}.weight"] = _pick(decoder_state[f"{last}.weight"], index, dim=0)
    decoder_state[f"{last}.bias"] = _pick(decoder_state[f"{last}.bias"], index, dim=0)
    ModelFolder(folder.path, encoder_state, decoder_state, genes, folder.latent_dim,
                folder.hidden_dim, folder.hyperparameters).load_into(model)
    if missing:
        warnings.warn(f"{len(missing)} of the run's {len(genes)} genes are not in "
                      f"{folder.path}'s gene order; their weights start at zero (e.g. "
                      f"{missing[:5]})", stacklevel=2)
    return missing


def check_architecture(folder: ModelFolder, latent_dim: int, hidden_dim: Sequence[int]) -> None:
    """Raise ModelFolderError, naming the flags to set, unless ``folder`` holds a model of
    these sizes."""
    if (folder.latent_dim, list(folder.hidden_dim)) != (int(latent_dim), list(hidden_dim)):
        raise ModelFolderError(
            f"{folder.path} holds a model with --latent_dim {folder.latent_dim} --hidden_dim "
            f"{' '.join(map(str, folder.hidden_dim))}; this run has --latent_dim {latent_dim} "
            f"--hidden_dim {' '.join(map(str, hidden_dim))}: pass the folder's sizes")


def freeze_encoder(encoder: nn.Module) -> list[str]:
    """Freeze every Linear and BatchNorm of ``encoder`` except the last Linear (the
    bottleneck): no gradients, and BatchNorms become :class:`FrozenBatchNorm1d` (running
    statistics fixed, see the module docstring). Returns the frozen modules' names."""
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    bottleneck = linears[-1] if linears else None
    frozen = []
    for name, module in list(encoder.named_modules()):
        if isinstance(module, nn.BatchNorm1d) and not isinstance(module, FrozenBatchNorm1d):
            module.__class__ = FrozenBatchNorm1d  # same fields; only train() differs
            module.train(False)
        if isinstance(module, (nn.Linear, nn.BatchNorm1d)) and module is not bottleneck:
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(name)
    return frozen


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should get: those that need gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def _linear_name(module: nn.Module, first: bool) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[0] if first else names[-1]


def _pick(weights: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``weights`` gathered along ``dim`` by ``index``; index -1 gives zeros."""
    found = index.clamp_min(0)
    picked = weights.index_select(dim, found).clone()
    shape = [1] * weights.dim()
    shape[dim] = -1
    return picked * (index >= 0).to(weights.dtype).reshape(shape)
