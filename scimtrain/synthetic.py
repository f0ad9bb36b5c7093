"""Synthetic CellArr-layout stores for the demo, the tests and the benchmarks.

:func:`make_synthetic_store` simulates an atlas: real Cell Ontology terms arranged as in
  the ontology (a child's expression profile is its parent's, perturbed), studies with their
  own batch effects and skewed cell-type mixes, several samples per study, QC columns, a few
  unlabelled cells, doublets and disease samples. Cells are written study by study, as real
  atlases are, in chunks (memory bounded by one chunk) under a progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimtrain.columns import (
    DISEASE_COLUMN,
    LABEL_COLUMN,
    MISSING_LABEL,
    SAMPLE_COLUMN,
    STUDY_COLUMN,
    TRAINING_COLUMNS,
)
from scimtrain.prefetch import prefetch
from scimtrain.store import join_uri
from scimtrain.writer import fresh_store, write_counts, write_frames

# (CL id, parent CL id within this list or None). Parents are real CL ancestors (checked
# against the shipped ontology in the tests); some ids are the ones the harmonisation table
# rewrites (docs/scimilarity.md §2.3), and CL:0009010 is the one SCimilarity's default filter
# drops.
CELL_TYPES: tuple[tuple[str, str | None], ...] = (
    ("CL:0000084", None),  # T cell
    ("CL:0000624", "CL:0000084"),  # CD4-positive, alpha-beta T cell
    ("CL:0000625", "CL:0000084"),  # CD8-positive, alpha-beta T cell
    ("CL:0000815", "CL:0000084"),  # regulatory T cell
    ("CL:0000792", "CL:0000815"),  # CD4+CD25+ regulatory T cell (harmonised to CL:0000815)
    ("CL:0000896", "CL:0000624"),  # activated CD4-positive, alpha-beta T cell
    ("CL:0001043", "CL:0000624"),  # activated CD4+ T cell, human (harmonised to CL:0000896)
    ("CL:0000236", None),  # B cell
    ("CL:0000788", "CL:0000236"),  # naive B cell
    ("CL:0000787", "CL:0000236"),  # memory B cell
    ("CL:0000786", None),  # plasma cell
    ("CL:0000623", None),  # natural killer cell
    ("CL:0000576", None),  # monocyte
    ("CL:0000860", "CL:0000576"),  # classical monocyte
    ("CL:0000875", "CL:0000576"),  # non-classical monocyte
    ("CL:0000451", None),  # dendritic cell
    ("CL:0000784", "CL:0000451"),  # plasmacytoid dendritic cell
    ("CL:0000235", None),  # macrophage
    ("CL:0000097", None),  # mast cell
    ("CL:0000057", None),  # fibroblast
    ("CL:0000115", None),  # endothelial cell
    ("CL:0000066", None),  # epithelial cell
    ("CL:0009010", None),  # transit amplifying cell (excluded by the default filter)
)

MT_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)
# Bumped whenever the simulation changes, so cached demo stores are rebuilt.
SIMULATION_VERSION = 2
MT_SHARE = 0.03
DISEASES = ("normal", "COVID-19", "lung adenocarcinoma", "chronic lymphocytic leukemia")


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SyntheticConfig:
    """What :func:`make_synthetic_store` simulates; the defaults make a demo-sized atlas."""

    n_cells: int = 20_000
    n_genes: int = 2_000
    n_studies: int = 8
    samples_per_study: int = 4
    seed: int = 0
    mean_umis: float = 3_000.0
    marker_genes: int = 100
    unlabelled_fraction: float = 0.02
    low_quality_fraction: float = 0.04
    doublet_fraction: float = 0.02
    disease_sample_fraction: float = 0.15
    chunk_cells: int = 10_000
    capacity: int = 10_000
    counts_location: str = "counts"




def make_synthetic_store(uri: str | os.PathLike, config: SyntheticConfig = SyntheticConfig(),
                         *, overwrite: bool = False, progress: bool = True) -> str:
    """Simulate an atlas and write it as a CellArr store at ``uri``; returns the URI.

    ``cell_metadata`` columns: ``cellTypeOntologyID`` (``'nan'`` when unlabelled),
    ``datasetID``, ``sampleID``, ``total_counts``, ``n_genes_by_counts``, ``pct_counts_mt``,
    ``predicted_doublets``. ``sample_metadata``: ``datasetID``, ``sampleID``, ``disease``.
    The QC columns are computed from the simulated counts.
    """
    cfg = config
    if cfg.n_genes < len(MT_GENES) + 2 * cfg.marker_genes:
        raise ValueError(
            f"n_genes={cfg.n_genes} is too small: it must hold the {len(MT_GENES)} MT genes and "
            f"2 x marker_genes={cfg.marker_genes}")
    if cfg.n_cells < cfg.n_studies * cfg.samples_per_study:
        raise ValueError(f"n_cells={cfg.n_cells} is smaller than n_studies x samples_per_study")
    rng = np.random.default_rng(cfg.seed)
    genes = _gene_symbols(cfg.n_genes)
    is_mt = np.isin(genes, MT_GENES)
    profiles = _type_profiles(rng, cfg.n_genes, cfg.marker_genes, is_mt)
    batch = rng.lognormal(0.0, 0.5, size=(cfg.n_studies, cfg.n_genes))
    cells, samples = _cell_table(rng, cfg)

    def chunks() -> Iterator[sp.csr_matrix]:
        for start in range(0, len(cells), cfg.chunk_cells):
            stop = min(start + cfg.chunk_cells, len(cells))
            chunk = _simulate_counts(rng, cells.iloc[start:stop], profiles, batch, is_mt, cfg)
            # QC columns come from the counts themselves, as scanpy computes them.
            total = np.asarray(chunk.sum(axis=1)).ravel()
            mt_total = np.asarray(chunk[:, is_mt].sum(axis=1)).ravel()
            cells.loc[cells.index[start:stop], "total_counts"] = total
            cells.loc[cells.index[start:stop], "n_genes_by_counts"] = np.diff(chunk.indptr)
            cells.loc[cells.index[start:stop], "pct_counts_mt"] = (
                100.0 * mt_total / np.maximum(total, 1.0))
            yield chunk

    uri, ctx = fresh_store(uri, overwrite, cfg.counts_location)
    # Simulating the next chunk overlaps TileDB compressing and writing the current one.
    write_counts(join_uri(uri, cfg.counts_location), prefetch(chunks(), 1), cfg.n_genes,
                 capacity=cfg.capacity, progress=progress, total_rows=len(cells), ctx=ctx)
    write_frames(uri, cells[list(TRAINING_COLUMNS)], list(genes), samples, ctx)
    return uri


def _gene_symbols(n_genes: int) -> np.ndarray:
    width = len(str(n_genes))
    names = [f"GENE{i:0{width}d}" for i in range(n_genes - len(MT_GENES))]
    symbols = np.array(names + list(MT_GENES), dtype=object)
    # MT genes sit among the others, not at the end, as in real gene annotations.
    return symbols[np.random.default_rng(12345).permutation(n_genes)]


def _type_profiles(rng: np.random.Generator, n_genes: int, n_markers: int,
                   is_mt: np.ndarray) -> np.ndarray:
    """Expression profiles (types × genes, rows sum to 1); a child perturbs its parent's."""
    index = {cl: i for i, (cl, _) in enumerate(CELL_TYPES)}
    # A heavy-tailed background shared by every type, as housekeeping genes are.
    background = rng.gamma(0.6, size=n_genes) + 1e-3
    profiles = np.empty((len(CELL_TYPES), n_genes))
    for i, (_cl, parent) in enumerate(CELL_TYPES):  # parents precede children in CELL_TYPES
        base = background if parent is None else profiles[index[parent]]
        # Subtypes differ from their parent by a little noise and a few markers, so that
        # related types stay close (the miner's ontology rules matter) and studies' batch
        # effects are of the same order as the differences between types.
        profile = base * rng.lognormal(0.0, 0.15 if parent else 0.6, size=n_genes)
        markers = rng.choice(np.flatnonzero(~is_mt), size=n_markers // (4 if parent else 1),
                             replace=False)
        profile[markers] *= rng.uniform(2.0, 8.0 if parent else 40.0, size=markers.size)
        # Mitochondrial transcripts take ~3% of a healthy cell's UMIs, whatever the gene count.
        profile[is_mt] = 0.0
        profile *= (1.0 - MT_SHARE) / profile.sum()
        profile[is_mt] = MT_SHARE * rng.dirichlet(np.full(int(is_mt.sum()), 5.0))
        profiles[i] = profile
    return profiles


