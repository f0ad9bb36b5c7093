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
itself. Its workers make one endless sequence of *global* batches ``g = epoch * len + k`` from
the position ``g0`` they were started at: worker ``w`` makes the ``g`` with ``g - g0 = w``
(mod ``num_workers``), which is exactly the order the DataLoader returns them in (item ``j``
from worker ``j % num_workers``), so the batches are the same for any number of workers. Each
worker pools *its own* batches, never across an epoch boundary.

The workers persist across epochs (starting them costs ~0.2 s with fork, seconds with spawn):
an iteration that asks for exactly the batch the live workers hand out next (epoch ``e + 1``
from batch 0 after epoch ``e`` was consumed to its end, or the rest of an epoch left early)
reuses them; any other position (``load_state_dict``, ``set_epoch`` skipping epochs, an epoch
left early and then another one, a changed config or plan) shuts them down and starts fresh
ones there. :meth:`CellStream.close` (the Trainer calls it at the end of ``fit``), garbage
collection and an exit handler stop them. Memory: live workers keep their batch buffers and
the DataLoader's queue (``2 * num_workers`` finished batches of the next epoch) between
epochs and after the last one until they are stopped. Only a plan whose batches are a pure
function of (seed, epoch, rank, k) (:class:`~scimtrain.sampling.SamplingPlan`) lets workers
run on: a plan with state carried between epochs (dynamic weights) is prepared in the
training process before each epoch, so its workers restart every epoch.

Ranks: each rank builds a stream with its ``rank`` and ``world_size`` and reads only its own
batches; all ranks yield the same number.

