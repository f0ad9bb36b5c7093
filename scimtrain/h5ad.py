"""Read and check h5ad files for :mod:`scimtrain.ingest`: a file's counts, genes and cells.

- :func:`inspect_file` (cheap: metadata and the first rows): where a file's raw counts live,
  its gene symbols, which ``obs`` columns give label, study, sample, disease and doublets, and
  a check of the first rows of counts.
- :func:`gene_space`: refuses files that name genes differently, then maps each file's genes to
  the store's columns.
- :func:`convert`: a file's rows in chunks (memory bounded by one chunk; CSC or dense-in-memory
  files by one file): every value checked (non-negative integers), QC columns computed, genes
  remapped to the store's gene space; its cell table collected.

Gene space: the union of the files' genes in first-seen order (the first file's genes in its
order, then each later file's new genes), so appending can add genes without moving any.
A gene a file does not measure reads as 0 for its cells.

The options for reading a file (:class:`SourceOptions`, :class:`Source`) and
:class:`IngestError` live here, so :mod:`scimtrain.ingest` imports this module and never the
reverse. ``anndata`` and ``h5py`` (the ``ingest`` extra) are imported inside the functions that
read h5ad files, so the core package does not need them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scimtrain.columns import (
    BUILT_CELL_COLUMNS,
    LABEL_COLUMN,
    MISSING_LABEL,
    SAMPLE_COLUMN,
    STUDY_COLUMN,
)

AUTO_COUNTS = ("X", "layers/counts", "layers/raw_counts", "raw/X")
CHECK_ROWS = 1_000  # rows of counts inspect_file checks by default
ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
MIN_SHARED_GENES = 0.10  # a file sharing fewer of its genes with the others is named differently


class IngestError(ValueError):
    """An input file or the output folder is not usable; the message says what to fix."""


# --------------------------------------------------------------------------- options


def _candidates(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


@dataclass(frozen=True)
class SourceOptions:
    """How to read one h5ad file. Column options take one name or several (a sequence, or
    a comma-separated string): the first one the file has is used. A fixed value (``study``,
    ``sample``, ``disease``) wins over a column.

    counts_layer: ``"auto"`` (the first of X, layers 'counts'/'raw_counts', raw.X holding integer
        counts), ``"X"``, ``"raw.X"``, or a layer name.
    gene_column: the ``var`` column holding gene symbols; ``None`` = the var index.
    label_column: the label column (CL ids, or plain labels); required.
    study_column / study: the study; neither = the file's stem (one study per file).
    sample_column / sample: the sample; neither = the study (one sample per study).
    disease_column / disease: the disease (per sample in ``sample_metadata``); neither = 'nan'.
    doublet_column: doublet flags (bool, 0/1, or 'doublet'/'singlet'); none = 0.
    """

    counts_layer: str = "auto"
    gene_column: str | None = None
    label_column: tuple[str, ...] = (LABEL_COLUMN, "cell_type_ontology_term_id")
    study_column: tuple[str, ...] = ()
    study: str | None = None
    sample_column: tuple[str, ...] = ()
    sample: str | None = None
    disease_column: tuple[str, ...] = ()
    disease: str | None = None
    doublet_column: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("label_column", "study_column", "sample_column", "disease_column",
                     "doublet_column"):
            object.__setattr__(self, name, _candidates(getattr(self, name)))
        if not self.label_column:
            raise IngestError("label_column is required (the obs column with cell labels)")


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    path: Path
    options: SourceOptions = field(default_factory=SourceOptions)


# --------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class FileInfo:
    """What inspection found in one file: enough to convert it without guessing."""

    source: Source
    n_cells: int
    counts: str  # the h5 element holding raw counts: "X", "layers/NAME" or "raw/X"
    genes: np.ndarray  # gene symbols, in the file's column order
    var_columns: tuple[str, ...]  # of the var frame the symbols came from (for hints)
    label_column: str
    study_column: str | None
    sample_column: str | None
    disease_column: str | None
    doublet_column: str | None

    @property
    def name(self) -> str:
        return str(self.source.path)

    @property
    def stem(self) -> str:
        return self.source.path.name.removesuffix(".h5ad")


def _h5ad():
    """anndata's element readers (imported here: the core install does not need anndata)."""
    try:
        import h5py
        from anndata.io import read_elem, sparse_dataset
    except ImportError:
        try:  # anndata < 0.11
            import h5py
            from anndata.experimental import read_elem, sparse_dataset
        except ImportError as exc:
            raise IngestError("reading h5ad files needs anndata and h5py: "
                              "pip install 'scimtrain[ingest]'") from exc
    return h5py, read_elem, sparse_dataset


