"""Shared fixtures: small stores built once per test session."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scimtrain.synthetic import SyntheticConfig, make_synthetic_store
from scimtrain.writer import write_store

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
