"""The streaming loader: sampling plan → pooled, sorted TileDB reads → log-normalised batches.

``CellStream`` is an ``IterableDataset`` that yields :class:`Batch` es of one epoch of one rank:

1. **Plan** (:mod:`scimtrain.sampling`): the batches of (seed, epoch, rank), no I/O.
2. **Pool**: ``pool_batches`` batches are read together: the union of their cells, sorted, in
   one TileDB query with neighbouring cells coalesced into ranges (``CellArrStore.read_rows``).
   The pool's genes are subset and ordered to the model's gene order once.
3. **Batch**: the pool's rows are sliced back into its batches in plan order, normalised to
   ``target_sum`` per cell and ``log1p``'d (docs/scimilarity.md §3), and emitted dense
   (float32) or as a ``torch.sparse_csr`` tensor for densifying on the GPU.
4. **Prefetch**: a background thread reads the next ``prefetch_pools`` pools while the current
   one is served (TileDB releases the GIL). Memory is bounded by ``(1 + prefetch_pools)`` raw
   pools per reading process plus the DataLoader's queue of finished batches.

With a training cache (``cache=``, :mod:`scimtrain.cache`), steps 2 and 3 are one gather per
batch: rows ``cache_offset + positions`` of memory-mapped CSR files that hold the very values
step 3 computes (bit for bit), so no TileDB query is made while training. Dense batches (and
cached CSR batches) are filled into buffers that are reused once the consumer has dropped
them (:mod:`scimtrain.cache.buffers`), in shared memory inside workers.

Workers: iterating a stream with ``num_workers > 0`` starts a DataLoader over the stream
itself; batch ``k`` of the epoch is made by worker ``k % num_workers``, which is exactly the
order the DataLoader returns them in, so the batches are the same for any number of workers.
Each worker pools *its own* batches. Ranks: each rank builds a stream with its ``rank`` and
``world_size`` and reads only its own batches; all ranks yield the same number.

State: ``state_dict()`` is ``{"epoch", "consumed"}`` as counted in the iterating process;
``load_state_dict`` followed by iteration yields batch ``consumed``, ``consumed + 1``, ... of
that epoch without reading the ones before.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Literal, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scimtrain.cache.buffers import BufferRing, make_flags, register
from scimtrain.prefetch import prefetch
from scimtrain.sampling import Mode, SamplingPlan
from scimtrain.store import CellArrStore

if TYPE_CHECKING:
    from scimtrain.cache import TrainingCache


# CSR batches are built and passed between processes many times a second; torch warns on each
# that CSR support is beta and that invariant checks are off (they are valid by construction).
# tiledb warns at every fork that a parent's context may deadlock a child: the stream's
# workers never use the parent's context or handles (see store.py), which is what it warns of.
for _message in ("Sparse CSR tensor support is in beta state",
                 "Sparse invariant checks are implicitly disabled",
                 "TileDB is a multithreading library and deadlocks are likely"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


class Batch(NamedTuple):
    """One batch: ``x`` is (B, G) float32, dense or ``torch.sparse_csr``; ``labels`` and
    ``studies`` are int64 (B,) (label integers and study integers of the selection)."""

    x: torch.Tensor
    labels: torch.Tensor
    studies: torch.Tensor


@dataclass(frozen=True)
class CellTable:
    """What the stream needs to know of each cell of a split: where it is and what it is."""

    cell_index: np.ndarray
    labels: np.ndarray
    studies: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> CellTable:
        """From a :class:`~scimtrain.selection.Selection` split (index = cell_index)."""
        return cls(cell_index=frame.index.to_numpy(np.int64),
                   labels=frame["label_int"].to_numpy(np.int64),
                   studies=frame["study_int"].to_numpy(np.int64),
                   weights=frame["sampling_weight"].to_numpy(np.float64))

    def __len__(self) -> int:
        return self.cell_index.size


@dataclass(frozen=True)
class StreamConfig:
    """Loader knobs. Defaults were chosen with ``benchmarks/loader_throughput.py`` (README)."""

    batch_size: int = 1000
    n_batches: int = 100
    mode: Mode = "weighted"
    seed: int = 0
    pool_batches: int = 16
    prefetch_pools: int = 1
    num_workers: int = 2
    multiprocessing_context: str | None = None  # None: the platform default ("fork" on Linux)
    output: Literal["dense", "csr"] = "dense"
    target_sum: float = 1e4
    pin_memory: bool = False
    tiledb_threads: int | None = None
    tiledb_memory_mb: int = 256
    tiledb_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pool_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tiledb_memory_mb < 1 or (self.tiledb_threads is not None
                                         and self.tiledb_threads < 1):
            raise ValueError("tiledb_memory_mb and tiledb_threads must be at least 1")
        if self.prefetch_pools < 0 or self.num_workers < 0:
            raise ValueError("prefetch_pools and num_workers must be >= 0")
        if self.output not in ("dense", "csr"):
            raise ValueError(f"output must be 'dense' or 'csr', not {self.output!r}")


class CellStream(IterableDataset):
    """Batches of one rank's epoch, read in pools from a CellArr store.

    Args:
        store: the store (or its URI).
        cells: the split to sample from (:meth:`CellTable.from_frame`).
        gene_indices: store columns in model order (``Selection.gene_indices``); ``None`` keeps
            every store gene in store order.
        config: loader knobs.
        rank, world_size: this process's place among the training processes; by default
            taken from ``torch.distributed`` when it is initialised (else 0 and 1).
        cache: a :class:`~scimtrain.cache.TrainingCache` holding these cells (and genes):
            batches are gathered from it instead of read from the store.
        cache_offset: the cache row of ``cells``' first cell (0 for the training split,
            ``len(train)`` for the validation split of a cache built on train + val).
    """

    def __init__(self, store: CellArrStore | str, cells: CellTable,
                 gene_indices: np.ndarray | None = None, config: StreamConfig = StreamConfig(),
                 rank: int | None = None, world_size: int | None = None, *,
                 cache: TrainingCache | None = None, cache_offset: int = 0) -> None:
        super().__init__()
        rank, world_size = _place(rank, world_size)
        if not isinstance(store, CellArrStore):
            store = CellArrStore(store)
        self.store = store.with_config(reader_config(config))
        self.cells = cells
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.plan = SamplingPlan(cells.weights, config.batch_size, config.n_batches,
                                 config.seed, config.mode, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        n_store_genes = store.n_genes
        if gene_indices is None:
            self.gene_indices = None
            self.n_genes = n_store_genes
        else:
            self.gene_indices = np.asarray(gene_indices, dtype=np.int64)
            if self.gene_indices.size and (self.gene_indices.min() < 0
                                           or self.gene_indices.max() >= n_store_genes):
                raise ValueError(f"gene_indices must lie in 0..{n_store_genes - 1}")
            if np.array_equal(self.gene_indices, np.arange(n_store_genes)):
                self.gene_indices = None  # identity: skip the column gather
            self.n_genes = self.gene_indices.size if self.gene_indices is not None else \
                n_store_genes
        self.cache = cache
        self.cache_offset = int(cache_offset)
        self._flags: torch.Tensor | None = None  # batch buffers' flags, set per iteration
        if cache is not None:
            check_cache(cache, cache_offset, cells, self.gene_indices, n_store_genes, config)
            cache.warm_up()
        self.epoch = 0
        self.consumed = 0

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.plan.batches_per_rank()

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` next; a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        """``{"epoch", "consumed", "rank", "world_size", "seed"}`` of the iterating process."""
        return {"epoch": self.epoch, "consumed": self.consumed, "rank": self.rank,
                "world_size": self.world_size, "seed": self.config.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next batch is ``state["consumed"]``."""
        if state.get("world_size", self.world_size) != self.world_size or \
                state.get("seed", self.config.seed) != self.config.seed:
            raise ValueError(
                f"stream state was saved with world_size={state.get('world_size')} and "
                f"seed={state.get('seed')}, this stream has world_size={self.world_size} and "
                f"seed={self.config.seed}: resume with the same settings")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is not None:  # inside a DataLoader worker: this worker's share only
            if not _OWN_WORKER:
                raise RuntimeError(
                    "a CellStream was put in a DataLoader with workers: its state_dict() would "
                    "not count the batches those workers hand out, so resume would repeat "
                    "them. A CellStream starts its own workers: iterate "
                    "scimtrain.cell_dataloader(stream, num_workers=N) (or set "
                    "StreamConfig.num_workers) instead of wrapping it")
            protect_inherited_objects()
            ring = None if self._flags is None else BufferRing(self._flags, info.id)
            yield from self._produce(self.epoch, self.consumed, info.id, info.num_workers,
                                     ring)
            return
        if self.consumed >= len(self):  # a finished epoch iterates again from the start
            self.consumed = 0
        # Batch buffers are reused once this process lets go of them (cached CSR and any
        # dense batches; TileDB's CSR batches are made from the arrays its read returns).
        reuse = self.config.output == "dense" or self.cache is not None
        flags = None
        if self.config.num_workers == 0:
            source = self._produce(self.epoch, self.consumed, 0, 1,
                                   BufferRing() if reuse else None)
        else:
            # Pinning copies each batch out of its buffer first: nothing to reuse then.
            flags = make_flags(self.config.num_workers, shared=True) \
                if reuse and not self.config.pin_memory else None
            self._flags = flags  # reaches the workers with the stream itself
            # TileDB objects waiting in reference cycles are freed here, in their own process:
            # a forked worker's garbage collector freeing them would segfault.
            gc.collect()
            source = iter(DataLoader(
                self, batch_size=None, num_workers=self.config.num_workers,
                multiprocessing_context=self.config.multiprocessing_context,
                # Finished batches waiting per worker: dense ones are large (B x G float32).
                pin_memory=self.config.pin_memory, prefetch_factor=2,
                worker_init_fn=_worker_init,
                # The workers' base seed comes from this generator, not from torch's global
                # one, which dropout also draws from: starting workers (as a resumed epoch
                # does once more) must not shift the training's random stream.
                generator=torch.Generator().manual_seed(
                    hash((self.config.seed, self.epoch, self.rank)) & (2**63 - 1))))
        for batch in source:
            if flags is not None:
                register(batch.x, flags)
            # Counted before handing out, so a state_dict() taken while the consumer holds
            # batch k says "k + 1 consumed".
            self.consumed += 1
            yield batch
            del batch  # not held here while the next one is fetched: its buffer can be reused

    def _produce(self, epoch: int, start: int, worker: int, n_workers: int,
                 ring: BufferRing | None) -> Iterator[Batch]:
        """This worker's batches of ``epoch`` from batch ``start`` on: read pool by pool from
        TileDB, or gathered batch by batch from the cache. Dense batches go into ``ring``'s
        buffers when there is one."""
        mine = list(range(start + worker, len(self), n_workers))
        if self.cache is not None:
            cached = (self._cached_batch(self.plan.batch(epoch, self.rank, k), ring)
                      for k in mine)
            # In a worker the DataLoader already keeps batches ahead; in-process, a thread
            # gathers the next batch while the consumer trains (the gathers release the GIL).
            depth = self.config.prefetch_pools if get_worker_info() is None else 0
            yield from prefetch(cached, depth)
            return
        pools = ramped_pools(mine, self.config.pool_batches)
        plans = ([self.plan.batch(epoch, self.rank, k) for k in pool] for pool in pools)
        reads = ((batches, self._read_pool(batches)) for batches in plans)
        for batches, pool in prefetch(reads, self.config.prefetch_pools):
            yield from self._batches_of_pool(batches, pool, ring)

    def _read_pool(self, batches: list[np.ndarray]) -> tuple[np.ndarray, sp.csr_matrix]:
        """One sorted read of every cell of the pool; columns in model gene order."""
        unique = np.unique(self.cells.cell_index[np.concatenate(batches)])
        rows = self.store.read_rows(unique)
        if self.gene_indices is not None:
            rows = rows[:, self.gene_indices]
        return unique, rows

    def _batches_of_pool(self, batches: list[np.ndarray], pool: tuple[np.ndarray,
                         sp.csr_matrix], ring: BufferRing | None) -> Iterator[Batch]:
        unique, rows = pool
        for positions in batches:
            counts = rows[np.searchsorted(unique, self.cells.cell_index[positions])]
            yield Batch(self._expression(counts, ring),
                        torch.from_numpy(self.cells.labels[positions]),
                        torch.from_numpy(self.cells.studies[positions]))

    def _cached_batch(self, positions: np.ndarray, ring: BufferRing | None) -> Batch:
        """Batch of ``positions`` gathered from the cache: rows ``cache_offset + positions``
        hold the same log-normalised values the TileDB path computes, in the same order."""
        rows = positions + self.cache_offset
        shape = (positions.size, self.n_genes)
        if self.config.output == "csr":
            rows, indptr = self.cache.row_pointers(rows)
            crow, col, values = _csr_buffers(rows.size, int(indptr[-1]), ring)
            crow.numpy()[:] = indptr
            self.cache.fill_csr(rows, indptr, col.numpy(), values.numpy())
            x = torch.sparse_csr_tensor(crow, col, values, size=shape)
        else:
            x, dirty = _dense(shape, ring)
            self.cache.gather_dense(rows, x.numpy(), clear=dirty)
        return Batch(x, torch.from_numpy(self.cells.labels[positions]),
                     torch.from_numpy(self.cells.studies[positions]))

    def _expression(self, counts: sp.csr_matrix, ring: BufferRing | None) -> torch.Tensor:
        """Counts → ``log1p(counts / row_sum * target_sum)`` (zero rows stay zero)."""
        values = lognormalize(counts, self.config.target_sum)
        if self.config.output == "csr":
            return torch.sparse_csr_tensor(
                torch.from_numpy(counts.indptr.astype(np.int64)),
                torch.from_numpy(counts.indices.astype(np.int64)),
                torch.from_numpy(values), size=counts.shape)
        dense, dirty = _dense(counts.shape, ring)
        if dirty:
            dense.zero_()
        sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape).toarray(
            out=dense.numpy())
        return dense


