"""Read a CellArr-layout TileDB store: cell metadata, genes, samples and rows of counts.

A store is a folder or any TileDB URI (``s3://bucket/atlas`` works through the TileDB config
passed as ``config``) holding four arrays (docs/scimilarity.md §1):

- ``counts`` (SCimilarity's location) or ``assays/counts`` (where the ``cellarr`` package
  writes it): sparse, dims (cell, gene), one attribute of raw counts;
- ``cell_metadata``, ``gene_annotation``, ``sample_metadata``: dataframes.

TileDB handles and the TileDB context are created lazily *in the process that reads* and keyed
by process id: a forked DataLoader worker never touches a handle or context of its parent (with
tiledb 0.36, forked workers that reuse the parent's default context hang), and the store pickles
without handles, so "spawn" workers work too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledb

from scimtrain.columns import GENE_SYMBOL_COLUMN
from scimtrain.condition import ENUM, NUMBER, TEXT, ConditionError, plan_condition
from scimtrain.source import (  # noqa: F401 (StoreError, DEFAULT_CONFIG: imported from here)
    DEFAULT_CONFIG,
    CellSource,
    StoreError,
    csr_from_coordinates,
    first_line,
    missing_values,
    resolved_uri,
    tiledb_config,
)

COUNTS_LOCATIONS = ("counts", "assays/counts")
FRAMES = ("cell_metadata", "gene_annotation", "sample_metadata")

# TileDB objects inherited through fork are parked here instead of being closed or garbage
# collected in the child: tearing down a parent's context in a forked child segfaults.
_INHERITED: list = []


def join_uri(base: str, name: str) -> str:
    """Join a TileDB URI (local path, ``s3://``, ``tiledb://``) and a relative name."""
    return f"{base.rstrip('/')}/{name}"


class CellArrStore(CellSource):
    """One CellArr store, opened lazily and per process (a :class:`CellSource`).

    Args:
        uri: the store's folder or TileDB URI.
        config: TileDB config parameters (e.g. ``{"vfs.s3.region": "us-west-2"}`` or
            ``{"sm.compute_concurrency_level": 1}``), applied to every context this store makes.
        counts: where the counts array lives, relative to ``uri``; ``None`` finds ``counts``
            or ``assays/counts``.
        gene_column: the ``gene_annotation`` column holding gene symbols.

    Raises:
        StoreError: the URI is not a store, or lacks one of the four arrays.
    """

    kind = "cellarr"
    column_fix = (", or rebuild the store with bin/build_store.py (with the cellarr package: "
                  "pass build_cellarrdataset a cell_metadata frame holding these columns)")

    def __init__(
        self,
        uri: str | os.PathLike,
        config: Mapping[str, object] | None = None,
        counts: str | None = None,
        gene_column: str = GENE_SYMBOL_COLUMN,
    ) -> None:
        self.uri = str(uri)
        self.config = tiledb_config(config)
        self.gene_column = gene_column
        self._pid: int | None = None
        self._ctx: tiledb.Ctx | None = None
        self._counts: tiledb.SparseArray | None = None
        self.counts_uri = self._find_counts(counts)
        self._check_frames()
        with self._open(self.counts_uri) as arr:
            schema = arr.schema
            if not schema.sparse or schema.ndim != 2:
                raise StoreError(
                    f"{self.counts_uri} is not a sparse 2-D array (cell, gene); "
                    "a CellArr counts array is sparse with dims cell_index and gene_index."
                )
            self.counts_attr = schema.attr(0).name
            self.cell_dim = schema.domain.dim(0).name
            self.gene_dim = schema.domain.dim(1).name
            counts_extent = arr.nonempty_domain()
        self.n_cells = self._frame_rows("cell_metadata")
        self.n_genes = self._frame_rows("gene_annotation")
        if counts_extent is not None:
            (_, c1), (_, g1) = counts_extent
            if int(c1) >= self.n_cells or int(g1) >= self.n_genes:
                raise StoreError(
                    f"{self.counts_uri} holds cells up to {c1} and genes up to {g1}, but "
                    f"cell_metadata has {self.n_cells} rows and gene_annotation "
                    f"{self.n_genes}: the arrays of {self.uri} do not belong together."
                )

    # ------------------------------------------------------------------ handles

    def _context(self) -> tiledb.Ctx:
        """The TileDB context of the calling process (made on first use in each process)."""
        pid = os.getpid()
        if self._pid != pid:
            # Objects made by another process (we are a forked child) are parked, never
            # used or destroyed here: freeing a parent's context in a child segfaults.
            _INHERITED.extend(x for x in (self._counts, self._ctx) if x is not None)
            self._counts = None
            self._ctx = tiledb.Ctx(tiledb.Config(self.config))
            self._pid = pid
        return self._ctx

    def _open(self, uri: str) -> tiledb.Array:
        return tiledb.open(uri, mode="r", ctx=self._context())

    def counts_array(self) -> tiledb.SparseArray:
        """The counts array, open for reading in this process (kept open across calls)."""
        ctx = self._context()
        if self._counts is None:
            self._counts = tiledb.open(self.counts_uri, mode="r", ctx=ctx)
        return self._counts

    def close(self) -> None:
        """Close this process's counts handle (frames are opened per call)."""
        if self._counts is not None and self._pid == os.getpid():
            self._counts.close()
        self._counts = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _ctx=None, _counts=None)
        return state

    def identity(self) -> dict:
        """The resolved URI and the fragments (name, which holds timestamps and a UUID, and
        cell count) of the counts, cell_metadata and gene_annotation arrays."""
        arrays = {"counts": self.counts_uri,
                  **{f: join_uri(self.uri, f) for f in ("cell_metadata", "gene_annotation")}}
        return {"uri": resolved_uri(self.uri),
                "fragments": array_fragments(arrays, tiledb.Ctx(tiledb.Config(self.config)))}

    def _object_type(self, uri: str) -> str | None:
        return tiledb.object_type(uri, ctx=self._context())

    def _find_counts(self, counts: str | None) -> str:
        if self._object_type(self.uri) is None and not os.path.isdir(self.uri):
            raise StoreError(
                f"{self.uri} does not exist or is not a TileDB store; pass the folder (or URI) "
                "that holds counts, cell_metadata, gene_annotation and sample_metadata."
            )
        candidates = (counts,) if counts else COUNTS_LOCATIONS
        for rel in candidates:
            uri = join_uri(self.uri, rel)
            if self._object_type(uri) == "array":
                return uri
        where = f"'{counts}'" if counts else " or ".join(f"'{c}'" for c in COUNTS_LOCATIONS)
        raise StoreError(
            f"{self.uri} has no counts array at {where}; pass the right location with "
            "counts=... (--counts_location) or point at a CellArr store."
        )

    def _check_frames(self) -> None:
        missing = [f for f in FRAMES if self._object_type(join_uri(self.uri, f)) != "array"]
        if missing:
            raise StoreError(
                f"{self.uri} lacks the array(s) {', '.join(missing)}; a CellArr store needs "
                f"counts plus {', '.join(FRAMES)} (build one with bin/build_store.py)."
            )

    def _frame_rows(self, frame: str) -> int:
        with self._open(join_uri(self.uri, frame)) as arr:
            extent = arr.nonempty_domain()
        return 0 if extent is None else int(extent[0][1]) + 1

    # ------------------------------------------------------------------ frames

    def columns(self, frame: str = "cell_metadata") -> list[str]:
        """The attribute (column) names of one dataframe array."""
        with self._open(join_uri(self.uri, frame)) as arr:
            return [arr.schema.attr(i).name for i in range(arr.schema.nattr)]

    def read_frame(self, frame: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """A whole dataframe array (or some of its columns), indexed by its row number."""
        return self._query_frame(frame, None, columns)

    def query_cells(
        self, condition: str | None, columns: Sequence[str]
    ) -> pd.DataFrame:
        """Cells of ``cell_metadata`` that satisfy a TileDB query-condition string.

        Args:
            condition: e.g. ``"total_counts>1000 and cellTypeOntologyID!='nan'"``; ``None`` or
                ``""`` selects every cell.
            columns: the columns to return.

        Returns:
            A DataFrame indexed by ``cell_index`` (int64, ascending) holding ``columns``. Rows
            where any returned column is missing (null string ``'\\x00'``, empty string, NaN, or
            the column's fill value) are dropped, as SCimilarity drops them.

        Raises:
            StoreError: the condition cannot be parsed or names an unknown column, or a
                requested column does not exist.
        """
        return self._query_frame("cell_metadata", condition or None, columns)

    def sample_metadata(self) -> pd.DataFrame:
        """The ``sample_metadata`` frame, all columns, indexed by row number."""
        return self.read_frame("sample_metadata")

    @property
    def gene_symbols(self) -> np.ndarray:
        """Gene symbols in store order (index = ``gene_index``), an object array of str."""
        if not hasattr(self, "_gene_symbols"):
            frame = self.read_frame("gene_annotation", [self.gene_column])
            if len(frame) != self.n_genes:
                raise StoreError(
                    f"gene_annotation of {self.uri} has missing symbols in column "
                    f"'{self.gene_column}'"
                )
            self._gene_symbols = frame[self.gene_column].to_numpy(dtype=object)
        return self._gene_symbols

    def _query_frame(
        self, frame: str, condition: str | None, columns: Sequence[str] | None
    ) -> pd.DataFrame:
        """Rows of a frame satisfying ``condition``, text decoded to ``str`` (the one place that
        decodes), rows with a missing value in ``columns`` dropped.

        The parts of the condition that compare a text column with a number (cellarr writes
        every column as ``ascii`` by default) are evaluated on the decoded column with its text
        parsed as numbers (:mod:`scimtrain.condition`); TileDB evaluates the rest.
        """
        uri = join_uri(self.uri, frame)
        with self._open(uri) as arr:
            schema = arr.schema
            available = [schema.attr(i).name for i in range(schema.nattr)]
            if columns is None:
                columns = available
            unknown = [c for c in columns if c not in available]
            if unknown:
                raise StoreError(
                    f"{frame} of {self.uri} has no column(s) {unknown}; it has {available}. "
                    "Pass the right column names (e.g. --label_id_column / --study_column)."
                )
            try:
                plan = plan_condition(condition, column_kinds(schema), read=columns)
            except ConditionError as exc:
                raise self._condition_error(condition, frame, available, str(exc)) from exc
            read = list(dict.fromkeys([*columns, *plan.columns]))
            row_dim = schema.domain.dim(0).name
            try:
                raw = arr.query(cond=plan.tiledb, attrs=read, dims=[row_dim]).multi_index[:]
            except (tiledb.TileDBError, TypeError, ValueError) as exc:
                raise self._condition_error(condition, frame, available,
                                            first_line(exc)) from exc
            fills = {c: schema.attr(c).fill for c in columns}
        rows = np.asarray(raw[row_dim], dtype=np.int64)
        data = {c: self._decoded(raw[c], frame, c) for c in read}
        keep = np.ones(len(rows), dtype=bool)
        for c in columns:
            keep &= ~missing_values(data[c], fills[c])
        if plan.python is not None:
            # Only rows TileDB kept (the others come back as fill values): fewer to parse.
            try:
                keep[keep] = plan.evaluate({c: data[c][keep] for c in plan.columns})
            except ConditionError as exc:
                raise self._condition_error(condition, frame, available, str(exc)) from exc
        index = pd.Index(rows[keep], name="cell_index" if frame == "cell_metadata" else None)
        out = pd.DataFrame({c: data[c][keep] for c in columns}, index=index)
        return out.sort_index()

    def _condition_error(self, condition: str | None, frame: str, available: list[str],
                         reason: str) -> StoreError:
        return StoreError(
            f"could not evaluate the condition {condition!r} on {frame} of "
            f"{self.uri}: {reason}. Conditions use column names, quoted strings and "
            f"and/or, e.g. \"total_counts>1000 and label!='nan'\"; the columns are {available}."
        )

    def _decoded(self, values: np.ndarray, frame: str, column: str) -> np.ndarray:
        try:
            return decode_text(values)
        except UnicodeDecodeError as exc:
            raise StoreError(
                f"column '{column}' of {frame} of {self.uri} holds {exc.object!r}, which is "
                "not UTF-8 text; rewrite the column as UTF-8 (or ascii)."
            ) from exc

    # ------------------------------------------------------------------ counts

    def _read_sorted_unique(self, cells: np.ndarray) -> sp.csr_matrix:
        shape = (cells.size, self.n_genes)
        if cells.size == 0:
            return sp.csr_matrix(shape, dtype=np.float32)
        arr = self.counts_array()
        ranges = [slice(int(a), int(b)) for a, b in coalesce_ranges(cells)]
        # TileDB refuses multi-range reads in global order and sorts slowly in row-major
        # order (~5x the read itself), so read unordered and sort here only when needed.
        result = arr.query(attrs=[self.counts_attr], dims=[self.cell_dim, self.gene_dim],
                           order="U").multi_index[ranges, :]
        return csr_from_coordinates(cells, result[self.cell_dim], result[self.gene_dim],
                                    result[self.counts_attr], self.n_genes,
                                    ordered=self._csr_ordered(arr))

    def _csr_ordered(self, arr: tiledb.SparseArray) -> bool:
        """Whether unordered reads come back in CSR order (cell, then gene ascending).

        True for one fragment whose global order is row-major over cells and genes: CellArr's
        full-domain tile extents, or one cell per space tile. Several fragments interleave.
        """
        if not hasattr(self, "_ordered"):
            schema = arr.schema
            genes = schema.domain.dim(1)
            lo, hi = genes.domain
            row_major = schema.cell_order == "row-major" and schema.tile_order == "row-major"
            full_gene_tiles = genes.tile is None or int(genes.tile) >= int(hi) - int(lo) + 1
            one_cell_tiles = int(schema.domain.dim(0).tile or 0) == 1
            fragments = len(tiledb.array_fragments(self.counts_uri, ctx=self._context()))
            self._ordered = row_major and (full_gene_tiles or one_cell_tiles) and fragments == 1
        return self._ordered


def array_fragments(arrays: Mapping[str, str], ctx: tiledb.Ctx) -> dict[str, list]:
    """``{name: sorted [fragment name, cell count] pairs}`` of TileDB arrays (any TileDB array:
    a CellArr store's or a SOMA experiment's). A fragment's name holds its timestamps and a
    UUID, so any write or consolidation changes the list."""
    return {name: sorted([info.uri.rstrip("/").rsplit("/", 1)[-1], int(info.cell_num)]
                         for info in tiledb.array_fragments(uri, ctx=ctx))
            for name, uri in arrays.items()}


def coalesce_ranges(sorted_unique: np.ndarray) -> np.ndarray:
    """Runs of consecutive integers in a sorted unique array as inclusive ``[start, end]`` rows.

    >>> coalesce_ranges(np.array([1, 2, 3, 7, 9, 10])).tolist()
    [[1, 3], [7, 7], [9, 10]]
    """
    values = np.asarray(sorted_unique, dtype=np.int64)
    if values.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate(([values[0]], values[breaks + 1]))
    ends = np.concatenate((values[breaks], [values[-1]]))
    return np.stack([starts, ends], axis=1)


def column_kinds(schema: tiledb.ArraySchema) -> dict[str, str]:
    """Each attribute of a frame schema and its kind for conditions: ``TEXT`` (``ascii`` or
    UTF-8), ``ENUM`` (an enumeration, whatever its values) or ``NUMBER``."""
    kinds = {}
    for i in range(schema.nattr):
        attr = schema.attr(i)
        if attr.enum_label is not None:
            kinds[attr.name] = ENUM
        elif attr.isascii or attr.dtype.kind in "SUO":
            kinds[attr.name] = TEXT
        else:
            kinds[attr.name] = NUMBER
    return kinds


def decode_text(values: np.ndarray) -> np.ndarray:
    """A column as TileDB returns it, with text as an object array of ``str``.

    TileDB returns ``ascii`` attributes as ``bytes``, UTF-8 ones as ``str`` and enumerations as
    a fixed-width unicode array; numbers pass through unchanged. Null strings (``'\\x00'``)
    stay ``'\\x00'``, so that :func:`~scimtrain.source.missing_values` still sees them.

    Raises:
        UnicodeDecodeError: a value is not UTF-8.
    """
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values.astype(object)
    if values.dtype.kind == "S":
        values = values.astype(object)
    if values.dtype.kind != "O" or values.size == 0 or not isinstance(values[0], bytes):
        return values
    # Labels, studies and samples repeat few distinct values: decode each one once.
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    decoded = np.array([u.decode("utf-8") for u in uniques], dtype=object)
    return decoded[codes]
