"""Which cells train, with which labels and weights: docs/scimilarity.md §2, steps 1-9, in order.

``select_cells(store, config, ontology)`` runs: filter → exclude studies → exclude samples
(listed, and those whose disease names a cancer) → harmonise labels → split off validation
studies → coarse-grain singleton labels and keep labels seen in enough studies → map ids to
names → sampling weights → label integers → gene order. Every step is a small function on a
DataFrame so each can be tested alone; :class:`Selection` holds the result and a per-step
account of how many cells each step kept.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scimtrain.columns import (
    CELLARR_SAMPLE_COLUMN,
    DISEASE_COLUMN,
    LABEL_COLUMN,
    LABEL_ID,
    LABEL_INT,
    LABEL_NAME,
    SAMPLE,
    SAMPLE_COLUMN,
    STUDY,
    STUDY_COLUMN,
    STUDY_INT,
    WEIGHT,
)
from scimtrain.condition import scimilarity_filter, split_clauses
from scimtrain.ontology import CellOntology
from scimtrain.source import CellSource, StoreError

log = logging.getLogger(__name__)

# docs/scimilarity.md §2.2: a sample is excluded when its disease names any of these
# (case-insensitive).
CANCER_KEYWORDS: tuple[str, ...] = (
    "cancer", "carcinoma", "leukemia", "myeloma", "glioma", "tumor", "metastati", "melanoma",
    "blastoma", "sarcoma", "cytoma", "lymphoma", "adenoma", "endothelioma", "teratoma",
    "lipoma", "leiomyoma", "meningioma", "ependymoma",
)
# docs/scimilarity.md §2.3: SCimilarity's manual harmonisation of human-specific and
# redundant terms.
HARMONISATION: dict[str, str] = {
    "CL:0000792": "CL:0000815",
    "CL:0001043": "CL:0000896",
    "CL:0001056": "CL:0000451",
    "CL:0001057": "CL:0000782",
    "CL:0001058": "CL:0000784",
}
# Below this fraction of gene-order symbols found in the store, training would run on a gene
# space unrelated to the model's, which is almost always a wrong file or a different naming
# (Ensembl ids vs symbols); a few missing genes are normal between annotation releases.
MIN_GENE_ORDER_MATCH = 0.5



class SelectionError(ValueError):
    """The selection cannot produce training cells; the message names the step and the fix."""


def default_filter(label_column: str = LABEL_COLUMN, source: CellSource | None = None) -> str:
    """The filter used when none is given: SCimilarity's (docs/scimilarity.md §2.1) on the
    label column, in ``source``'s terms when given (a SOMA source maps it to Census columns)."""
    return source.default_filter(label_column) if source is not None \
        else scimilarity_filter(label_column)


@dataclass(frozen=True)
class SelectionConfig:
    """Inputs of the selection; defaults are SCimilarity's (docs/scimilarity.md §2, §8).

    ``filter_condition=None`` means :func:`default_filter` of the source; ``""`` selects
    every cell. ``exclude_samples`` holds ``(study, sample)`` pairs. ``gene_order`` is a file
    with one symbol per line, or a list of symbols, or ``None`` for every store gene.
    ``val_min_studies``: SCimilarity applies the ">= 2 studies" rule inside the validation
    split too, which empties it when there is a single validation study; lower it to keep that.
    """

    label_column: str = LABEL_COLUMN
    study_column: str = STUDY_COLUMN
    sample_column: str = SAMPLE_COLUMN
    filter_condition: str | None = None
    exclude_studies: tuple[str, ...] = ()
    exclude_samples: tuple[tuple[str, str], ...] = ()
    disease_column: str = DISEASE_COLUMN
    disease_keywords: tuple[str, ...] = CANCER_KEYWORDS
    harmonisation: Mapping[str, str] = field(default_factory=lambda: dict(HARMONISATION))
    val_studies: tuple[str, ...] = ()
    min_studies: int = 2
    val_min_studies: int = 2
    class_target_sum: float = 1e4
    study_target_sum: float = 1e6
    weight_quantile: float = 0.999
    weight_cap_factor: float = 2.0
    gene_order: str | os.PathLike | Sequence[str] | None = None
    allow_unknown_labels: bool = False

    def condition(self, source: CellSource | None = None) -> str:
        """The filter: as given, else the source's default (:func:`default_filter`)."""
        return default_filter(self.label_column, source) if self.filter_condition is None \
            else self.filter_condition


