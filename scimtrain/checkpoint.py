"""Training checkpoints that are never half-written, and the SCimilarity model folder.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding ``trainer.pt`` (model,
optimiser, scheduler, grad scaler, counters: written by the main process) and one
``rank-R.pt`` per process (its RNG states and data-stream position). It is written under a
hidden temporary name and renamed when every file is complete, so whatever a kill leaves
behind is a ``.tmp-*`` folder that resume ignores and the next save removes. Files are read
with ``torch.load(weights_only=True)``: tensors and plain containers only, no unpickling of
arbitrary objects.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from scimtrain.model import encoder_layer_sizes

_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume; the message says why and what to do."""


class CheckpointFolder:
    """The checkpoints of one run: save, find the newest complete one, load, prune.

    Args:
        folder: ``{run_dir}/checkpoints``.
        keep: how many complete checkpoints to keep (the newest ones).
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}"

    def temporary(self, step: int) -> Path:
        return self.folder / f".tmp-step-{step:08d}"

    def begin(self, step: int) -> Path:
        """Main process: a fresh temporary folder for the checkpoint of ``step``."""
        tmp = self.temporary(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Main process, after every rank wrote its file: publish and prune old ones."""
        final = self.path(step)
        if final.exists():  # the same step saved twice (epoch end right after a step save)
            shutil.rmtree(final)
        os.replace(self.temporary(step), final)
        _fsync_dir(self.folder)
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.folder.glob(".tmp-step-*"):
            if leftover.name != self.temporary(step).name:
                shutil.rmtree(leftover, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and _NAME.match(p.name)
                 and (p / "trainer.pt").is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` then fsync: the bytes are on disk before the folder is renamed."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}. Resume from another "
                              "checkpoint (--resume PATH) or start over (--resume none)") from exc


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random state a training process uses, as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping, generator: torch.Generator | None) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- model folder


def write_atomically(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder, then rename it to ``folder`` (which must not exist)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    os.replace(tmp, folder)
    return folder


def write_model_folder(folder: str | os.PathLike, encoder: nn.Module, decoder: nn.Module, *,
                       gene_order: list[str], int2label: Mapping[int, str],
                       hyperparameters: Mapping[str, Any], metadata: Mapping[str, Any],
                       train_cells: pd.DataFrame | None = None,
                       val_cells: pd.DataFrame | None = None) -> Path:
    """Write SPEC §7's model folder, loadable by ``scimilarity.CellEmbedding(folder)``.

    ``encoder.ckpt``/``decoder.ckpt`` hold ``{"state_dict": ...}``; ``layer_sizes.json`` the
    encoder's parameter shapes; ``gene_order.tsv`` one symbol per line; ``label_ints.csv`` the
    int → label-name Series (``read_csv(index_col=0)["0"]``); ``hyperparameters.json``,
    ``metadata.json`` and the selected cells. Written atomically.
    """

    def fill(tmp: Path) -> None:
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

    return write_atomically(folder, fill)


def write_label_ints(int2label: Mapping[int, str], path: str | os.PathLike) -> None:
    """SCimilarity's ``label_ints.csv``: the int → label-name Series, read back with
    ``pd.read_csv(path, index_col=0)["0"]``."""
    pd.Series(dict(int2label), name="0").sort_index().to_csv(path, quoting=csv.QUOTE_NONNUMERIC)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
