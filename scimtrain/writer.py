"""Write CellArr-layout stores: the counts array, the dataframes, a whole store.

Used by the synthetic stores and by ingestion from h5ad. The layout is CellArr's (SPEC §1):
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

from scimtrain.store import GENE_SYMBOL_COLUMN, join_uri


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

    Missing strings are written as ``'\\x00'``, which readers treat as null (SPEC §2.1).
    """
    frame = frame.reset_index(drop=True).copy()
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), "\x00")
            frame[column] = frame[column].astype(str)
    tiledb.from_pandas(uri, frame, ctx=ctx)


def write_counts(counts_uri: str, chunks: Iterable[sp.spmatrix], n_genes: int, *,
                 value_dtype: np.dtype = np.uint16, capacity: int = 10_000,
                 consolidate: bool = True, progress: bool = False,
                 total_rows: int | None = None, ctx: tiledb.Ctx | None = None) -> int:
    """Create a counts array and write row chunks one after the other; returns the row count.

    Each chunk becomes one TileDB fragment (memory bounded by one chunk); with ``consolidate``
    the fragments are merged into one afterwards, which reads fastest.
    """
    create_counts_array(counts_uri, value_dtype, capacity, ctx=ctx)
    rows = 0
    bar = tqdm(total=total_rows, desc="writing counts", unit=" cells", disable=not progress)
    with bar, tiledb.open(counts_uri, mode="w", ctx=ctx) as arr:
        for chunk in chunks:
            coo = sp.coo_matrix(chunk)
            if coo.shape[1] != n_genes:
                raise ValueError(f"a counts chunk has {coo.shape[1]} genes, expected {n_genes}")
            if coo.nnz:
                order = np.lexsort((coo.col, coo.row))
                arr[(coo.row[order] + rows).astype(np.uint32),
                    coo.col[order].astype(np.uint32)] = coo.data[order].astype(value_dtype)
            rows += coo.shape[0]
            bar.update(coo.shape[0])
    if consolidate and len(tiledb.array_fragments(counts_uri, ctx=ctx)) > 1:
        tiledb.consolidate(counts_uri, ctx=ctx)
        tiledb.vacuum(counts_uri, ctx=ctx)
    return rows


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
