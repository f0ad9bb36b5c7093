"""Batch buffers that are reused once the consumer has let go of them.

A dense batch of 1,000 x 28,000 float32 is 112 MB; a CSR batch of it ~28 MB. Made fresh for
every batch, their pages are faulted in one by one (and, out of a DataLoader worker, copied
into shared memory once more): measured on a 2-core VM, ~100 CPU-ms per dense batch and ~40
per CSR batch, more than the gather itself. So each reading process keeps a few buffers (in
shared memory in a DataLoader worker, where the batch then travels without a copy) and fills
them again once the consumer is done with them.

"Done" is known exactly: the consuming process registers each batch it receives
(:func:`register`), which puts finalizers on the batch's storages. torch keeps a storage's
Python object alive as long as any tensor, view or autograd graph uses the storage, so the
finalizers run only when nothing can read the batch any more; the last of them marks the
buffer free in a small shared flag array that the filling process polls. A batch that is never
registered, or a consumer that keeps every batch, only means fresh buffers: reuse never
overwrites a batch that can still be read.

Each buffer carries its identity after the batch's last part (a magic number and its slot),
so the consuming process needs nothing besides the batch to register it.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

MAGIC = 0x5C1B_0FFE_12  # marks a storage made by a ring (vs a copy, e.g. a pinned one)
# Buffers per filling process. In flight at once, out of a DataLoader worker: 2 queued, 1 being
# filled, 1 held by the consumer (its loop variable holds batch k while k + 1 is fetched); in
# process, with a prefetch thread, ~5. More in flight fall back to fresh buffers.
SLOTS_PER_RING = 6
_TAIL = 2  # int64 entries after the last part: MAGIC, slot
# A storage's reference count (torch-internal; without it, in-process buffers are not reused).
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)

Part = tuple[int, torch.dtype]  # (elements, dtype) of one tensor of a batch


def make_flags(n_rings: int, shared: bool) -> torch.Tensor:
    """The free/in-use flags of ``n_rings`` rings (0 free, 1 in use), shared between processes
    when ``shared`` (create it before the DataLoader starts its workers)."""
    flags = torch.zeros(n_rings * SLOTS_PER_RING, dtype=torch.int32)
    return flags.share_memory_() if shared else flags


class BufferRing:
    """The buffers of one filling process.

    Args:
        flags: from :func:`make_flags`, for a DataLoader worker: buffers in shared memory,
            freed by the consuming process (:func:`register`). None: the consumer is this
            process; buffers in private memory, free when no tensor but the ring's own uses
            them (torch's use count of the storage).
        ring: this worker's ring in ``flags`` (its DataLoader worker id).
    """

    def __init__(self, flags: torch.Tensor | None = None, ring: int = 0) -> None:
        self.shared = flags is not None
        self.flags = flags.numpy() if flags is not None else np.zeros(SLOTS_PER_RING, np.int32)
        self.first = ring * SLOTS_PER_RING
        if self.first + SLOTS_PER_RING > self.flags.size:
            raise ValueError(f"ring {ring} is outside the {self.flags.size} flags")
        self.slots: list[list[torch.UntypedStorage] | None] = [None] * SLOTS_PER_RING

    def take(self, parts: list[Part], spare: float = 1.0) -> tuple[list[torch.Tensor], bool]:
        """1-D tensors of the given sizes and dtypes to fill, and whether they hold old values
        (True: a reused buffer; False: fresh, all zeros). A new buffer is made ``spare`` times
        the size asked, so that later, larger batches fit it too."""
        sizes = [_nbytes(part, last=i == len(parts) - 1) for i, part in enumerate(parts)]
        free = [slot for slot in range(SLOTS_PER_RING) if self._free(slot)]
        # A free buffer that already exists, else a new one: as few buffers as are in flight.
        made = [slot for slot in free if self.slots[slot] is not None]
        if made or free:
            slot = (made or free)[0]
            storages, dirty = self.slots[slot], True
            if storages is None or any(s.nbytes() < n for s, n in zip(storages, sizes)):
                storages = [_new_storage(int(n * spare), self.shared) for n in sizes]
                self.slots[slot], dirty = storages, False
            self.flags[self.first + slot] = 1
            return _views(storages, parts, self.first + slot), dirty
        # every buffer is still in use: a fresh one, not part of the ring
        storages = [_new_storage(n, self.shared) for n in sizes]
        return _views(storages, parts, -1), False

    def _free(self, slot: int) -> bool:
        if self.shared:
            return self.flags[self.first + slot] == 0
        storages = self.slots[slot]
        # 1: only the ring's own storage object; a tensor, view or autograd graph adds one.
        return storages is None or (_USE_COUNT is not None and all(
            _USE_COUNT(storage._cdata) == 1 for storage in storages))

    def take_dense(self, shape: tuple[int, int]) -> tuple[torch.Tensor, bool]:
        """A float32 tensor of ``shape`` and whether it holds old values (see :meth:`take`)."""
        (flat,), dirty = self.take([(shape[0] * shape[1], torch.float32)])
        return flat.view(shape), dirty

    def take_csr(self, n_rows: int, nnz: int) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
        """Row pointers (int64, ``n_rows + 1``), column indices (int64, ``nnz``) and values
        (float32, ``nnz``) to fill; a new buffer has a quarter more room (``nnz`` varies)."""
        parts, _ = self.take([(n_rows + 1, torch.int64), (nnz, torch.int64),
                              (nnz, torch.float32)], spare=1.25)
        return parts[0], parts[1], parts[2]


def register(x: torch.Tensor, flags: torch.Tensor) -> None:
    """In the consuming process: mark ``x``'s buffer free in ``flags`` once nothing uses it.
    ``x`` is a dense or CSR batch; tensors that are not ring buffers (a pinned copy, a batch
    from elsewhere) are left alone."""
    if x.layout == torch.sparse_csr:
        parts = [x.crow_indices(), x.col_indices(), x.values()]
    elif x.layout == torch.strided:
        parts = [x]
    else:
        return
    last = parts[-1]
    storage = last.untyped_storage()
    offset = _tail_offset(last.numel(), last.element_size())
    if last.storage_offset() != 0 or storage.nbytes() < (offset + _TAIL) * 8:
        return
    tail = torch.empty(0, dtype=torch.int64).set_(storage, offset, (_TAIL,)).tolist()
    if tail[0] != MAGIC or not 0 <= tail[1] < flags.numel():
        return
    countdown = _Countdown(len(parts), flags.numpy(), tail[1])
    for part in parts:
        weakref.finalize(part.untyped_storage(), countdown)


class _Countdown:
    """Frees a slot when its last storage is finalized."""

    def __init__(self, n: int, flags: np.ndarray, slot: int) -> None:
        self.n, self.flags, self.slot = n, flags, slot

    def __call__(self) -> None:
        self.n -= 1
        if self.n == 0:
            self.flags[self.slot] = 0


def _tail_offset(n: int, itemsize: int) -> int:
    """Where the tail starts, in int64 units: after ``n`` items, rounded up to 8 bytes."""
    return (n * itemsize + 7) // 8


def _nbytes(part: Part, last: bool) -> int:
    n, dtype = part
    size = _tail_offset(n, torch.empty(0, dtype=dtype).element_size()) * 8
    return size + _TAIL * 8 if last else size


def _new_storage(nbytes: int, shared: bool) -> torch.UntypedStorage:
    nbytes = max(8, (nbytes + 7) // 8 * 8)
    if shared:
        return torch.UntypedStorage._new_shared(nbytes)  # zero-filled pages
    return torch.zeros(nbytes, dtype=torch.uint8).untyped_storage()


def _views(storages: list[torch.UntypedStorage], parts: list[Part],
           slot: int) -> list[torch.Tensor]:
    """1-D views of the parts over ``storages``, the identity tail written after the last."""
    views = [torch.empty(0, dtype=dtype).set_(storage, 0, (n,))
             for storage, (n, dtype) in zip(storages, parts)]
    last = views[-1]
    offset = _tail_offset(last.numel(), last.element_size())
    tail = torch.empty(0, dtype=torch.int64).set_(storages[-1], offset, (_TAIL,))
    tail[0], tail[1] = MAGIC, slot
    return views
