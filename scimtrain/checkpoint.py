"""Training checkpoints that are never half-written.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding ``trainer.pt`` (model,
optimiser, scheduler, grad scaler, counters: written by the main process) and one
``rank-R.pt`` per process (its RNG states and data-stream position). It is written under a
hidden temporary name and renamed when every file is complete, so whatever a kill leaves
behind is a ``.tmp-*`` folder that resume ignores and the next save removes. Files are read
with ``torch.load(weights_only=True)``: tensors and plain containers only, no unpickling of
arbitrary objects.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from scimtrain.atomic import fsync_dir, fsync_file, remove, temporary_sibling, written_aside

_NAME = re.compile(r"^step-(\d{8,})$")
# The weights with the best validation metric so far, in the run folder (state_dict only).
BEST_WEIGHTS = "best_model.pt"


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
        return temporary_sibling(self.path(step))

    def begin(self, step: int) -> Path:
        """Main process: a fresh temporary folder for the checkpoint of ``step``."""
        tmp = self.temporary(step)
        remove(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Main process, after every rank wrote its file: publish and prune old ones."""
        final = self.path(step)
        if final.exists():  # the same step saved twice (epoch end right after a step save)
            shutil.rmtree(final)
        os.replace(self.temporary(step), final)
        fsync_dir(self.folder)
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

    def load_latest(self, rank: int) -> tuple[Path, dict, dict] | None:
        """The newest checkpoint that loads: ``(path, trainer.pt, rank-R.pt)``, or None.

        A checkpoint whose files cannot be read (truncated by a full disk, damaged) is passed
        over with a warning naming it and the one used instead.

        Raises:
            CheckpointError: checkpoints exist but none of them loads.
        """
        candidates = self.complete()[::-1]
        failed: list[str] = []
        for path in candidates:
            try:
                loaded = load_checkpoint(path, rank)
            except CheckpointError as exc:
                failed.append(f"{path.name} ({exc})")
                continue
            if failed:
                warnings.warn(f"checkpoint(s) {'; '.join(failed)} could not be read; resuming "
                              f"from {path} instead", stacklevel=2)
            return (path, *loaded)
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.folder} can be read: {'; '.join(failed)}. Start over "
                "with --resume none (or remove the folder)")
        return None


def load_checkpoint(path: str | os.PathLike, rank: int) -> tuple[dict, dict]:
    """``(trainer.pt, rank-R.pt)`` of one checkpoint folder.

    Raises:
        CheckpointError: a file is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a folder like "
                              "checkpoints/step-00000100, --resume auto or --resume none")
    return load_file(path / "trainer.pt"), load_file(path / f"rank-{rank}.pt")


def save_best(run_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write the best weights so far to ``run_dir/best_model.pt``, never half-written."""
    final = Path(run_dir) / BEST_WEIGHTS
    with written_aside(final, replace=True) as tmp:
        save_file(dict(state_dict), tmp)
    return final


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` then fsync: the bytes are on disk before the folder is renamed."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
    fsync_file(path)


def load_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # a truncated or foreign file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint file {path}: {reason}. Resume from "
                              "another checkpoint (--resume PATH) or start over (--resume none)"
                              ) from None


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
