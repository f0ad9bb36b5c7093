"""Shared fixtures: small stores built once per test session, and small training runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scimtrain.build import build_training
from scimtrain.config import TrainingConfig
from scimtrain.model import Encoder
from scimtrain.synthetic import SyntheticConfig, make_synthetic_store
from scimtrain.trainer import Trainer
from scimtrain.writer import write_store

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "bin" / "train.py")

# The tiny synthetic store: a few thousand cells, a few hundred genes (DEVELOPERS: tests stay fast).
TINY = SyntheticConfig(n_cells=3000, n_genes=300, n_studies=6, samples_per_study=3,
                       marker_genes=40, seed=7, chunk_cells=1000)
# With 300 genes no cell can pass SCimilarity's n_genes_by_counts>500, so tests on the tiny
# store use this filter (the same rule with thresholds that fit it).
TINY_FILTER = ("cellTypeOntologyID!='nan' and total_counts>300 and n_genes_by_counts>50 "
               "and pct_counts_mt<20 and predicted_doublets==0 "
               "and cellTypeOntologyID!='CL:0009010'")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """A synthetic CellArr store of 3,000 cells x 300 genes."""
    return make_synthetic_store(tmp_path_factory.mktemp("stores") / "tiny", TINY, progress=False)


def random_counts(n_cells: int, n_genes: int, seed: int = 0, density: float = 0.2) -> sp.csr_matrix:
    """Random integer counts with some all-zero rows."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    dense[::7] = 0
    return sp.csr_matrix(dense.astype(np.float32))


def hand_store(path, cells: pd.DataFrame, counts: sp.csr_matrix | None = None,
               genes: list[str] | None = None, samples: pd.DataFrame | None = None,
               **kwargs) -> str:
    """Write a small store from an explicit cell table (counts random unless given)."""
    n_genes = len(genes) if genes is not None else 20
    genes = genes if genes is not None else [f"G{i}" for i in range(n_genes)]
    if counts is None:
        counts = random_counts(len(cells), n_genes)
    if samples is None:
        samples = (cells[["datasetID", "sampleID"]].drop_duplicates().reset_index(drop=True)
                   .assign(disease="normal"))
    return write_store(path, cells, genes, samples, counts, **kwargs)


# --------------------------------------------------------------------------- small runs


def small_run_flags(store: str, out: Path) -> list[str]:
    return ["--tiledb", store, "--filter_condition", TINY_FILTER,
            "--val_studies", "study_04", "study_05", "-b", "48", "-n", "4", "-e", "2",
            "--val_batches", "2", "--hidden_dim", "32", "32", "--latent_dim", "8",
            "--num_workers", "0", "--no_progress", "--suffix", "t",
            "--model_folder", str(out / "models"), "--result_folder", str(out / "results"),
            "--log_folder", str(out / "logs")]


NAME = "model_48_0.05_8_2_0.001_t"
SMALL = dict(filter_condition=TINY_FILTER, val_studies=["study_04", "study_05"], batch_size=48,
             n_batches=5, val_batches=2, pool_batches=2, hidden_dim=[32, 32], latent_dim=8,
             num_workers=0, max_epochs=3, checkpoint_every=4, no_progress=True, suffix="t")


@pytest.fixture(scope="module")
def parts(tiny_store):
    return tiny_store


def make_trainer(store: str, out: Path | None, step_wrapper=None, **changes) -> Trainer:
    """A small run built as bin/train.py builds it; its files go under ``out``."""
    out = Path(tempfile.mkdtemp()) if out is None else out
    config = TrainingConfig(**{**SMALL, "tiledb": store, "model_folder": str(out / "models"),
                               "result_folder": str(out / "results"),
                               "log_folder": str(out / "logs"), **changes})
    run = build_training(config)
    if step_wrapper:
        run.trainer.step_fn = step_wrapper(run.objective)
    return run.trainer


def load_like_cell_embedding(folder: Path) -> tuple[list[str], Encoder]:
    """Read a model folder as SCimilarity's CellEmbedding does (gene_order.tsv, layer_sizes.json,
    encoder.ckpt): its genes and its encoder."""
    genes = (folder / "gene_order.tsv").read_text().split("\n")[:-1]
    sizes = json.loads((folder / "layer_sizes.json").read_text())
    layers = [(k, sizes[k]) for k in sorted(sizes) if "weight" in k and len(sizes[k]) > 1]
    encoder = Encoder(len(genes), latent_dim=layers[-1][1][0],
                      hidden_dim=[shape[0] for _, shape in layers[:-1]])
    encoder.load_state_dict(torch.load(folder / "encoder.ckpt", weights_only=True)["state_dict"])
    return genes, encoder


def run_folder(out: Path) -> Path:
    """Where make_trainer's run keeps logs and checkpoints."""
    return out / "logs" / NAME / "t"


@pytest.fixture(scope="session", autouse=True)
def _caches_in_a_temporary_folder(tmp_path_factory):
    """Training caches (and the demo store) of the tests' runs go to a folder of the session,
    for the runs in this process and the commands it starts."""
    import os

    folder = tmp_path_factory.mktemp("scimtrain-cache")
    previous = os.environ.get("SCIMTRAIN_CACHE")
    os.environ["SCIMTRAIN_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SCIMTRAIN_CACHE", None)
    else:
        os.environ["SCIMTRAIN_CACHE"] = previous