def check_cache(cache: TrainingCache, offset: int, cells: CellTable,
                gene_indices: np.ndarray | None, n_store_genes: int,
                config: StreamConfig) -> None:
    """Raise ValueError unless rows ``offset ..`` of ``cache`` are ``cells`` with the stream's
    genes and normalisation (a wrong offset or a cache of another selection would otherwise
    train on the wrong cells without a sound)."""
    genes = np.arange(n_store_genes) if gene_indices is None else gene_indices
    if offset < 0 or offset + len(cells) > cache.n_rows:
        raise ValueError(f"cache_offset {offset} + {len(cells)} cells overruns the "
                         f"{cache.n_rows} rows of {cache.path}")
    if not np.array_equal(cache.cell_index[offset:offset + len(cells)], cells.cell_index):
        raise ValueError(f"rows {offset}.. of the training cache {cache.path} are not this "
                         "stream's cells: pass the cache built for this selection and the "
                         "split's offset (0 for train, len(train) for validation)")
    if not np.array_equal(cache.gene_indices, genes):
        raise ValueError(f"the training cache {cache.path} holds other genes than the "
                         "stream's gene_indices: build it with the same gene order")
    if cache.target_sum != config.target_sum:
        raise ValueError(f"the training cache {cache.path} is normalised to target_sum "
                         f"{cache.target_sum}, the stream to {config.target_sum}")