State: ``state_dict()`` is ``{"epoch", "consumed"}`` as counted in the iterating process;
``load_state_dict`` followed by iteration yields batch ``consumed``, ``consumed + 1``, ... of
that epoch without reading the ones before.
"""

from __future__ import annotations

import atexit
import copy
import gc
import multiprocessing
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Literal, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scimtrain.cache.buffers import BufferRing, make_flags, register
from scimtrain.prefetch import prefetch
from scimtrain.sampling import Mode, SamplingPlan
from scimtrain.signals import ignore_preemption
from scimtrain.source import CellSource
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
    """Batches of one rank's epoch, read in pools from a cell source (or gathered from its
    training cache).

    Args:
        store: the :class:`~scimtrain.source.CellSource` (a string: a CellArr store's URI).
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

    def __init__(self, store: CellSource | str, cells: CellTable,
                 gene_indices: np.ndarray | None = None, config: StreamConfig = StreamConfig(),
                 rank: int | None = None, world_size: int | None = None, *,
                 cache: TrainingCache | None = None, cache_offset: int = 0) -> None:
        super().__init__()
        rank, world_size = _place(rank, world_size)
        if not isinstance(store, CellSource):
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
        self._flags: torch.Tensor | None = None  # batch buffers' flags, set per worker start
        # Where started workers begin (global batch) and whether they run on past its epoch.
        self._feed: tuple[int, bool] = (0, False)
        self._workers: _Workers | None = None  # the live loader workers (main process only)
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
        # A jump: the state may carry more than a position (a dynamic plan's weights).
        self.close()

    # ------------------------------------------------------------------ workers

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the live loader workers (empty when none run)."""
        workers = self._workers
        if workers is None:
            return ()
        return tuple(p.pid for p in getattr(workers.iterator, "_workers", []))

    def close(self, drain: bool = True) -> None:
        """Stop this stream's loader workers, if any run; the next iteration starts fresh
        ones. Safe to call more than once. ``drain=False`` stops them without first receiving
        the batches they are sending (see :meth:`_Workers.close`)."""
        workers, self._workers = self.__dict__.get("_workers"), None
        if _LIVE is not None:
            _LIVE.discard(self)
        if workers is not None:
            workers.close(drain)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone; workers are daemons
            pass

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned workers, copies) without the live workers: they belong to the
        process that started them."""
        state = dict(self.__dict__)
        state["_workers"] = None
        return state

    def _workers_persist(self) -> bool:
        """Whether workers may run on into the next epochs: only when they can draw any
        epoch's batches themselves, i.e. the static plan (a pure function of seed, epoch, rank
        and k). A plan carrying state between epochs (DynamicSamplingPlan) is prepared in this
        process before each epoch's workers start, so those restart every epoch."""
        return isinstance(self.plan, SamplingPlan)

    def _source(self) -> tuple:
        """What started workers have copied: running ones are reused only while it is the
        same (config and place by value, the other parts by identity)."""
        return ((self.config, self.rank, self.world_size, self.cache_offset),
                (self.plan, self.cache, self.cells, self.store, self.gene_indices))

    def _matches(self, workers: _Workers, start: int) -> bool:
        values, objects = self._source()
        return workers.next == start and workers.source[0] == values and all(
            a is b for a, b in zip(workers.source[1], objects))

    def _start_workers(self, start: int, persist: bool) -> _Workers:
        """A DataLoader over this stream whose workers begin at global batch ``start``."""
        self.close()
        # Batch buffers are reused once this process lets go of them (cached CSR and any
        # dense batches; TileDB's CSR batches are made from the arrays its read returns).
        # Pinning copies each batch out of its buffer first: nothing to reuse then.
        reuse = self.config.output == "dense" or self.cache is not None
        flags = make_flags(self.config.num_workers, shared=True) \
            if reuse and not self.config.pin_memory else None
        self._flags = flags  # reaches the workers with the stream itself, as does _feed
        self._feed = (start, persist)
        # TileDB objects waiting in reference cycles are freed here, in their own process:
        # a forked worker's garbage collector freeing them would segfault.
        gc.collect()
        feed = _Feed(self)
        iterator = iter(DataLoader(
            feed, batch_size=None, num_workers=self.config.num_workers,
            multiprocessing_context=self.config.multiprocessing_context,
            # Finished batches waiting per worker: dense ones are large (B x G float32).
            pin_memory=self.config.pin_memory, prefetch_factor=2,
            worker_init_fn=_worker_init,
            # The workers' base seed comes from this generator, not from torch's global
            # one, which dropout also draws from: starting workers (as a resumed epoch
            # does once more) must not shift the training's random stream.
            generator=torch.Generator().manual_seed(
                hash((self.config.seed, self.epoch, self.rank)) & (2**63 - 1))))
        feed.stream = None  # every worker has its copy now (forked or pickled at its start)
        self._workers = _Workers(iterator, flags, start, self._source())
        _LIVE.add(self)
        return self._workers

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
            start, endless = self._feed
            yield from self._produce(
                worker_epochs(start, len(self), info.id, info.num_workers, endless), ring)
            return
        if self.consumed >= len(self):  # a finished epoch iterates again from the start
            self.consumed = 0
        if self.consumed >= len(self):  # no batches at all
            return
        start = self.epoch * len(self) + self.consumed
        if self.config.num_workers == 0:
            self.close()  # workers of an earlier config, if any
            reuse = self.config.output == "dense" or self.cache is not None
            source = self._produce(worker_epochs(start, len(self), 0, 1, False),
                                   BufferRing() if reuse else None)
            for batch in source:
                # Counted before handing out, so a state_dict() taken while the consumer
                # holds batch k says "k + 1 consumed".
                self.consumed += 1
                yield batch
                del batch  # not held here while the next is made: its buffer can be reused
            return
        persist = self._workers_persist()
        workers = self._workers
        if workers is None or not self._matches(workers, start):
            workers = self._start_workers(start, persist)
        token = workers.owner = object()
        for _ in range(len(self) - self.consumed):
            if self._workers is not workers or workers.owner is not token:
                return  # a later iteration took these workers over, or they were closed
            try:
                batch = next(workers.iterator)
            except Exception:
                self.close()  # a worker failed: start afresh
                raise
            except BaseException:
                # Interrupted (Ctrl-C) mid-fetch, perhaps mid-handshake with a worker's
                # fd-sharing thread, which then waits on that connection for good: receiving
                # more batches from it would hang, so stop the workers as they are.
                self.close(drain=False)
                raise
            workers.next += 1
            if workers.flags is not None:
                register(batch.x, workers.flags)
            self.consumed += 1  # before handing out, as above
            yield batch
            del batch
        if not persist:
            self.close()

    def _produce(self, epochs: Iterator[tuple[int, list[int]]],
                 ring: BufferRing | None) -> Iterator[Batch]:
        """The batches ``(epoch, [k, ...])`` of ``epochs`` (see :func:`worker_epochs`), in
        order: read pool by pool from TileDB, or gathered batch by batch from the cache.
        Dense batches go into ``ring``'s buffers when there is one."""
        if self.cache is not None:
            cached = (self._cached_batch(self.plan.batch(epoch, self.rank, k), ring)
                      for epoch, ks in epochs for k in ks)
            # In a worker the DataLoader already keeps batches ahead; in-process, a thread
            # gathers the next batch while the consumer trains (the gathers release the GIL).
            depth = self.config.prefetch_pools if get_worker_info() is None else 0
            yield from prefetch(cached, depth)
            return
        pools = epoch_pools(epochs, self.config.pool_batches)
        plans = ([self.plan.batch(epoch, self.rank, k) for k in pool] for epoch, pool in pools)
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
# Streams with live workers, stopped at exit before torch's and multiprocessing's own exit
# handlers run (registered after them, so run before them).
_LIVE: weakref.WeakSet | None = weakref.WeakSet()


class _Feed(IterableDataset):
    """What a stream's own DataLoader iterates: the stream, in each worker.

    The starting process drops its reference once the workers have their copies, so that
    stream -> workers -> DataLoader iterator does not lead back to the stream: in such a cycle
    a dropped stream would be left to the garbage collector, which finalizes the DataLoader's
    queues before the stream, so its workers never hear "stop" and are killed after timeouts.
    """

    def __init__(self, stream: CellStream) -> None:
        super().__init__()
        self.stream: CellStream | None = stream

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.stream)


