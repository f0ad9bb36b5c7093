"""Write CellArr-layout stores: the counts array, the dataframes, a whole store.

Used by the synthetic stores and by ingestion from h5ad. The layout is CellArr's
(docs/scimilarity.md §1):
``counts`` sparse with uint32 dims ``cell_index``/``gene_index`` over the full uint32 domain and
one Gzip-filtered attribute ``data``; dense frames written with ``tiledb.from_pandas``.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledb
from tqdm.auto import tqdm

from scimtrain.columns import GENE_SYMBOL_COLUMN
from scimtrain.store import join_uri


def create_counts_array(uri: str, value_dtype: np.dtype = np.uint16, capacity: int = 10_000,
                        ctx: tiledb.Ctx | None = None) -> None:
    """Create an empty CellArr counts array at ``uri``.

    Layout as CellArr writes it: dims ``cell_index`` and ``gene_index`` (uint32, domain the
    full uint32 range), attribute ``data`` with a Gzip filter, row-major, ``capacity`` cells
    (non-zeros) per data tile.
    """
    full = (0, np.iinfo(np.uint32).max - 1)
    domain = tiledb.Domain(
        tiledb.Dim("cell_index", domain=full, dtype=np.uint32, ctx=ctx),
        tiledb.Dim("gene_index", domain=full, dtype=np.uint32, ctx=ctx),
        ctx=ctx,
    )
    attr = tiledb.Attr("data", dtype=value_dtype,
                       filters=tiledb.FilterList([tiledb.GzipFilter()]), ctx=ctx)
    schema = tiledb.ArraySchema(domain=domain, attrs=[attr], sparse=True, capacity=capacity,
                                cell_order="row-major", tile_order="row-major", ctx=ctx)
    tiledb.Array.create(uri, schema, ctx=ctx)


def write_frame(uri: str, frame: pd.DataFrame, ctx: tiledb.Ctx | None = None) -> None:
    """Write a DataFrame as a dense TileDB frame (``tiledb.from_pandas``), row index 0..n-1.

    Missing strings are written as ``'\\x00'``, which readers treat as null
    (docs/scimilarity.md §2.1).
    """
    frame = frame.reset_index(drop=True).copy()
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), "\x00")
            frame[column] = frame[column].astype(str)
    tiledb.from_pandas(uri, frame, ctx=ctx)


def write_counts(counts_uri: str, chunks: Iterable[sp.spmatrix], n_genes: int, *,
                 value_dtype: np.dtype = np.uint16, capacity: int = 10_000,
                 progress: bool = False, total_rows: int | None = None,
                 ctx: tiledb.Ctx | None = None, first_row: int | None = None) -> int:
    """Create a counts array and write row chunks one after the other; returns the row count.

    The chunks are appended in TileDB's global order (cells ascending, genes ascending within a
    cell) to a single fragment: no sort inside TileDB and no consolidation afterwards, about 5x
    faster than unordered writes of the same chunks. Memory is bounded by one chunk.

    ``first_row`` appends to an existing array instead: the chunks' rows are written from that
    row on (the store's current cell count) as one new fragment; nothing there is rewritten.
    """
    if first_row is None:
        create_counts_array(counts_uri, value_dtype, capacity, ctx=ctx)
    rows = first_row or 0
    bar = tqdm(total=total_rows, desc="writing counts", unit=" cells", disable=not progress)
    with bar, _GlobalOrderWriter(counts_uri, ctx) as writer:
        for chunk in chunks:
            csr = sp.csr_matrix(chunk)
            if csr.shape[1] != n_genes:
                raise ValueError(f"a counts chunk has {csr.shape[1]} genes, expected {n_genes}")
            csr.sum_duplicates()  # also sorts the genes of each cell: global order
            csr.eliminate_zeros()
            if csr.nnz:
                cell = np.repeat(np.arange(rows, rows + csr.shape[0], dtype=np.uint32),
                                 np.diff(csr.indptr))
                writer.append(cell, csr.indices.astype(np.uint32),
                              _as_counts(csr.data, value_dtype))
            rows += csr.shape[0]
            bar.update(csr.shape[0])
    return rows - (first_row or 0)


class _GlobalOrderWriter:
    """Appends coordinates already in global order to one fragment of a sparse 2-D array.

    tiledb-py's ``array[...] = ...`` only writes unordered (TileDB sorts, one fragment per
    call); the global-order query lives in ``tiledb.libtiledb``, the bindings tiledb-py is
    built on.
    """

    def __init__(self, uri: str, ctx: tiledb.Ctx | None) -> None:
        import tiledb.libtiledb as lt

        self._lt = lt
        self._ctx = lt.Context(ctx if ctx is not None else tiledb.Ctx())
        self._array = lt.Array(self._ctx, uri, lt.QueryType.WRITE)
        self._query = lt.Query(self._ctx, self._array, lt.QueryType.WRITE)
        self._query.layout = lt.LayoutType.GLOBAL_ORDER
        with tiledb.open(uri, ctx=ctx) as arr:
            schema = arr.schema
            self._names = (schema.domain.dim(0).name, schema.domain.dim(1).name,
                           schema.attr(0).name)

    def append(self, cells: np.ndarray, genes: np.ndarray, values: np.ndarray) -> None:
        buffers = [np.ascontiguousarray(b) for b in (cells, genes, values)]
        for name, buffer in zip(self._names, buffers):
            self._query.set_data_buffer(name, buffer, buffer.size)
        if self._query._submit() != self._lt.QueryStatus.COMPLETE:
            raise RuntimeError("TileDB did not complete a global-order write")

    def __enter__(self) -> _GlobalOrderWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self._query.finalize()
        self._array._close()


def _as_counts(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast counts to the on-disk type, refusing values it cannot hold exactly."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and values.size and (values.max() > np.iinfo(dtype).max
                                              or values.min() < 0):
        raise ValueError(f"counts outside the {dtype.name} range [0, {np.iinfo(dtype).max}]; "
                         "write with a wider value_dtype")
    return values.astype(dtype)


def write_store(
    uri: str | os.PathLike,
    cell_metadata: pd.DataFrame,
    gene_symbols: Iterable[str],
    sample_metadata: pd.DataFrame,
    counts: sp.spmatrix | Iterable[sp.spmatrix],
    *,
    counts_location: str = "counts",
    value_dtype: np.dtype = np.uint16,
    capacity: int = 10_000,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write a CellArr-layout store.

    Args:
        uri: destination folder.
        cell_metadata: one row per cell, in counts row order.
        gene_symbols: one symbol per gene, in counts column order.
        sample_metadata: one row per sample.
        counts: a sparse matrix (cells × genes), or an iterable of row chunks written one after
            the other (memory bounded by one chunk).
        counts_location: ``"counts"`` (SCimilarity) or ``"assays/counts"`` (cellarr).
        value_dtype: on-disk count type.
        capacity: non-zeros per TileDB data tile.
        overwrite: replace an existing folder.
        progress: show a progress bar over chunks.

    Returns:
        The store URI.
    """
    uri, ctx = fresh_store(uri, overwrite, counts_location)
    genes = [str(g) for g in gene_symbols]
    chunks = [counts] if sp.issparse(counts) else counts
    rows = write_counts(join_uri(uri, counts_location), chunks, len(genes),
                        value_dtype=value_dtype, capacity=capacity, progress=progress,
                        total_rows=len(cell_metadata), ctx=ctx)
    if rows != len(cell_metadata):
        raise ValueError(f"counts have {rows} rows but cell_metadata has {len(cell_metadata)}")
    write_frames(uri, cell_metadata, genes, sample_metadata, ctx)
    return uri


