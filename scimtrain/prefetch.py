"""Run an iterator ahead of its consumer in a background thread, with a bounded buffer.

Reading the next TileDB pool (or simulating the next chunk of a synthetic store) while the
current one is used overlaps I/O and decompression, which release the GIL, with the
consumer's work.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while a thread computes up to ``depth`` items ahead.

    ``depth=0`` iterates in the caller's thread. An exception raised while producing an item
    is raised to the consumer at that item. If the consumer stops early, the thread stops after
    the item it is working on.
    """
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        """Hand an entry to the consumer unless it has gone; False when it has."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_DONE, exc))

    thread = threading.Thread(target=produce, name="scimtrain-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