def inspect_file(source: Source, check_rows: int = CHECK_ROWS) -> FileInfo:
    """Check one h5ad file (its first ``check_rows`` rows of counts) and resolve its options;
    raises :class:`IngestError` naming the file and the option to set when something is
    missing or wrong."""
    h5py, read_elem, _ = _h5ad()
    opts, name = source.options, str(source.path)
    try:
        f = h5py.File(source.path, "r")
    except OSError as exc:
        raise IngestError(f"{name} is not a readable h5ad (HDF5) file: {exc}") from exc
    with f:
        if not isinstance(f.get("obs"), h5py.Group):
            raise IngestError(f"{name} uses the pre-0.7 h5ad layout (or is no AnnData); "
                              "re-save it with a recent anndata: "
                              "anndata.read_h5ad(path).write_h5ad(new_path)")
        n_cells = _matrix_shape(f["X"])[0] if "X" in f else len(_obs_index(f, read_elem))
        if n_cells == 0:
            raise IngestError(f"{name} holds no cells (0 rows): remove it from the inputs")
        counts = _find_counts(f, source, check_rows)
        var = read_elem(f["raw/var"] if counts == "raw/X" else f["var"])
        genes = _gene_symbols(var, opts.gene_column, name, counts)
        var_columns = tuple(str(c) for c in var.columns)
        if _matrix_shape(f[counts])[1] != len(genes):
            raise IngestError(f"{name}: {counts} has {_matrix_shape(f[counts])[1]} columns but "
                              f"its var has {len(genes)} genes")
        columns = list(f["obs"].attrs.get("column-order", []))

    def pick(candidates: tuple[str, ...], fixed: str | None, what: str,
             option: str) -> str | None:
        if fixed is not None or not candidates:
            return None
        for column in candidates:
            if column in columns:
                return column
        raise IngestError(f"{name} has no {what} column {' or '.join(map(repr, candidates))}; "
                          f"its obs columns are {columns}. Pass {option} COLUMN (or set it "
                          "per file in a --manifest).")

    return FileInfo(
        source=source, n_cells=n_cells, counts=counts, genes=genes, var_columns=var_columns,
        label_column=pick(opts.label_column, None, "label", "--label-column"),
        study_column=pick(opts.study_column, opts.study, "study", "--study-column"),
        sample_column=pick(opts.sample_column, opts.sample, "sample", "--sample-column"),
        disease_column=pick(opts.disease_column, opts.disease, "disease", "--disease-column"),
        doublet_column=pick(opts.doublet_column, None, "doublet", "--doublet-column"),
    )


def _obs_index(f, read_elem) -> np.ndarray:
    obs = f["obs"]
    return np.asarray(read_elem(obs[obs.attrs["_index"]]), dtype=object)


def _find_counts(f, source: Source, check_rows: int) -> str:
    """The element holding raw counts: the one asked for, or in auto mode the first of
    AUTO_COUNTS whose first ``check_rows`` rows are non-negative integers."""
    name, asked = str(source.path), source.options.counts_layer
    layers = sorted(f["layers"].keys()) if "layers" in f else []
    where = ", ".join([e.replace("/", ".") for e in ("X", "raw/X") if e in f]
                      + [f"layer {layer!r}" for layer in layers]) or "no matrix"
    if asked != "auto":
        element = {"X": "X", "raw.X": "raw/X", "raw/X": "raw/X"}.get(asked, f"layers/{asked}")
        if element not in f:
            raise IngestError(f"{name} has no {asked!r} to read counts from; it has {where}. "
                              "Pass --counts-layer naming one of them.")
        problem = _check_values(_first_rows(_open_matrix(f[element]), check_rows), np.inf)
        if problem:
            raise IngestError(f"{name}: {asked} does not hold raw counts ({problem}). Pass "
                              f"--counts-layer naming the element with raw integer counts "
                              f"(this file has {where}).")
        return element
    problems = []
    for element in AUTO_COUNTS:
        if element in f:
            problem = _check_values(_first_rows(_open_matrix(f[element]), check_rows), np.inf)
            if not problem:
                return element
            problems.append(f"{element}: {problem}")
    raise IngestError(f"{name} holds no raw counts where scimtrain looks "
                      f"({'; '.join(problems) or 'no X, no counts layer, no raw.X'}). Pass "
                      f"--counts-layer naming the layer with raw integer UMI counts "
                      f"(this file has {where}); normalised or log data cannot be used.")