def protect_inherited_objects() -> None:
    """In a forked worker, keep the garbage collector away from objects inherited from the
    parent: freeing a parent's TileDB object in the child segfaults (seen with tiledb 0.36)."""
    if multiprocessing.parent_process() is not None and not getattr(
            protect_inherited_objects, "done", False):
        gc.freeze()
        protect_inherited_objects.done = True


# Set in the DataLoader workers a CellStream starts itself (and only there).
_OWN_WORKER = False


def _worker_init(_: int) -> None:
    global _OWN_WORKER
    _OWN_WORKER = True
    protect_inherited_objects()


def _place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the number of ranks: as given, else torch.distributed's."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    return int(rank), int(world_size)


def cell_dataloader(stream: CellStream, num_workers: int = 2, *, pin_memory: bool = False,
                    multiprocessing_context: str | None = None) -> CellStream:
    """``stream`` loading with ``num_workers`` DataLoader workers, for use in your own loop.

    A :class:`CellStream` is its own loader: iterating it starts the workers, returns the
    batches in plan order and counts them, so ``state_dict()`` is right for resuming. Iterate
    what this returns wherever you would iterate a ``DataLoader`` (do not wrap a stream in a
    ``DataLoader`` with workers: it refuses, because nothing would count the batches).

    Returns:
        A copy of ``stream`` (same cells, plan, cache and position) with the loader settings.
    """
    loader = copy.copy(stream)
    loader.config = replace(stream.config, num_workers=num_workers, pin_memory=pin_memory,
                            multiprocessing_context=multiprocessing_context)
    loader.store = stream.store.with_config(reader_config(loader.config))
    return loader


