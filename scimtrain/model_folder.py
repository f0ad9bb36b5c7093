"""The SCimilarity model folder: what ``scimilarity.CellEmbedding(folder)`` loads.

A folder holds ``encoder.ckpt`` and ``decoder.ckpt`` (``{"state_dict": ...}``),
``layer_sizes.json`` (the encoder's parameter shapes), ``gene_order.tsv`` (one symbol per
line, model order), ``label_ints.csv`` (int → label name, read back with
``pd.read_csv(path, index_col=0)["0"]``), ``hyperparameters.json``, ``metadata.json`` and the
selected cells. :func:`write_model_folder` writes one (atomically); :func:`read_model_folder`
reads ours or one of SCimilarity's releases, e.g. to fine-tune from it.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from scimtrain.atomic import written_aside
from scimtrain.model import EncoderDecoder, encoder_layer_sizes

REQUIRED = ("encoder.ckpt", "decoder.ckpt", "layer_sizes.json", "gene_order.tsv")


class ModelFolderError(ValueError):
    """A model folder that cannot be read; the message names the folder and what is missing."""


def write_model_folder(folder: str | os.PathLike, encoder: nn.Module, decoder: nn.Module, *,
                       gene_order: list[str], int2label: Mapping[int, str],
                       hyperparameters: Mapping[str, Any], metadata: Mapping[str, Any],
                       train_cells: pd.DataFrame | None = None,
                       val_cells: pd.DataFrame | None = None) -> Path:
    """Write a model folder at ``folder`` (which must not exist); returns its path."""
    with written_aside(folder, folder=True) as tmp:
        torch.save({"state_dict": _cpu_state(encoder)}, tmp / "encoder.ckpt")
        torch.save({"state_dict": _cpu_state(decoder)}, tmp / "decoder.ckpt")
        (tmp / "layer_sizes.json").write_text(json.dumps(encoder_layer_sizes(encoder), indent=2))
        (tmp / "gene_order.tsv").write_text("".join(f"{g}\n" for g in gene_order))
        write_label_ints(int2label, tmp / "label_ints.csv")
        (tmp / "hyperparameters.json").write_text(json.dumps(dict(hyperparameters), indent=2))
        (tmp / "metadata.json").write_text(json.dumps(dict(metadata), indent=2, default=str))
        if train_cells is not None:
            train_cells.to_csv(tmp / "train_cells.csv.gz")
        if val_cells is not None:
            val_cells.to_csv(tmp / "val_cells.csv.gz")
    return Path(folder)


def write_label_ints(int2label: Mapping[int, str], path: str | os.PathLike) -> None:
    """SCimilarity's ``label_ints.csv``: the int → label-name Series."""
    pd.Series(dict(int2label), name="0").sort_index().to_csv(path, quoting=csv.QUOTE_NONNUMERIC)


@dataclass
class ModelFolder:
    """A model folder as read: weights, architecture and gene order."""

    path: Path
    encoder_state: dict[str, torch.Tensor]
    decoder_state: dict[str, torch.Tensor]
    gene_order: list[str]
    latent_dim: int
    hidden_dim: list[int]
    hyperparameters: dict[str, Any]

    def build_model(self, dropout: float = 0.5, input_dropout: float = 0.4) -> EncoderDecoder:
        """An :class:`EncoderDecoder` of this architecture holding this folder's weights."""
        model = EncoderDecoder(len(self.gene_order), latent_dim=self.latent_dim,
                               hidden_dim=self.hidden_dim, dropout=dropout,
                               input_dropout=input_dropout)
        self.load_into(model)
        return model

    def load_into(self, model: EncoderDecoder) -> None:
        """Copy this folder's weights into ``model`` (shapes must match)."""
        for part, state in (("encoder", self.encoder_state), ("decoder", self.decoder_state)):
            try:
                getattr(model, part).load_state_dict(state)
            except RuntimeError as exc:
                raise ModelFolderError(
                    f"the {part} in {self.path} does not fit this model: "
                    f"{str(exc).splitlines()[0]}") from None


def read_model_folder(folder: str | os.PathLike) -> ModelFolder:
    """Read a model folder written by scimtrain or released by SCimilarity.

    The architecture comes from ``layer_sizes.json`` (the hidden Linears' output sizes and the
    bottleneck's), the gene order from ``gene_order.tsv``.

    Raises:
        ModelFolderError: the folder or one of its required files is missing or unreadable.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise ModelFolderError(f"{path} is not a model folder: it lacks {missing} (a folder "
                               f"written by scimtrain or SCimilarity holds {list(REQUIRED)})")
    try:
        encoder = _state(path / "encoder.ckpt")
        decoder = _state(path / "decoder.ckpt")
        sizes = json.loads((path / "layer_sizes.json").read_text())
    except Exception as exc:
        raise ModelFolderError(f"cannot read the model folder {path}: {exc}") from None
    genes = [line.strip() for line in (path / "gene_order.tsv").read_text().splitlines()
             if line.strip()]
    # Hidden blocks' Linears are network.{i}.1.weight (after Dropout); the bottleneck is the
    # last top-level Linear network.{n}.weight.
    linears = sorted(((k, v) for k, v in sizes.items() if k.endswith(".weight") and len(v) == 2),
                     key=lambda kv: int(kv[0].split(".")[1]))
    if not linears:
        raise ModelFolderError(f"{path / 'layer_sizes.json'} lists no Linear weights")
    hyper_file = path / "hyperparameters.json"
    hyper = json.loads(hyper_file.read_text()) if hyper_file.is_file() else {}
    return ModelFolder(path=path, encoder_state=encoder, decoder_state=decoder,
                       gene_order=genes, latent_dim=int(linears[-1][1][0]),
                       hidden_dim=[int(v[0]) for _, v in linears[:-1]], hyperparameters=hyper)


def _state(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return loaded["state_dict"] if isinstance(loaded, dict) and "state_dict" in loaded \
        else loaded


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