@dataclass
class Selection:
    """The training and validation cells, their label integers and the gene space.

    ``train`` and ``val`` are indexed by ``cell_index`` (ascending) with columns ``label_id``,
    ``label_name``, ``study``, ``sample``, ``sampling_weight``, ``label_int``, ``study_int``.
    ``label2int`` maps label *names* to integers in sorted order (stable across runs and
    processes); ``studies`` lists study names by ``study_int``; ``gene_indices[i]`` is the store
    column of ``gene_order[i]``. ``steps`` records (step, train cells, val cells) as run.
    """

    train: pd.DataFrame
    val: pd.DataFrame
    label2int: dict[str, int]
    int2label: dict[int, str]
    label_ids: list[str]
    studies: list[str]
    gene_order: list[str]
    gene_indices: np.ndarray
    steps: list[tuple[str, int, int]]
    missing_genes: list[str] = field(default_factory=list)
    unknown_labels: dict[str, int] = field(default_factory=dict)

    @property
    def n_labels(self) -> int:
        return len(self.label2int)

    def summary(self) -> str:
        """A human-readable account: cells kept by each step, labels, studies and genes."""
        lines = ["selection (cells kept: train / validation)"]
        lines += [f"  {name:<34} {n_train:>10,} / {n_val:,}" for name, n_train, n_val in self.steps]
        lines.append(f"  labels {self.n_labels}, studies {self.train[STUDY].nunique()} train / "
                     f"{self.val[STUDY].nunique()} validation, genes {len(self.gene_order)}")
        if self.missing_genes:
            lines.append(f"  gene order: {len(self.missing_genes)} symbols not in the store, "
                         f"skipped (e.g. {', '.join(self.missing_genes[:5])})")
        if self.unknown_labels:
            lines.append(f"  labels unknown to the ontology (cells dropped): {self.unknown_labels}")
        return "\n".join(lines)


def select_cells(store: CellSource, config: SelectionConfig = SelectionConfig(),
                 ontology: CellOntology | None = None) -> Selection:
    """Run docs/scimilarity.md §2 on a store and return the :class:`Selection`.

    Raises:
        StoreError: the store lacks a needed column, or the filter is invalid.
        SelectionError: a step leaves no training cells (the message names the step), or the
            gene order matches too few store genes.
    """
    ontology = ontology if ontology is not None else CellOntology.default()
    cfg = config
    steps: list[tuple[str, int, int]] = []

    def record(name: str, train: pd.DataFrame, val: pd.DataFrame | None = None) -> None:
        steps.append((name, len(train), 0 if val is None else len(val)))
        if len(train) == 0:
            raise SelectionError(
                f"no training cells left after step '{name}' of the selection of {store.uri}:\n"
                + "\n".join(f"  {s}: {n:,}" for s, n, _ in steps)
                + "\nLoosen that step (filter condition, exclusions, validation studies).")

    cells = _query(store, cfg)
    record("1 filter", cells)
    cells = exclude_studies(cells, cfg.exclude_studies)
    record("2a exclude studies", cells)
    cells = exclude_samples(cells, cfg.exclude_samples)
    record("2b exclude samples", cells)
    cells = exclude_disease_samples(cells, store, cfg)
    record("2c exclude disease samples", cells)
    cells = harmonise(cells, cfg.harmonisation)
    _check_labels_known(cells, ontology, cfg.allow_unknown_labels)
    _check_validation_studies(cells, store, cfg)
    train, val = split_validation(cells, cfg.val_studies)
    record("4 split validation studies", train, val)
    train = coarse_grain(train, ontology, cfg.min_studies)
    val = coarse_grain(val, ontology, cfg.val_min_studies)
    val = val[val[LABEL_ID].isin(set(train[LABEL_ID]))]
    record("5 coarse-grain, >= 2 studies", train, val)
    unknown = _unknown_labels(pd.concat([train, val]), ontology)
    train, val = name_labels(train, ontology), name_labels(val, ontology)
    record("6 labels known to the ontology", train, val)
    if cfg.val_studies and len(val) == 0:
        raise SelectionError(
            f"the validation split of {list(cfg.val_studies)} is empty after the selection: "
            "its labels are not in the training split, or are seen in fewer than "
            f"val_min_studies={cfg.val_min_studies} validation studies (SCimilarity's rule). "
            "With a single validation study pass --val_min_studies 1; or choose other "
            "--val_studies:\n" + "\n".join(f"  {s}: {n:,} / {v:,}" for s, n, v in steps))
    train = sampling_weights(train, cfg)
    val = sampling_weights(val, cfg)
    label2int = {name: i for i, name in enumerate(sorted(train[LABEL_NAME].unique()))}
    studies = sorted(set(train[STUDY]) | set(val[STUDY]))
    study2int = {s: i for i, s in enumerate(studies)}
    for frame in (train, val):
        frame[LABEL_INT] = frame[LABEL_NAME].map(label2int).astype(np.int64)
        frame[STUDY_INT] = frame[STUDY].map(study2int).astype(np.int64)
    name2id = dict(zip(train[LABEL_NAME], train[LABEL_ID]))
    gene_order, gene_indices, missing = align_genes(store, cfg.gene_order)
    return Selection(
        train=train, val=val, label2int=label2int,
        int2label={i: name for name, i in label2int.items()},
        label_ids=[name2id[name] for name in label2int], studies=studies,
        gene_order=gene_order, gene_indices=gene_indices, steps=steps,
        missing_genes=missing, unknown_labels=unknown)