def fresh_store(uri: str | os.PathLike, overwrite: bool,
                counts_location: str) -> tuple[str, tiledb.Ctx]:
    """Make an empty store folder (removing an old one only with ``overwrite``).

    Returns the URI as a string and a TileDB context to write with.
    """
    uri = str(uri)
    if os.path.exists(uri):
        if not overwrite:
            raise FileExistsError(f"{uri} already exists; pass overwrite=True or remove it")
        shutil.rmtree(uri)
    os.makedirs(uri)
    ctx = tiledb.Ctx()
    if "/" in counts_location:
        tiledb.group_create(join_uri(uri, counts_location.rsplit("/", 1)[0]), ctx=ctx)
    return uri, ctx


def write_frames(uri: str, cell_metadata: pd.DataFrame, genes: list[str],
                 sample_metadata: pd.DataFrame, ctx: tiledb.Ctx) -> None:
    """Write the three dataframes of a store (gene symbols into ``cellarr_gene_index``)."""
    write_frame(join_uri(uri, "cell_metadata"), cell_metadata, ctx)
    write_frame(join_uri(uri, "gene_annotation"), pd.DataFrame({GENE_SYMBOL_COLUMN: genes}), ctx)
    write_frame(join_uri(uri, "sample_metadata"), sample_metadata, ctx)