def _gene_symbols(var: pd.DataFrame, gene_column: str | None, name: str,
                  counts: str) -> np.ndarray:
    frame = "raw.var" if counts == "raw/X" else "var"
    if gene_column is None:
        genes = pd.Series(var.index, dtype=object)
    elif gene_column in var.columns:
        genes = pd.Series(var[gene_column].to_numpy(), dtype=object)
    else:
        raise IngestError(f"{name}: {frame} has no column {gene_column!r}; its columns are "
                          f"{list(var.columns)}. Pass --gene-column naming the one with gene "
                          "symbols (or leave it out to use the var index).")
    blank = genes.isna() | (genes.astype(str).str.strip() == "")
    if blank.any():
        raise IngestError(f"{name}: {int(blank.sum())} genes have no symbol in {frame}"
                          f"{'[' + repr(gene_column) + ']' if gene_column else ' index'}; "
                          "pass --gene-column naming a complete symbol column")
    genes = genes.astype(str)
    duplicated = genes[genes.duplicated()].unique()
    if len(duplicated):
        raise IngestError(f"{name}: duplicate gene symbols in {frame}"
                          f"{'[' + repr(gene_column) + ']' if gene_column else ' index'} "
                          f"({len(duplicated)}, e.g. {list(duplicated[:5])}). Pass --gene-column "
                          "naming a column with unique symbols, or sum or drop the duplicates "
                          "in the file.")
    return genes.to_numpy(dtype=object)


# --------------------------------------------------------------------------- reading counts


def _matrix_shape(element) -> tuple[int, int]:
    if "shape" in element.attrs:
        return tuple(int(v) for v in element.attrs["shape"])
    return tuple(element.shape)


def _open_matrix(element):
    """Row-sliceable view of an X/layer/raw.X element: ``view[a:b]`` is a CSR matrix.

    CSR and dense elements are read chunk by chunk; a CSC element is read whole (slicing
    its rows would read every column), so memory is then bounded by one file.
    """
    _, read_elem, sparse_dataset = _h5ad()
    kind = element.attrs.get("encoding-type", "array")
    if kind == "csr_matrix":
        dataset = sparse_dataset(element)
        return _Rows(lambda a, b: sp.csr_matrix(dataset[a:b]), _matrix_shape(element))
    if kind == "csc_matrix":
        whole = sp.csr_matrix(read_elem(element))
        return _Rows(lambda a, b: whole[a:b], whole.shape)
    if kind == "array" and hasattr(element, "shape") and len(element.shape) == 2:
        return _Rows(lambda a, b: sp.csr_matrix(element[a:b]), element.shape)
    raise IngestError(f"{element.file.filename}: {element.name} is a {kind!r}, "
                      "not a matrix scimtrain can read")


@dataclass(frozen=True)
class _Rows:
    read: object
    shape: tuple[int, int]

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        return self.read(rows.start, rows.stop)


def _first_rows(matrix: _Rows, rows: int) -> sp.csr_matrix:
    return matrix[0:min(rows, matrix.shape[0])]


def _check_values(chunk: sp.csr_matrix, maximum: float) -> str | None:
    """Why these values are not raw counts, or None when they are."""
    data = chunk.data
    if data.size == 0:
        return None
    if not np.all(np.isfinite(data)):
        return "it has NaN or infinite values"
    if data.min() < 0:
        return f"it has negative values (min {data.min():g}): scaled data?"
    fractional = data != np.rint(data)
    if fractional.any():
        return (f"it has non-integer values (e.g. {data[fractional][0]:g}): "
                "log-normalised or normalised data?")
    if data.max() > maximum:
        return (f"it has counts up to {data.max():g}, above the store's value type; "
                "pass --value-dtype uint32")
    return None


# --------------------------------------------------------------------------- gene space


