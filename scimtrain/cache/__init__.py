"""The training cache: the selected cells of a run as memory-mapped CSR files.

Reading random cells from TileDB costs a tile per cell; a gather from memory-mapped CSR rows
costs a copy. So a run builds, once, a local copy of its selection (train cells, then
validation cells; genes in model order; values log-normalised exactly as the stream does it)
and its streams gather batches from it (docs/architecture.md, "The training cache").

- :mod:`~scimtrain.cache.layout`: the files, the manifest and their checks;
- :mod:`~scimtrain.cache.key`: what a cache is keyed by;
- :mod:`~scimtrain.cache.build`: the parallel build from the store;
- :mod:`~scimtrain.cache.lock`: one builder per key;
- :mod:`~scimtrain.cache.gather`: compiled row gathers (CSR and dense);
- :mod:`~scimtrain.cache.training_cache`: :class:`TrainingCache` (ensure, open, read);
- :mod:`~scimtrain.cache.manage`: :func:`list_caches`, :func:`remove_caches`.
"""

from scimtrain.cache.layout import CacheError, default_cache_dir
from scimtrain.cache.manage import list_caches, remove_caches
from scimtrain.cache.training_cache import TrainingCache

__all__ = ["CacheError", "TrainingCache", "default_cache_dir", "list_caches", "remove_caches"]