def ramped_pools(batches: list[int], pool_batches: int) -> list[list[int]]:
    """Group a worker's batches into pools of 1, 2, 4, ... up to ``pool_batches`` batches.

    Large pools read faster per cell, but the first batch of an epoch waits for the whole
    first pool: ramping up keeps that wait at one batch's read.
    """
    pools, i, size = [], 0, 1
    while i < len(batches):
        pools.append(batches[i:i + size])
        i += size
        size = min(2 * size, pool_batches)
    return pools


def reader_config(config: StreamConfig) -> dict:
    """TileDB settings of the reading processes.

    With DataLoader workers, each worker reads with one TileDB thread: the workers are the
    parallelism (TileDB's own threads gain ~1.2x on 2 cores, two single-threaded workers ~2x).
    Result buffers start large enough for a pool, so a read is not resubmitted to grow them.
    TileDB's memory budget bounds the tiles one read decompresses at once: with CellArr's
    10,000-value tiles a random read of 16,000 cells would otherwise hold ~1.6 GB of tiles, and
    the smaller working set is also faster (benchmarks/loader_throughput.py, README).
    """
    settings: dict = {"py.init_buffer_bytes": 128 * 2**20,
                      "sm.mem.total_budget": config.tiledb_memory_mb * 2**20}
    threads = config.tiledb_threads
    if threads is None and config.num_workers > 0:
        threads = 1
    if threads is not None:
        settings.update({"sm.compute_concurrency_level": threads,
                         "sm.io_concurrency_level": threads})
    return {**settings, **config.tiledb_config}