def _cell_table(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[pd.DataFrame,
                                                                         pd.DataFrame]:
    """Per-cell labels, study, sample and quality flags; and the sample table."""
    n_types = len(CELL_TYPES)
    study_sizes = _split(rng, cfg.n_cells, rng.dirichlet(np.full(cfg.n_studies, 3.0)),
                         minimum=cfg.samples_per_study)
    rows, samples = [], []
    for s, size in enumerate(study_sizes):
        study = f"study_{s:02d}"
        # Each study profiles a skewed mix of types, a few of them often absent.
        mix = rng.dirichlet(np.full(n_types, 0.4))
        sample_sizes = _split(rng, size, np.full(cfg.samples_per_study,
                                                 1.0 / cfg.samples_per_study), minimum=1)
        for k, n in enumerate(sample_sizes):
            sample = f"{study}_sample_{k}"
            disease = (DISEASES[0] if rng.random() >= cfg.disease_sample_fraction
                       else DISEASES[rng.integers(1, len(DISEASES))])
            samples.append((study, sample, disease))
            types = rng.choice(n_types, size=n, p=mix)
            rows.append(pd.DataFrame({"type": types, "study": s, STUDY_COLUMN: study,
                                      SAMPLE_COLUMN: sample}))
    cells = pd.concat(rows, ignore_index=True)
    n = len(cells)
    cells[LABEL_COLUMN] = np.array([cl for cl, _ in CELL_TYPES], dtype=object)[
        cells["type"]]
    cells.loc[rng.random(n) < cfg.unlabelled_fraction, LABEL_COLUMN] = MISSING_LABEL
    cells["low_quality"] = rng.random(n) < cfg.low_quality_fraction
    cells["predicted_doublets"] = (rng.random(n) < cfg.doublet_fraction).astype(np.int64)
    cells["total_counts"] = 0.0
    cells["n_genes_by_counts"] = 0
    cells["pct_counts_mt"] = 0.0
    sample_frame = pd.DataFrame(samples, columns=[STUDY_COLUMN, SAMPLE_COLUMN, DISEASE_COLUMN])
    return cells, sample_frame


def _split(rng: np.random.Generator, total: int, shares: np.ndarray, minimum: int) -> np.ndarray:
    """Split ``total`` into ``len(shares)`` integer parts near ``shares``, each >= ``minimum``."""
    extra = total - minimum * len(shares)
    parts = np.full(len(shares), minimum) + rng.multinomial(extra, shares / shares.sum())
    return parts


def _simulate_counts(rng: np.random.Generator, cells: pd.DataFrame, profiles: np.ndarray,
                     batch: np.ndarray, is_mt: np.ndarray, cfg: SyntheticConfig) -> sp.csr_matrix:
    """UMI counts for a chunk of cells: each transcript drawn from the cell's type profile
    under its study's batch effect; low-quality cells get few UMIs and many MT reads."""
    n = len(cells)
    umis = rng.lognormal(np.log(cfg.mean_umis), 0.4, size=n)
    low = cells["low_quality"].to_numpy()
    umis[low] = rng.uniform(200, 900, size=int(low.sum()))
    umis = np.maximum(umis.astype(np.int64), 1)
    row_parts, gene_parts = [], []
    keys = cells["type"].to_numpy() * cfg.n_studies + cells["study"].to_numpy()
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        t, s = divmod(int(key), cfg.n_studies)
        for damaged in (False, True):
            group = members[low[members] == damaged]
            if group.size == 0:
                continue
            p = profiles[t] * batch[s]
            if damaged:  # broken cells leak cytoplasmic RNA: the MT share rises
                p = np.where(is_mt, p * 30.0, p)
            cdf = np.cumsum(p / p.sum())
            draws = umis[group]
            gene_parts.append(np.searchsorted(cdf, rng.random(int(draws.sum())) * cdf[-1],
                                              side="right").astype(np.int32))
            row_parts.append(np.repeat(group.astype(np.int32), draws))
    genes = np.minimum(np.concatenate(gene_parts), cfg.n_genes - 1)
    rows = np.concatenate(row_parts)
    # Duplicate (row, gene) pairs are summed by the conversion: that is the UMI count.
    return sp.coo_matrix((np.ones(rows.size, dtype=np.float32), (rows, genes)),
                         shape=(n, cfg.n_genes)).tocsr()
