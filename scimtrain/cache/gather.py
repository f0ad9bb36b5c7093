"""Compiled gathers of CSR rows by position: into a CSR batch, or scattered into a dense one.

A batch from the cache is ``B`` rows picked anywhere in memory-mapped CSR files. numpy's fancy
indexing needs an index array per non-zero and a second pass to scatter into the dense batch
(~55 ms per 1,000 x 28,000 batch); these loops copy each row's run once (numba, compiled on
first use and cached on disk). ``nogil``: a prefetch thread gathers while the main thread
trains. Serial on purpose: DataLoader workers are the parallelism.

Entries are copied in stored order, so a gathered row is bit for bit the row that was stored.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _lengths(indptr, rows, out_indptr):  # pragma: no cover - compiled
    total = 0
    out_indptr[0] = 0
    for i in range(rows.size):
        r = rows[i]
        total += indptr[r + 1] - indptr[r]
        out_indptr[i + 1] = total


@_jit
def _copy_rows(indptr, indices, values, rows, out_indptr, out_indices,
               out_values):  # pragma: no cover - compiled
    for i in range(rows.size):
        r = rows[i]
        start = indptr[r]
        at = out_indptr[i]
        for j in range(indptr[r + 1] - start):
            out_indices[at + j] = indices[start + j]
            out_values[at + j] = values[start + j]


@_jit
def _scatter_rows(indptr, indices, values, rows, out, clear):  # pragma: no cover - compiled
    for i in range(rows.size):
        r = rows[i]
        line = out[i]
        if clear:  # row by row: the row is still in cache when its values land
            line[:] = 0
        for j in range(indptr[r], indptr[r + 1]):
            line[indices[j]] = values[j]


def check_rows(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """``rows`` as a contiguous int64 array, every entry in ``0..n_rows - 1`` (else IndexError:
    the compiled loops do not check bounds)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"cache rows must lie in 0..{n_rows - 1}; got "
                         f"{rows.min()}..{rows.max()}")
    return rows


def row_pointers(indptr: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """Row pointers (int64, ``rows.size + 1``) of rows ``rows`` (checked, :func:`check_rows`)
    gathered into a CSR matrix, written into ``out`` when given."""
    out = np.empty(rows.size + 1, dtype=np.int64) if out is None else out
    _lengths(indptr, rows, out)
    return out


def copy_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray,
              out_indptr: np.ndarray, out_indices: np.ndarray, out_values: np.ndarray) -> None:
    """Copy rows ``rows`` into the CSR arrays ``out_*`` (``out_indptr`` from
    :func:`row_pointers`; ``out_indices``/``out_values`` hold ``out_indptr[-1]`` entries)."""
    nnz = int(out_indptr[-1])
    if out_indices.size < nnz or out_values.size < nnz:
        raise ValueError(f"the output arrays hold fewer than the {nnz} gathered entries")
    _copy_rows(indptr, indices, values, rows, out_indptr, out_indices, out_values)


def gather_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``rows`` (checked int64, :func:`check_rows`) of a CSR matrix as a new CSR matrix.

    Returns ``(indptr, indices, values)``: int64, int64 (what ``torch.sparse_csr_tensor``
    takes without a copy) and ``values``' dtype.
    """
    out_indptr = row_pointers(indptr, rows)
    nnz = int(out_indptr[-1])
    out_indices = np.empty(nnz, dtype=np.int64)
    out_values = np.empty(nnz, dtype=values.dtype)
    copy_rows(indptr, indices, values, rows, out_indptr, out_indices, out_values)
    return out_indptr, out_indices, out_values


def scatter_dense(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                  rows: np.ndarray, out: np.ndarray, clear: bool = False) -> np.ndarray:
    """Write rows ``rows`` (checked, :func:`check_rows`) into ``out`` (``(rows.size, n_genes)``,
    C-contiguous). Only the non-zeros are written: ``out`` must be zero-filled, or ``clear``
    zeroes each row first. Returns ``out``."""
    if out.shape[0] != rows.size or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous with {rows.size} rows, got {out.shape}")
    _scatter_rows(indptr, indices, values, rows, out, bool(clear))
    return out