def gene_space(infos: Sequence[FileInfo],
               existing: Sequence[str] = ()) -> tuple[list[str], list[np.ndarray]]:
    """The store's genes (the union, first-seen order, after ``existing``) and, per file, the
    store column of each of its genes. Raises when the files name genes differently."""
    check_gene_naming(infos, existing)
    index: dict[str, int] = {g: i for i, g in enumerate(existing)}
    for info in infos:
        for gene in info.genes:
            index.setdefault(gene, len(index))
    columns = [np.fromiter((index[g] for g in info.genes), dtype=np.int64,
                           count=len(info.genes)) for info in infos]
    return list(index), columns


def check_gene_naming(infos: Sequence[FileInfo], existing: Sequence[str] = ()) -> None:
    """Refuse files that name genes differently: some by Ensembl id and others by symbol, or
    a file sharing almost none of its genes with the others (e.g. other species' casing)."""
    named = [(info.name, set(info.genes), info) for info in infos]
    if len(existing):
        named.insert(0, ("the existing store", set(existing), None))
    if len(named) < 2:
        if named and _ensembl_share(named[0][1]) > 0.5:
            warnings.warn(f"{named[0][0]} names genes by Ensembl id: no MT- genes can be found "
                          "(pct_counts_mt is 0) and gene-order files of symbols will not match; "
                          "pass --gene-column naming the symbol column", stacklevel=2)
        return
    ensembl = [name for name, genes, _ in named if _ensembl_share(genes) > 0.5]
    if ensembl and len(ensembl) < len(named):
        symbols = [name for name, _, _ in named if name not in ensembl]
        raise IngestError(
            f"the files name genes differently: {ensembl} use Ensembl ids, {symbols} use "
            f"symbols. Pass --gene-column naming the var column with gene symbols "
            f"(e.g. 'feature_name' or 'gene_symbols'){_columns_hint(named, ensembl)}, "
            "or set gene_column per file in a --manifest.")
    seen: dict[str, int] = {}
    for _, genes, _ in named:
        for gene in genes:
            seen[gene] = seen.get(gene, 0) + 1
    apart = []
    for name, genes, _ in named:
        shared = sum(seen[g] > 1 for g in genes) / max(len(genes), 1)
        if shared < MIN_SHARED_GENES:
            apart.append(f"{name} shares only {shared:.0%} of its {len(genes)} genes with the "
                         f"other inputs (it has e.g. {sorted(genes)[:3]})")
    if apart:
        raise IngestError(
            f"{'; '.join(apart)}: the inputs name genes differently (symbols of another "
            "species or case, other ids?). Pass --gene-column (or gene_column in a --manifest) "
            "naming a var column whose symbols match across the files.")


def _ensembl_share(genes: set[str]) -> float:
    sample = list(genes)[:2000]
    return sum(bool(ENSEMBL.match(g)) for g in sample) / max(len(sample), 1)


def _columns_hint(named, ensembl: list[str]) -> str:
    for name, _, info in named:
        if name in ensembl and info is not None:
            return f"; {name} has var columns {list(info.var_columns)}"
    return ""


# --------------------------------------------------------------------------- convert


