"""scimtrain: SCimilarity-style metric learning on CellArr/TileDB and SOMA single-cell atlases.

The public API, importable from the package itself::

    import scimtrain

    config = scimtrain.TrainingConfig(tiledb="atlas/", val_studies=["A", "B"])  # or soma=...
    run = scimtrain.build_training(config)   # selection, model, data, objective, trainer
    run.fit()                                # train, model folder, test pass

Names are loaded on first use, so ``import scimtrain`` stays cheap (no torch, no TileDB) for
tools that need only a part of it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TrainingConfig": "scimtrain.config",
    "build_training": "scimtrain.build",
    "TrainingRun": "scimtrain.build",
    "Trainer": "scimtrain.trainer",
    "TrainerConfig": "scimtrain.trainer",
    "StepContext": "scimtrain.trainer",
    "make_accelerator": "scimtrain.trainer",
    "CellSource": "scimtrain.source",
    "CellArrStore": "scimtrain.store",
    "SomaSource": "scimtrain.soma",
    "open_source": "scimtrain.build",
    "CellOntology": "scimtrain.ontology",
    "Selection": "scimtrain.selection",
    "SelectionConfig": "scimtrain.selection",
    "select_cells": "scimtrain.selection",
    "SamplingPlan": "scimtrain.sampling",
    "Batch": "scimtrain.stream",
    "CellStream": "scimtrain.stream",
    "CellTable": "scimtrain.stream",
    "StreamConfig": "scimtrain.stream",
    "cell_dataloader": "scimtrain.stream",
    "TrainingCache": "scimtrain.cache",
    "EncoderDecoder": "scimtrain.model",
    "Encoder": "scimtrain.model",
    "Decoder": "scimtrain.model",
    "LossConfig": "scimtrain.losses",
    "compute_loss": "scimtrain.losses",
    "mine_triplets": "scimtrain.losses",
    "MetricLearningObjective": "scimtrain.objective",
    "read_model_folder": "scimtrain.model_folder",
    "write_model_folder": "scimtrain.model_folder",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'scimtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