def _dense(shape: tuple[int, int], ring: BufferRing | None) -> tuple[torch.Tensor, bool]:
    """A float32 batch buffer and whether it holds old values (reused from ``ring``) or
    zeros (fresh: in shared memory inside a worker)."""
    if ring is not None:
        return ring.take_dense(shape)
    return _zeros(shape, shared=get_worker_info() is not None), False


def _csr_buffers(n_rows: int, nnz: int, ring: BufferRing | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row pointers, column indices (int64) and values (float32) of a CSR batch to fill."""
    if ring is not None:
        return ring.take_csr(n_rows, nnz)
    return (torch.empty(n_rows + 1, dtype=torch.int64), torch.empty(nnz, dtype=torch.int64),
            torch.empty(nnz, dtype=torch.float32))


def _zeros(shape: tuple[int, int], shared: bool) -> torch.Tensor:
    """A zeroed float32 tensor; in a worker, made in shared memory so that handing it to the
    main process costs no copy (the DataLoader would otherwise copy it there)."""
    if not shared:
        return torch.zeros(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(shape[0] * shape[1] * 4)  # zero-filled pages
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def lognormalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> np.ndarray:
    """The CSR values of ``log1p(counts / row_sum * target_sum)``, float32, same structure."""
    lengths = np.diff(counts.indptr)
    sums = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    sums[sums == 0] = 1.0  # all-zero cells stay zero
    scale = (target_sum / sums).astype(np.float32)
    values = counts.data.astype(np.float32, copy=True)
    values *= np.repeat(scale, lengths)
    return np.log1p(values, out=values)