# --------------------------------------------------------------------------- the steps


def _query(store: CellSource, cfg: SelectionConfig) -> pd.DataFrame:
    """Step 1: the filter, returning standard columns label_id / study / sample."""
    wanted = [cfg.label_column, cfg.study_column, cfg.sample_column]
    available = store.columns("cell_metadata")
    missing = [c for c in wanted if c not in available]
    if missing:
        raise StoreError(
            f"cell_metadata of {store.uri} lacks the column(s) {missing} that training needs "
            f"(label, study, sample); it has {available}. Name the right columns with "
            f"--label_id_column / --study_column / --sample_column{store.column_fix}.")
    condition = cfg.condition(store)
    frame = store.query_cells(condition, wanted)
    if store.unlabelled:  # e.g. Census's 'unknown': unlabelled, whatever the filter says
        frame = frame[~frame[cfg.label_column].isin(store.unlabelled)]
    if frame.empty and condition:
        clauses = split_clauses(condition)
        kept = [len(store.query_cells(c, [cfg.label_column])) for c in clauses]
        raise SelectionError(
            f"the filter keeps no cell of {store.uri}. Cells each clause keeps on its own:\n"
            + "\n".join(f"  {c}: {n:,}" for c, n in zip(clauses, kept))
            + "\nLoosen the clauses that keep few cells (--filter_condition; SCimilarity's QC "
            "thresholds suit ~28,000-gene data).")
    frame = frame.rename(columns={cfg.label_column: LABEL_ID, cfg.study_column: STUDY,
                                  cfg.sample_column: SAMPLE})
    for column in (LABEL_ID, STUDY, SAMPLE):
        frame[column] = frame[column].astype(str)
    return frame


def exclude_studies(cells: pd.DataFrame, studies: Sequence[str]) -> pd.DataFrame:
    """Step 2a: drop cells of the listed studies."""
    return cells[~cells[STUDY].isin(set(studies))] if len(studies) else cells