@dataclass
class Converted:
    """Cell and sample rows collected while the counts stream to TileDB; ``existing`` holds
    the (study, sample) pairs of the store being appended to."""

    existing: set[tuple[str, str]] = field(default_factory=set)
    cells: list[pd.DataFrame] = field(default_factory=list)
    diseases: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def convert(info: FileInfo, columns: np.ndarray, n_genes: int, out: Converted, bar: tqdm, *,
            chunk_cells: int, maximum: int, mt_prefix: str) -> Iterator[sp.csr_matrix]:
    """Yield one file's counts in store columns (``columns``: the store column of each of its
    genes, of ``n_genes``), ``chunk_cells`` rows at a time, refusing values that are not
    counts up to ``maximum``; collect its cell rows, with QC columns (genes starting with
    ``mt_prefix``, any case, are mitochondrial), in ``out``."""
    h5py, read_elem, _ = _h5ad()
    is_mt = np.char.startswith(np.char.upper(info.genes.astype(str)),
                               mt_prefix.upper()).astype(np.float64)
    with h5py.File(info.source.path, "r") as f:
        cells = _cell_table(f, info, read_elem)
        again = set(zip(cells[STUDY_COLUMN], cells[SAMPLE_COLUMN])) & out.existing
        if again:
            raise IngestError(f"the store already holds sample(s) {sorted(again)[:5]} of "
                              f"{info.name}: appending the same file twice? Pass another "
                              "--study-column, or set study in a --manifest")
        matrix = _open_matrix(f[info.counts])
        qc = {c: np.zeros(info.n_cells) for c in ("total_counts", "n_genes_by_counts",
                                                   "pct_counts_mt")}
        for start in range(0, info.n_cells, chunk_cells):
            stop = min(start + chunk_cells, info.n_cells)
            chunk = matrix[start:stop]
            problem = _check_values(chunk, maximum)
            if problem:
                raise IngestError(f"{info.name}: {info.counts} rows {start}-{stop - 1} are not "
                                  f"raw counts: {problem}. Pass --counts-layer naming the "
                                  "element with raw integer counts.")
            chunk.eliminate_zeros()
            total = np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
            qc["total_counts"][start:stop] = total
            qc["n_genes_by_counts"][start:stop] = np.diff(chunk.indptr)
            qc["pct_counts_mt"][start:stop] = 100.0 * (chunk @ is_mt) / np.maximum(total, 1.0)
            bar.update(stop - start)
            yield sp.csr_matrix((chunk.data, columns[chunk.indices], chunk.indptr),
                                shape=(stop - start, n_genes))
    qc["n_genes_by_counts"] = qc["n_genes_by_counts"].astype(np.int64)
    out.cells.append(cells.assign(**qc)[list(BUILT_CELL_COLUMNS)])
    for key, values in cells["_disease"].groupby([cells[STUDY_COLUMN], cells[SAMPLE_COLUMN]],
                                                 sort=False):
        out.diseases.setdefault(key, set()).update(values.unique())


def _cell_table(f, info: FileInfo, read_elem) -> pd.DataFrame:
    """Label, study, sample, doublets and disease of every cell of one open file."""
    opts, n = info.source.options, info.n_cells

    def column(name: str) -> pd.Series:
        values = pd.Series(np.asarray(read_elem(f["obs"][name]), dtype=object))
        if len(values) != n:
            raise IngestError(f"{info.name}: obs[{name!r}] has {len(values)} rows, not {n}")
        return values

    def text(values: pd.Series) -> pd.Series:
        missing = values.isna() | (values.astype(str).str.strip() == "")
        return values.astype(str).where(~missing, MISSING_LABEL)

    def required(name: str | None, fixed: str | None, default: pd.Series, what: str):
        if fixed is not None:
            return pd.Series([fixed] * n, dtype=object)
        if name is None:
            return default
        values = text(column(name))
        if (values == MISSING_LABEL).any():
            raise IngestError(f"{info.name}: {int((values == MISSING_LABEL).sum())} cells have no "
                              f"{what} in obs[{name!r}]; fill them or pass another "
                              f"--{what}-column")
        return values

    study = required(info.study_column, opts.study, pd.Series([info.stem] * n, dtype=object),
                     "study")
    sample = required(info.sample_column, opts.sample, study, "sample")
    disease = (pd.Series([opts.disease] * n, dtype=object) if opts.disease is not None
               else text(column(info.disease_column)) if info.disease_column
               else pd.Series([MISSING_LABEL] * n, dtype=object))
    return pd.DataFrame({
        LABEL_COLUMN: text(column(info.label_column)).to_numpy(),
        STUDY_COLUMN: study.to_numpy(), SAMPLE_COLUMN: sample.to_numpy(),
        "predicted_doublets": (_doublets(column(info.doublet_column), info)
                               if info.doublet_column else np.zeros(n, dtype=np.int64)),
        "cell_id": _obs_index(f, read_elem).astype(str),
        "source_file": info.source.path.name,
        "_disease": disease.to_numpy(),
    })


def _doublets(values: pd.Series, info: FileInfo) -> np.ndarray:
    """Doublet flags as 0/1: numbers and bools by != 0, strings true/doublet/yes/1 as 1."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return (numeric != 0).astype(np.int64).to_numpy()
    words = values.astype(str).str.strip().str.lower()
    yes, no = {"true", "doublet", "yes", "1"}, {"false", "singlet", "no", "0", "nan", ""}
    unknown = sorted(set(words) - yes - no)
    if unknown:
        raise IngestError(f"{info.name}: doublet column {info.doublet_column!r} has values "
                          f"{unknown[:5]}; expected bools, 0/1 or doublet/singlet")
    return words.isin(yes).astype(np.int64).to_numpy()
