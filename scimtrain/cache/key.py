"""The cache key: a sha256 over everything a cache's bytes depend on.

Inputs: the source's identity (:meth:`scimtrain.source.CellSource.identity`: its resolved URI
and version, the fragment lists of its counts and the frames that decide cells and genes: each
fragment's name holds its timestamps and a UUID), the selected cells in cache-row order, the
gene order, the normalisation and the cache format version. Writing to the store (a new fragment),
consolidating it, or changing the selection or gene order gives a new key, hence a new cache.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from scimtrain.cache.layout import FORMAT_VERSION, NORMALISATION


def normalise_genes(gene_indices: np.ndarray | None, n_genes: int) -> np.ndarray | None:
    """Gene indices as int64, or None for "every store gene in store order" (the identity)."""
    if gene_indices is None:
        return None
    genes = np.asarray(gene_indices, dtype=np.int64).ravel()
    if genes.size and (genes.min() < 0 or genes.max() >= n_genes):
        raise ValueError(f"gene_indices must lie in 0..{n_genes - 1}")
    if np.unique(genes).size != genes.size:
        raise ValueError("gene_indices lists a store gene twice; pass each gene once")
    return None if np.array_equal(genes, np.arange(n_genes)) else genes


def cache_key(identity: dict, cells: np.ndarray, genes: np.ndarray | None, n_store_genes: int,
              target_sum: float) -> str:
    """The hex sha256 key of a cache (``identity``: :meth:`CellSource.identity`; the rest as
    :func:`normalise_genes` return them; ``cells`` int64 in cache-row order)."""
    digest = hashlib.sha256()
    header = {"format_version": FORMAT_VERSION, "normalisation": NORMALISATION,
              "target_sum": float(target_sum), "store": identity,
              "genes": "all" if genes is None else int(genes.size),
              "n_store_genes": int(n_store_genes), "n_rows": int(cells.size)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(cells, dtype="<i8").tobytes())
    if genes is not None:
        digest.update(np.ascontiguousarray(genes, dtype="<i8").tobytes())
    return digest.hexdigest()
