"""Read a SOMA experiment (a local one, ``s3://``, or the CELLxGENE Census) as a cell source.

:class:`SomaSource` is the :class:`~scimtrain.source.CellSource` of ``bin/train.py --soma URI``
and ``--census VERSION``: ``obs`` is the cell metadata (cell id = ``soma_joinid``), the
measurement's ``var`` the gene annotation (column = ``soma_joinid``), and its X layer the
counts. SOMA has no sample table: ``sample_metadata`` is the distinct rows of the obs columns
asked for (e.g. dataset, donor, disease). Defaults follow the Census schema: labels in
``cell_type_ontology_term_id`` (``unknown`` = unlabelled), studies ``dataset_id``, samples
``donor_id``, symbols ``feature_name``; the default filter keeps primary cells
(``is_primary_data``, the Census holds duplicates across datasets) and maps SCimilarity's QC to
``raw_sum`` and ``nnz``.

``tiledbsoma`` (the ``soma`` extra) is imported when a source is opened. Handles are opened
lazily in the process that reads and keyed by process id, as the CellArr store's are: forked
loader or cache-build workers open their own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimtrain.columns import CENSUS_COLUMNS, CENSUS_UNLABELLED
from scimtrain.condition import ConditionError, clause_columns, scimilarity_clauses
from scimtrain.source import (
    CellSource,
    StoreError,
    csr_from_coordinates,
    first_line,
    missing_values,
    resolved_uri,
    tiledb_config,
)
from scimtrain.store import array_fragments

PRIMARY_CLAUSE = "is_primary_data==True"
INSTALL = "pip install 'scimtrain[soma]'"

# Handles inherited through fork are parked here, never used or freed in the child.
_INHERITED: list = []


def _tiledbsoma() -> Any:
    try:
        import tiledbsoma
    except ImportError as exc:
        raise StoreError(f"reading a SOMA experiment needs the tiledbsoma package ({exc}); "
                         f"install it with: {INSTALL}") from None
    return tiledbsoma


class SomaSource(CellSource):
    """One SOMA experiment's measurement and X layer, opened lazily and per process.

    Args:
        uri: the experiment (a folder, ``s3://`` or ``tiledb://`` URI).
        measurement: the measurement (``ms``) holding the genes and counts.
        layer: the X layer of raw counts (the Census's is ``raw``).
        gene_column: the ``var`` column of gene symbols.
        config: TileDB config entries for every context this source makes (e.g. an S3
            region).

    Raises:
        StoreError: the experiment, measurement, layer or gene column does not exist (the
            message lists what does), or tiledbsoma is not installed.
    """

    kind = "soma"
    columns_default = CENSUS_COLUMNS
    unlabelled = (CENSUS_UNLABELLED,)
    column_fix = (" (the obs columns of a SOMA experiment; the Census's are "
                  "cell_type_ontology_term_id, dataset_id and donor_id)")

    def __init__(self, uri: str | os.PathLike, measurement: str = "RNA", layer: str = "raw",
                 gene_column: str = CENSUS_COLUMNS["gene_column"],
                 config: Mapping[str, object] | None = None) -> None:
        self.uri = str(uri)
        self.measurement, self.layer, self.gene_column = measurement, layer, gene_column
        self.config = tiledb_config(config)
        self._pid: int | None = None
        self._handles: dict[str, Any] = {}
        soma = _tiledbsoma()
        try:
            experiment = self._handle("experiment")
        except (soma.DoesNotExistError, soma.SOMAError, ValueError, TypeError) as exc:
            raise StoreError(f"{self.uri} is not a SOMA experiment ({first_line(exc)}); pass "
                             "the experiment's folder or URI (for the Census: --census "
                             "VERSION)") from None
        measurements = list(experiment.ms.keys())
        if measurement not in measurements:
            raise StoreError(f"SOMA experiment {self.uri} has no measurement {measurement!r}; "
                             f"it has {measurements} (--soma_measurement)")
        layers = list(experiment.ms[measurement].X.keys())
        if layer not in layers:
            raise StoreError(f"measurement {measurement!r} of {self.uri} has no X layer "
                             f"{layer!r}; it has {layers} (--soma_layer; scimtrain needs raw "
                             "counts)")
        var_columns = self.columns("gene_annotation")
        if gene_column not in var_columns:
            raise StoreError(f"var of measurement {measurement!r} of {self.uri} has no column "
                             f"{gene_column!r}; it has {var_columns} (--gene_column names the "
                             "column of gene symbols)")
        self.counts_uri = self._handle("X").uri
        self.n_cells, self.n_genes = (int(n) for n in self._handle("X").shape)

    # ------------------------------------------------------------------ handles

    def _context(self) -> Any:
        return _tiledbsoma().SOMATileDBContext(tiledb_config=dict(self.config))

    def _handle(self, name: str) -> Any:
        """``experiment``, ``obs``, ``var`` or ``X``, open for reading in this process."""
        pid = os.getpid()
        if self._pid != pid:  # a forked child: the parent's handles are not ours to use
            _INHERITED.extend(self._handles.values())
            self._handles, self._pid = {}, pid
        if name not in self._handles:
            if name == "experiment":
                soma = _tiledbsoma()
                self._handles[name] = soma.Experiment.open(self.uri, context=self._context())
            else:
                experiment = self._handle("experiment")
                ms = experiment.ms[self.measurement]
                self._handles[name] = {"obs": lambda: experiment.obs, "var": lambda: ms.var,
                                       "X": lambda: ms.X[self.layer]}[name]()
        return self._handles[name]

    def close(self) -> None:
        if self._pid == os.getpid() and "experiment" in self._handles:
            self._handles["experiment"].close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _handles={})
        return state

    def identity(self) -> dict:
        """The resolved URI, measurement, layer, and the fragments of obs, var and the layer."""
        import tiledb

        arrays = {name: self._handle(name).uri for name in ("obs", "var", "X")}
        return {"uri": resolved_uri(self.uri), "measurement": self.measurement,
                "layer": self.layer,
                "fragments": array_fragments(arrays, tiledb.Ctx(tiledb.Config(self.config)))}

    # ------------------------------------------------------------------ frames

    def _frame(self, frame: str) -> Any:
        if frame in ("cell_metadata", "sample_metadata"):
            return self._handle("obs")
        if frame == "gene_annotation":
            return self._handle("var")
        raise StoreError(f"unknown frame {frame!r}: a SOMA source has cell_metadata (obs), "
                         "sample_metadata (distinct obs rows) and gene_annotation (var)")

    def columns(self, frame: str = "cell_metadata") -> list[str]:
        return [n for n in self._frame(frame).schema.names if n != "soma_joinid"]

    def read_frame(self, frame: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """A frame (or some columns); ``sample_metadata`` is the distinct rows of the obs
        columns asked for, indexed 0..n-1."""
        out = self._read(frame, None, columns, distinct=frame == "sample_metadata")
        return out.reset_index(drop=True) if frame == "sample_metadata" else out

    def query_cells(self, condition: str | None, columns: Sequence[str]) -> pd.DataFrame:
        return self._read("cell_metadata", condition or None, columns)

    def _read(self, frame: str, condition: str | None, columns: Sequence[str] | None,
              distinct: bool = False) -> pd.DataFrame:
        """Rows of a frame satisfying ``condition`` (only the first of equal rows when
        ``distinct``), text as ``str``, rows with a missing value dropped."""
        available = self.columns(frame)
        columns = available if columns is None else list(columns)
        unknown = [c for c in columns if c not in available]
        where = f"{'var' if frame == 'gene_annotation' else 'obs'} of {self.uri}"
        if unknown:
            raise StoreError(f"{where} has no column(s) {unknown}; it has {available}. Pass the "
                             "right column names (e.g. --label_id_column / --study_column).")
        soma = _tiledbsoma()
        try:
            table = self._frame(frame).read(
                column_names=["soma_joinid", *columns], value_filter=condition,
            ).concat()
        except (soma.SOMAError, ValueError, TypeError, SyntaxError) as exc:
            raise StoreError(
                f"could not evaluate the condition {condition!r} on {where}: "
                f"{first_line(exc)}. Conditions use column names, quoted strings and "
                f"and/or, e.g. \"nnz>500 and is_primary_data == True\"; the columns are "
                f"{available}.") from None
        if distinct:  # before decoding: the Census's obs has ~100 M rows, few distinct ones
            table = table.take(_first_of_equal_rows(table, columns))
        data = {c: _column(table.column(c)) for c in columns}
        rows = table.column("soma_joinid").to_numpy().astype(np.int64)
        keep = np.ones(rows.size, dtype=bool)
        for values in data.values():
            keep &= ~missing_values(values)
        index = pd.Index(rows[keep], name="cell_index" if frame == "cell_metadata" else None)
        return pd.DataFrame({c: v[keep] for c, v in data.items()}, index=index).sort_index()

    @property
    def gene_symbols(self) -> np.ndarray:
        if not hasattr(self, "_gene_symbols"):
            frame = self._read("gene_annotation", None, [self.gene_column])
            symbols = np.full(self.n_genes, "", dtype=object)
            inside = frame.index.to_numpy() < self.n_genes
            symbols[frame.index.to_numpy()[inside]] = frame[self.gene_column].to_numpy()[inside]
            if (symbols == "").any():
                raise StoreError(f"var of {self.uri} lacks a symbol in column "
                                 f"{self.gene_column!r} for {int((symbols == '').sum())} of "
                                 f"its {self.n_genes} genes")
            self._gene_symbols = symbols
        return self._gene_symbols

    def default_filter(self, label_column: str) -> str:
        """SCimilarity's filter in Census terms: primary cells, labelled (not ``unknown``),
        ``raw_sum > 1000``, ``nnz > 500``, no CL:0009010; clauses on columns the experiment
        lacks (the Census has no mitochondrial share or doublet calls) are dropped, with one
        warning naming them."""
        clauses = [PRIMARY_CLAUSE, *scimilarity_clauses(
            label_column, missing_label=CENSUS_UNLABELLED, total_counts="raw_sum",
            genes_detected="nnz")]
        available = set(self.columns("cell_metadata"))
        kept, dropped = [], []
        for clause in clauses:
            try:
                ok = set(clause_columns(clause)) <= available
            except ConditionError:
                ok = True
            (kept if ok else dropped).append(clause)
        if dropped:
            warnings.warn(f"obs of {self.uri} lacks the columns of {len(dropped)} clause(s) of "
                          f"SCimilarity's default filter, dropped: {' and '.join(dropped)}",
                          stacklevel=2)
        return " and ".join(kept)

    # ------------------------------------------------------------------ counts

    def _read_sorted_unique(self, cells: np.ndarray) -> sp.csr_matrix:
        if cells.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        table = self._handle("X").read(coords=(cells,)).tables().concat()
        return csr_from_coordinates(
            cells, table.column("soma_dim_0").to_numpy(), table.column("soma_dim_1").to_numpy(),
            table.column("soma_data").to_numpy(), self.n_genes, ordered=False)


def census_source(version: str, organism: str = "homo_sapiens", **options: Any) -> SomaSource:
    """The Census release ``version``'s experiment of ``organism``, through
    ``cellxgene_census.open_soma`` (its location and S3 settings); ``options`` as
    :class:`SomaSource` takes them.

    Raises:
        StoreError: cellxgene-census is not installed, or the release or organism cannot be
            opened.
    """
    try:
        import cellxgene_census
    except ImportError as exc:
        raise StoreError(f"--census needs the cellxgene-census package ({exc}); install it "
                         f"with: {INSTALL}") from None
    try:
        census = cellxgene_census.open_soma(census_version=version)
    except Exception as exc:  # no network, unknown release: the package's own words
        raise StoreError(f"could not open CELLxGENE Census {version!r}: "
                         f"{first_line(exc)}") from None
    with census:
        organisms = list(census["census_data"].keys())
        if organism not in organisms:
            raise StoreError(f"Census {version!r} has no organism {organism!r}; it has "
                             f"{organisms} (--census_organism)")
        experiment = census["census_data"][organism]
        uri, config = experiment.uri, dict(experiment.context.tiledb_config)
    return SomaSource(uri, config=config, **options)


def _first_of_equal_rows(table: Any, columns: Sequence[str]) -> np.ndarray:
    """Positions of the first row of each distinct combination of ``columns``' values, in
    table order, from the columns' integer codes (dictionary indices, else factorised)."""
    import pyarrow as pa

    keys = np.zeros(table.num_rows, dtype=np.int64)
    span = 1
    for name in columns:
        values = table.column(name)
        if pa.types.is_dictionary(values.type):
            codes, dictionary = _dictionary_codes(values)
            size = len(dictionary)
        else:
            codes, uniques = pd.factorize(values.to_numpy(zero_copy_only=False))
            size = len(uniques)
        span *= size + 1
        if span >= 2**62:  # too many combinations for one integer key: compare as rows
            frame = table.select(list(columns)).to_pandas()
            return np.flatnonzero(~frame.duplicated().to_numpy())
        keys = keys * (size + 1) + (codes + 1)  # + 1: a null (-1) is a value of its own
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _dictionary_codes(values: Any) -> tuple[np.ndarray, Any]:
    """A dictionary-encoded Arrow column's int64 codes (-1 for a null) and its dictionary."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):  # chunks may carry different dictionaries
        values = values.unify_dictionaries().combine_chunks()
    codes = values.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, values.dictionary


def _column(values: Any) -> np.ndarray:
    """One Arrow column as numpy: dictionary (categorical) and string columns as ``str``
    objects (each category decoded once; a null as ``''``, which counts as missing)."""
    import pyarrow as pa

    if pa.types.is_dictionary(values.type):
        codes, dictionary = _dictionary_codes(values)
        categories = np.array([str(v) for v in dictionary.to_pylist()] + [""], dtype=object)
        return categories[codes]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return np.array(values.fill_null("").to_pylist(), dtype=object)
    return values.to_numpy(zero_copy_only=False)