class _Workers:
    """A stream's running DataLoader iterator and what it hands out next.

    ``next``: the global batch (``epoch * len + k``) the iterator returns next; ``source``:
    what the workers copied (:meth:`CellStream._source`); ``owner``: the iteration that
    consumes it now; ``pid``: the process that started them (only it may stop them: a forked
    child holds a copy of this object too).
    """

    def __init__(self, iterator: Any, flags: torch.Tensor | None, start: int,
                 source: tuple) -> None:
        self.iterator, self.flags, self.next, self.source = iterator, flags, start, source
        self.owner: object | None = None
        self.pid = os.getpid()

    def close(self, drain: bool = True) -> None:
        """Stop the workers (in the process that started them only), after receiving the
        batches they were asked for when ``drain``. A worker that fails while stopping costs
        nothing handed out: it is reported as a warning, not raised."""
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if self.pid != os.getpid() or shutdown is None:
            return
        try:
            try:
                if drain:
                    _collect_outstanding(self.iterator)
            finally:
                shutdown()
        except RuntimeError as exc:  # torch's report of a worker that died while stopping
            warnings.warn(f"a loader worker failed while being stopped: {exc}", stacklevel=2)
        for process in getattr(self.iterator, "_workers", []):
            if process.is_alive():  # stuck, and deaf to torch's SIGTERM (see _worker_init)
                process.kill()
                process.join(timeout=5)


def _collect_outstanding(iterator: Any) -> None:
    """Receive (and drop) the batches the workers were already asked for, asking for no more,
    so that no worker is still sending one when it is stopped: a spawned worker whose
    interpreter ends under its queue's sending thread aborts ("terminate called without an
    active exception", seen once in ~6 closes on spawn). Uses the DataLoader iterator's
    internals; without them (another torch) the workers are stopped as they are."""
    get = getattr(iterator, "_try_get_data", None)
    if get is None or getattr(iterator, "_shutdown", True):  # stopped already (or no access)
        return
    while getattr(iterator, "_tasks_outstanding", 0) > 0:
        received, _ = get()
        if not received:  # nothing within torch's status interval: stop them as they are
            return
        iterator._tasks_outstanding -= 1


def _close_live_streams() -> None:
    for stream in list(_LIVE or ()):
        stream.close()


atexit.register(_close_live_streams)


def _worker_init(_: int) -> None:
    global _OWN_WORKER
    _OWN_WORKER = True
    ignore_preemption()  # a job-wide SIGTERM is the training process's to handle
    protect_inherited_objects()
    sys.excepthook = _quiet_when_the_consumer_left(sys.excepthook)


def _quiet_when_the_consumer_left(hook):
    """A worker's error hook that says nothing when the training process went away mid-handover
    (Ctrl-C): multiprocessing's fd-sharing thread reports that through ``sys.excepthook``, which
    would print a traceback after the one-line message the user got."""

    def hook_(kind, value, traceback):
        if not issubclass(kind, (ConnectionResetError, BrokenPipeError, EOFError)):
            hook(kind, value, traceback)

    return hook_


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


def worker_epochs(start: int, n_batches: int, worker: int, n_workers: int,
                  endless: bool) -> Iterator[tuple[int, list[int]]]:
    """One worker's batches, epoch by epoch: ``(epoch, [k, ...])``.

    The workers of a DataLoader started at global batch ``start`` (``epoch * n_batches + k``)
    share the global batches ``start, start + 1, ...`` round robin: worker ``worker`` of
    ``n_workers`` makes those ``g`` with ``g - start = worker`` (mod ``n_workers``), the order
    the DataLoader returns them in. Only ``start``'s epoch unless ``endless``; an epoch where
    the worker has no batch is skipped.
    """
    if n_batches < 1:
        return
    g, epoch = start + worker, start // n_batches
    while endless or epoch == start // n_batches:
        first = epoch * n_batches
        if g < first + n_batches:
            ks = list(range(g - first, n_batches, n_workers))
            yield epoch, ks
            g = first + ks[-1] + n_workers
        epoch += 1


def epoch_pools(epochs: Iterator[tuple[int, list[int]]], pool_batches: int
                ) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, pool)`` for each pool of the epochs' batches; a pool never spans two
    epochs. The first epoch's pools ramp up (:func:`ramped_pools`); later ones are read while
    the epoch before is served, so they are full-size from the start."""
    for i, (epoch, ks) in enumerate(epochs):
        pools = ramped_pools(ks, pool_batches) if i == 0 else \
            [ks[j:j + pool_batches] for j in range(0, len(ks), pool_batches)]
        for pool in pools:
            yield epoch, pool


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