def exclude_samples(cells: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Step 2b/2c: drop cells whose (study, sample) pair is listed."""
    if not len(pairs):
        return cells
    drop = pd.MultiIndex.from_tuples([tuple(map(str, p)) for p in pairs])
    keys = pd.MultiIndex.from_arrays([cells[STUDY], cells[SAMPLE]])
    return cells[~keys.isin(drop)]


def exclude_disease_samples(cells: pd.DataFrame, store: CellSource,
                            cfg: SelectionConfig) -> pd.DataFrame:
    """Step 2c: drop the cells of samples whose ``sample_metadata`` disease names a keyword.

    Samples are found by (study, sample) when ``sample_metadata`` has the study and sample
    columns (stores of bin/build_store.py), else by ``cellarr_sample`` when both frames have
    it (stores built by the ``cellarr`` package, one sample per input file). Without a disease
    column, or without either link, one warning says that nothing was excluded and why.
    """
    if not cfg.disease_keywords:
        return cells
    available = store.columns("sample_metadata")
    pairs = [cfg.study_column, cfg.sample_column]
    if cfg.disease_column not in available:
        warnings.warn(
            f"sample_metadata of {store.uri} has no '{cfg.disease_column}' column (it has "
            f"{available}): no sample is excluded for disease. Give the samples a disease "
            "column (bin/build_store.py --disease-column, or cellarr's sample_metadata=...), "
            "or list samples to exclude with --exclude_samples_file.", stacklevel=3)
        return cells
    if all(c in available for c in pairs):
        return exclude_samples(cells, disease_samples(store, cfg))
    key = CELLARR_SAMPLE_COLUMN
    if key in available and key in store.columns("cell_metadata"):
        samples = store.read_frame("sample_metadata", [key, cfg.disease_column])
        hit = samples.loc[_names_keyword(samples[cfg.disease_column], cfg), key]
        if hit.empty:
            return cells
        owner = store.read_frame("cell_metadata", [CELLARR_SAMPLE_COLUMN])[CELLARR_SAMPLE_COLUMN]
        drop = owner.index[owner.isin(set(hit))]
        return cells[~cells.index.isin(drop)]
    warnings.warn(
        f"sample_metadata of {store.uri} has a '{cfg.disease_column}' column but neither the "
        f"columns {pairs} nor '{CELLARR_SAMPLE_COLUMN}' (in both frames) to find the cells of a "
        "sample: no sample is excluded for disease. List samples to exclude with "
        "--exclude_samples_file.", stacklevel=3)
    return cells


def disease_samples(store: CellSource, cfg: SelectionConfig) -> list[tuple[str, str]]:
    """(study, sample) pairs whose ``sample_metadata`` disease names a keyword (needs the
    study, sample and disease columns there)."""
    if not cfg.disease_keywords:
        return []
    # Only the needed columns: read_frame drops rows with a missing value in any column read.
    samples = store.read_frame("sample_metadata",
                               [cfg.study_column, cfg.sample_column, cfg.disease_column])
    hit = samples[_names_keyword(samples[cfg.disease_column], cfg)]
    return list(zip(hit[cfg.study_column].astype(str), hit[cfg.sample_column].astype(str)))


def _names_keyword(disease: pd.Series, cfg: SelectionConfig) -> pd.Series:
    pattern = "|".join(k.lower() for k in cfg.disease_keywords)
    return disease.astype(str).str.lower().str.contains(pattern, regex=True)


def harmonise(cells: pd.DataFrame, table: Mapping[str, str]) -> pd.DataFrame:
    """Step 3: replace label ids by the harmonisation table (whole ids only)."""
    if not table:
        return cells
    cells = cells.copy()
    cells[LABEL_ID] = cells[LABEL_ID].replace(dict(table))
    return cells


def split_validation(cells: pd.DataFrame, val_studies: Sequence[str]
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 4: validation = cells of ``val_studies`` whose label occurs in training."""
    is_val = cells[STUDY].isin(set(val_studies))
    absent = sorted(set(val_studies) - set(cells[STUDY]))
    if absent:
        warnings.warn(f"validation studies not found among the selected cells: {absent}",
                      stacklevel=3)
    train, val = cells[~is_val].copy(), cells[is_val].copy()
    return train, val[val[LABEL_ID].isin(set(train[LABEL_ID]))]


def coarse_grain(cells: pd.DataFrame, ontology: CellOntology, min_studies: int) -> pd.DataFrame:
    """Step 5: move labels seen in one study to their most viable parent among the present
    labels (docs/scimilarity.md §2.5), then keep labels seen in at least ``min_studies`` studies."""
    if cells.empty:
        return cells
    studies_per_label = cells.groupby(LABEL_ID)[STUDY].nunique()
    present = set(studies_per_label.index)
    mapping = {}
    for label in sorted(studies_per_label.index[studies_per_label <= 1]):
        parent = ontology.most_viable_parent(label, present)
        if parent is not None:
            mapping[label] = parent
    cells = cells.copy()
    if mapping:
        cells[LABEL_ID] = cells[LABEL_ID].replace(mapping)
    studies_per_label = cells.groupby(LABEL_ID)[STUDY].nunique()
    keep = set(studies_per_label.index[studies_per_label >= min_studies])
    return cells[cells[LABEL_ID].isin(keep)]


def _check_labels_known(cells: pd.DataFrame, ontology: CellOntology, allow: bool) -> None:
    """Labels unknown to the ontology are dropped; when that is most cells, it is a mistake
    (plain-text labels without ``--ontology none``, or another ontology) unless allowed."""
    counts = cells[LABEL_ID].value_counts()
    unknown = counts[[label not in ontology for label in counts.index]]
    if allow or unknown.sum() <= 0.5 * counts.sum():
        return
    examples = list(unknown.index[:5])
    share = f"{unknown.sum():,} of {counts.sum():,} cells"
    if sum(":" in str(label) for label in unknown.index) < 0.5 * len(unknown):
        raise SelectionError(
            f"{share} have labels the Cell Ontology does not know, and they look like plain "
            f"names (e.g. {examples}): pass --ontology none to train on plain labels.")
    raise SelectionError(
        f"{share} have labels unknown to the ontology {getattr(ontology, 'version', '')} "
        f"(e.g. {examples}) and would be dropped: pass a newer ontology (--ontology FILE), "
        "or --allow_unknown_labels to drop them.")


def _check_validation_studies(cells: pd.DataFrame, store: CellSource,
                              cfg: SelectionConfig) -> None:
    """Every validation study must have cells after the filter and exclusions."""
    absent = sorted(set(cfg.val_studies) - set(cells[STUDY]))
    if not absent:
        return
    in_store = store.read_frame("cell_metadata", [cfg.study_column])[cfg.study_column]
    raise SelectionError(
        f"validation studies {absent} have no cells after the filter and exclusions of "
        f"{store.uri}; its studies are {sorted(set(in_store.astype(str)))} (with cells "
        f"after the filter: {sorted(set(cells[STUDY]))}). Check --val_studies.")


def _unknown_labels(cells: pd.DataFrame, ontology: CellOntology) -> dict[str, int]:
    counts = cells[LABEL_ID].value_counts()
    unknown = {label: int(n) for label, n in counts.items() if label not in ontology}
    if unknown:
        log.warning("labels unknown to the ontology %s, cells dropped: %s",
                    getattr(ontology, "version", ""), unknown)
    return unknown


def name_labels(cells: pd.DataFrame, ontology: CellOntology) -> pd.DataFrame:
    """Step 6: add ``label_name`` from the ontology; drop cells whose id it does not know."""
    cells = cells[cells[LABEL_ID].map(lambda x: x in ontology).astype(bool)].copy()
    names = {label: ontology.name(label) for label in cells[LABEL_ID].unique()}
    cells[LABEL_NAME] = cells[LABEL_ID].map(names)
    return cells


def sampling_weights(cells: pd.DataFrame, cfg: SelectionConfig = SelectionConfig()
                     ) -> pd.DataFrame:
    """Step 7: ``w = 1/log1p(n_label/1e4) * 1/log1p(n_study/1e6)``, capped at
    ``2 * quantile(w, 0.999)``; counts are over this split."""
    cells = cells.copy()
    if cells.empty:
        cells[WEIGHT] = pd.Series(dtype=np.float64)
        return cells
    n_label = cells[LABEL_ID].map(cells[LABEL_ID].value_counts()).to_numpy(np.float64)
    n_study = cells[STUDY].map(cells[STUDY].value_counts()).to_numpy(np.float64)
    weight = (1.0 / np.log1p(n_label / cfg.class_target_sum)) * (
        1.0 / np.log1p(n_study / cfg.study_target_sum))
    cap = cfg.weight_cap_factor * np.quantile(weight, cfg.weight_quantile)
    cells[WEIGHT] = np.minimum(weight, cap)
    return cells


def read_gene_order(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Gene symbols from a file (one per line, blank lines ignored) or a list."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise SelectionError(f"gene order file {source} does not exist")
        with open(source) as handle:
            symbols = [line.strip() for line in handle if line.strip()]
        if not symbols:
            raise SelectionError(f"gene order file {source} is empty: it needs one gene "
                                 "symbol per line")
        return symbols
    return [str(s) for s in source]


def align_genes(store: CellSource, gene_order: str | os.PathLike | Sequence[str] | None
                ) -> tuple[list[str], np.ndarray, list[str]]:
    """Step 9: the model's gene space.

    Returns (symbols in model order, their store column indices, symbols not in the store).

    Raises:
        SelectionError: fewer than ``MIN_GENE_ORDER_MATCH`` of the symbols are in the store.
    """
    symbols = [str(s) for s in store.gene_symbols]
    if gene_order is None:
        return symbols, np.arange(len(symbols), dtype=np.int64), []
    wanted = read_gene_order(gene_order)
    position = {}
    for i, symbol in enumerate(symbols):
        position.setdefault(symbol, i)  # SCimilarity takes the first of duplicate symbols
    found = [g for g in wanted if g in position]
    missing = [g for g in wanted if g not in position]
    if not wanted or len(found) < MIN_GENE_ORDER_MATCH * len(wanted):
        raise SelectionError(
            f"only {len(found)} of the {len(wanted)} gene-order symbols are in {store.uri} "
            f"(at least {MIN_GENE_ORDER_MATCH:.0%} must be); e.g. missing: {missing[:5]}, "
            f"store genes look like {symbols[:3]}. Check that the file and the store use the "
            "same gene naming (symbols vs Ensembl ids).")
    if missing:
        log.warning("%d of %d gene-order symbols are not in the store and are skipped: %s",
                    len(missing), len(wanted), missing[:10])
    if len(set(found)) != len(found):
        raise SelectionError(f"gene order {gene_order} lists some symbols twice")
    return found, np.array([position[g] for g in found], dtype=np.int64), missing
