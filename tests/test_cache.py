"""The training cache: bit-identical batches, keyed reuse, safe builds, list/remove."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import tiledb
import torch

from scimtrain.cache import CacheError, TrainingCache, list_caches, remove_caches
from scimtrain.cache.layout import BUILDING_PREFIX, MANIFEST, array_file
from scimtrain.cache.lock import is_locked
from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig, lognormalize
from scimtrain.writer import write_counts
from tests.conftest import TINY_FILTER

REPO = Path(__file__).resolve().parents[1]
VAL_STUDIES = ("study_04", "study_05")


@pytest.fixture(scope="module")
def selection(tiny_store):
    """Train and validation cells of the tiny store, genes reversed and thinned (a gene order
    that is neither the store's nor complete)."""
    store = CellArrStore(tiny_store)
    genes = list(store.gene_symbols[::-1][::2])
    return select_cells(store, SelectionConfig(filter_condition=TINY_FILTER, gene_order=genes,
                                               val_studies=VAL_STUDIES, val_min_studies=1))


def run_cells(selection) -> np.ndarray:
    return np.concatenate([selection.train.index.to_numpy(np.int64),
                           selection.val.index.to_numpy(np.int64)])


@pytest.fixture(scope="module")
def cache(tiny_store, selection, tmp_path_factory):
    """The cache of the selection (two build workers, small chunks: several chunks each)."""
    return TrainingCache.ensure(CellArrStore(tiny_store), run_cells(selection),
                                selection.gene_indices, tmp_path_factory.mktemp("cache"),
                                workers=2, chunk_cells=300, progress=False)


def quiet_ensure(store, cells, genes, cache_dir, **kwargs) -> TrainingCache:
    return TrainingCache.ensure(store, cells, genes, cache_dir, progress=False,
                                announce=lambda line: None, **kwargs)


def streams(store, selection, cache, split: str, rank: int = 0, world: int = 2, **knobs):
    """The TileDB stream and the cached stream of one split, same settings."""
    frame = selection.train if split == "train" else selection.val
    offset = 0 if split == "train" else len(selection.train)
    config = StreamConfig(**{"batch_size": 24, "n_batches": 5, "num_workers": 0,
                             "pool_batches": 2, **knobs})
    table = CellTable.from_frame(frame)
    return (CellStream(store, table, selection.gene_indices, config, rank, world),
            CellStream(store, table, selection.gene_indices, config, rank, world,
                       cache=cache, cache_offset=offset))


def identical(a: list, b: list) -> bool:
    """Same batches bit for bit: dense values, or CSR structure and values; labels, studies."""
    def parts(x: torch.Tensor) -> list[torch.Tensor]:
        if x.layout == torch.sparse_csr:
            return [x.crow_indices(), x.col_indices(), x.values()]
        return [x]

    return len(a) == len(b) > 0 and all(
        len(parts(x.x)) == len(parts(y.x)) and x.x.shape == y.x.shape
        and all(p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(parts(x.x), parts(y.x)))
        and torch.equal(x.labels, y.labels) and torch.equal(x.studies, y.studies)
        for x, y in zip(a, b))


# ------------------------------------------------------------------ same batches


@pytest.mark.parametrize("output", ["dense", "csr"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_cached_batches_equal_tiledb_batches_on_both_ranks(tiny_store, selection, cache,
                                                           output, split):
    for rank in range(2):
        tiledb_stream, cached = streams(tiny_store, selection, cache, split, rank,
                                        output=output)
        assert identical(list(cached), list(tiledb_stream)), (rank, split, output)


@pytest.mark.parametrize("output", ["dense", "csr"])
def test_cached_batches_with_workers_and_full_mode(tiny_store, selection, cache, output):
    tiledb_stream, _ = streams(tiny_store, selection, cache, "train", output=output,
                               mode="full")
    reference = list(tiledb_stream)
    _, cached = streams(tiny_store, selection, cache, "train", output=output, mode="full",
                        num_workers=2, prefetch_pools=1)
    assert identical(list(cached), reference)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_cached_stream_in_fork_and_spawn_workers(tiny_store, selection, cache, context):
    """Workers started either way map the cache themselves and give the TileDB batches."""
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from scimtrain.cache import TrainingCache
        from scimtrain.selection import SelectionConfig, select_cells
        from scimtrain.store import CellArrStore
        from scimtrain.stream import CellStream, CellTable, StreamConfig, lognormalize
        if __name__ == "__main__":
            store = CellArrStore({tiny_store!r})
            genes = list(store.gene_symbols[::-1][::2])
            sel = select_cells(store, SelectionConfig(
                filter_condition={TINY_FILTER!r}, gene_order=genes,
                val_studies={VAL_STUDIES!r}, val_min_studies=1))
            cache = TrainingCache.open({str(cache.path)!r})
            table = CellTable.from_frame(sel.train)
            make = lambda **kw: CellStream(store, table, sel.gene_indices, StreamConfig(
                batch_size=16, n_batches=4, num_workers=2,
                multiprocessing_context={context!r}), **kw)
            a, b = list(make()), list(make(cache=cache))
            same = all(torch.equal(x.x, y.x) and torch.equal(x.labels, y.labels)
                       for x, y in zip(a, b))
            print(len(a), len(b), same)
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "4 4 True"


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_with_the_cache(tiny_store, selection, cache, workers):
    _, full_stream = streams(tiny_store, selection, cache, "train", world=1)
    full = list(full_stream)
    _, stream = streams(tiny_store, selection, cache, "train", world=1, num_workers=workers)
    head = []
    for batch in stream:
        head.append(batch)
        if len(head) == 2:
            state = stream.state_dict()
            break
    _, resumed = streams(tiny_store, selection, cache, "train", world=1, num_workers=workers)
    resumed.load_state_dict(state)
    assert identical(head + list(resumed), full)


def test_cached_stream_reads_no_tiledb(tiny_store, selection, cache, monkeypatch):
    _, cached = streams(tiny_store, selection, cache, "train")
    monkeypatch.setattr(cached.store, "read_rows", lambda *a: pytest.fail("TileDB was read"))
    assert len(list(cached)) == 5


def test_stream_refuses_a_cache_of_other_cells_or_genes(tiny_store, selection, cache):
    store = CellArrStore(tiny_store)
    val = CellTable.from_frame(selection.val)
    config = StreamConfig(batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="not this stream's cells"):
        CellStream(store, val, selection.gene_indices, config, cache=cache, cache_offset=0)
    with pytest.raises(ValueError, match="other genes"):
        CellStream(store, val, None, config, cache=cache, cache_offset=len(selection.train))
    with pytest.raises(ValueError, match="overruns"):
        CellStream(store, val, selection.gene_indices, config, cache=cache,
                   cache_offset=cache.n_rows)


def test_rows_are_the_lognormalised_counts(tiny_store, selection, cache):
    store = CellArrStore(tiny_store)
    positions = np.array([5, 0, cache.n_rows - 1, 5])
    counts = store.read_rows(cache.cell_index[positions])[:, selection.gene_indices]
    got = cache.rows(positions)
    assert (got != sp.csr_matrix((lognormalize(counts), counts.indices, counts.indptr),
                                 shape=counts.shape)).nnz == 0
    assert cache.manifest["dtypes"]["indices"] == "uint8"  # 150 genes fit a byte
    with pytest.raises(IndexError, match="cache rows"):
        cache.rows(np.array([cache.n_rows]))


# ------------------------------------------------------------------ keyed reuse


def test_reused_when_the_key_matches_and_rebuilt_when_not(tiny_store, selection, tmp_path):
    store = CellArrStore(tiny_store)
    cells = run_cells(selection)
    first = quiet_ensure(store, cells, selection.gene_indices, tmp_path)
    built = first.manifest["created"], (first.path / MANIFEST).stat().st_mtime_ns
    again = quiet_ensure(store, cells, selection.gene_indices, tmp_path, workers=2)
    assert again.path == first.path
    assert (again.manifest["created"], (again.path / MANIFEST).stat().st_mtime_ns) == built
    fewer = quiet_ensure(store, cells[:-1], selection.gene_indices, tmp_path)
    other_genes = quiet_ensure(store, cells, selection.gene_indices[::-1], tmp_path)
    all_genes = quiet_ensure(store, cells, None, tmp_path)
    identity = quiet_ensure(store, cells, np.arange(store.n_genes), tmp_path)
    other_sum = quiet_ensure(store, cells, None, tmp_path, target_sum=1e6)
    keys = {c.key for c in (first, fewer, other_genes, all_genes, other_sum)}
    assert len(keys) == 5
    assert identity.key == all_genes.key  # the identity gene order is "all genes"
    assert len(list_caches(tmp_path)) == 5


@pytest.mark.parametrize("how", ["writer", "tiledb"])
def test_a_new_fragment_in_the_store_gives_a_new_cache(tiny_store, tmp_path, how):
    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    store = CellArrStore(str(copy))
    cells = np.arange(0, store.n_cells, 3)
    before = quiet_ensure(store, cells, None, tmp_path / "caches")
    counts = store.counts_uri
    if how == "writer":  # scimtrain's writer: cell 0 written again, as a new fragment
        write_counts(counts, [sp.csr_matrix(np.ones((1, store.n_genes)))], store.n_genes,
                     first_row=0)
    else:  # any TileDB write, here one changed count
        with tiledb.open(counts, "w") as arr:
            arr[np.array([0], np.uint32), np.array([0], np.uint32)] = np.array([5000],
                                                                                 np.uint16)
    after = quiet_ensure(CellArrStore(str(copy)), cells, None, tmp_path / "caches")
    assert after.key != before.key
    assert not np.array_equal(after.rows(np.array([0])).toarray(),
                              before.rows(np.array([0])).toarray())  # cell 0 changed


# ------------------------------------------------------------------ safe builds


def test_damaged_cache_is_detected_and_rebuilt_with_a_warning(tiny_store, selection,
                                                              tmp_path):
    store = CellArrStore(tiny_store)
    cells = run_cells(selection)
    cache = quiet_ensure(store, cells, selection.gene_indices, tmp_path)
    reference = cache.rows(np.arange(20)).toarray()
    values = array_file(cache.path, "values")
    values.write_bytes(values.read_bytes()[:-4])  # a truncated file
    with pytest.warns(UserWarning, match="damaged .*values.bin has"):
        rebuilt = quiet_ensure(store, cells, selection.gene_indices, tmp_path)
    assert np.array_equal(rebuilt.rows(np.arange(20)).toarray(), reference)
    array_file(cache.path, "indptr").write_bytes(b"\0" * values.stat().st_size)
    with pytest.warns(UserWarning, match="damaged"):
        quiet_ensure(store, cells, selection.gene_indices, tmp_path)
    (cache.path / MANIFEST).write_text("{ not json")
    with pytest.warns(UserWarning, match="missing or unreadable"):
        quiet_ensure(store, cells, selection.gene_indices, tmp_path)
    with pytest.raises(CacheError, match="not a usable training cache"):
        (cache.path / MANIFEST).unlink()
        TrainingCache.open(cache.path)


def test_an_exception_during_the_build_leaves_nothing(tiny_store, tmp_path, monkeypatch):
    store = CellArrStore(tiny_store)
    cells = np.arange(500)
    original = CellArrStore.read_rows
    calls = []

    def failing(self, idx):
        calls.append(1)
        if len(calls) == 4:  # the estimate reads twice, then chunks: fail the second chunk
            raise RuntimeError("disk on fire")
        return original(self, idx)

    monkeypatch.setattr(CellArrStore, "read_rows", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quiet_ensure(store, cells, None, tmp_path, workers=1, chunk_cells=100)
    assert list(tmp_path.iterdir()) == [tmp_path / ".locks"]
    monkeypatch.setattr(CellArrStore, "read_rows", original)
    assert quiet_ensure(store, cells, None, tmp_path).n_rows == 500


def test_a_killed_build_is_never_used(tiny_store, tmp_path):
    """kill -9 of a process mid-build: no cache under its key, the next run cleans up and
    builds a complete one."""
    code = textwrap.dedent(f"""
        import time, numpy as np
        from scimtrain.cache import TrainingCache
        from scimtrain.store import CellArrStore
        original = CellArrStore.read_rows
        def slow(self, idx):
            time.sleep(0.3)
            return original(self, idx)
        CellArrStore.read_rows = slow
        if __name__ == "__main__":
            TrainingCache.ensure(CellArrStore({tiny_store!r}), np.arange(3000), None,
                                 {str(tmp_path)!r}, workers=2, chunk_cells=100,
                                 progress=False, mp_context="fork")
    """)
    builder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f"{BUILDING_PREFIX}*/values.bin")):
        assert builder.poll() is None, builder.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(0.5)  # mid-build: a few chunks written
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    assert list_caches(tmp_path)[0]["status"] == "stale build"
    with pytest.raises(CacheError):
        TrainingCache.open(next(tmp_path.glob(f"{BUILDING_PREFIX}*")))
    other = tmp_path / f"{BUILDING_PREFIX}{'f' * 64}-1-dead"  # another key's dead build
    other.mkdir()
    store = CellArrStore(tiny_store)
    cache = quiet_ensure(store, np.arange(3000), None, tmp_path)  # waits for no one
    assert not list(tmp_path.glob(f"{BUILDING_PREFIX}*"))
    counts = store.read_rows(np.arange(3000))
    assert cache.nnz == counts.nnz
    assert np.array_equal(cache.rows(np.arange(3000)).data, lognormalize(counts))


def test_concurrent_ensures_build_once(tiny_store, tmp_path):
    """A second process asking for a cache that is being built says so, waits, and reuses
    the first one's cache."""
    release = tmp_path / "release"
    code = textwrap.dedent(f"""
        import os, time, numpy as np
        from scimtrain.cache import TrainingCache
        from scimtrain.store import CellArrStore
        original = CellArrStore.read_rows
        def held(self, idx):  # the build reads only once the test says so
            while not os.path.exists({str(release)!r}):
                time.sleep(0.02)
            return original(self, idx)
        CellArrStore.read_rows = held
        if __name__ == "__main__":
            print("START", flush=True)
            c = TrainingCache.ensure(CellArrStore({tiny_store!r}), np.arange(1000), None,
                                     {str(tmp_path / "caches")!r}, workers=1, progress=False)
            print("DONE", c.manifest["created"], c.path, flush=True)
    """)

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-u", "-W", "ignore", "-c", code], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start()
    watchdog = threading.Timer(200, lambda: [p.kill() for p in (first, second)])
    second = None
    watchdog.start()
    try:
        lock_files = tmp_path / "caches" / ".locks"
        while not (lock_files.is_dir() and any(is_locked(tmp_path / "caches", f.stem)
                                               for f in lock_files.iterdir())):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)
        second = start()
        assert second.stdout.readline().strip() == "START"
        waiting = second.stdout.readline()
        assert "is building" in waiting and "waiting for it" in waiting, waiting
        release.touch()
        outputs = [first.communicate()[0], second.communicate()[0]]
    finally:
        watchdog.cancel()
    assert first.returncode == second.returncode == 0, outputs
    done = [line for out in outputs for line in out.splitlines() if line.startswith("DONE")]
    assert len(done) == 2 and done[0] == done[1]
    assert "training cache: building" in outputs[0]
    assert "training cache: building" not in outputs[1]


def test_not_enough_disk_space_raises_with_needed_and_free(tiny_store, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CacheError, match=r"needs about .* but only 1.0 KB are free"):
        quiet_ensure(CellArrStore(tiny_store), np.arange(100), None, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != ".locks"]


def test_estimate_is_close(tiny_store, tmp_path):
    store = CellArrStore(tiny_store)
    cells = np.arange(0, store.n_cells, 2)
    size, seconds = TrainingCache.estimate(store, cells, None)
    cache = quiet_ensure(store, cells, None, tmp_path)
    actual = sum(cache.manifest["files"].values())
    assert 0.5 * actual < size < 2 * actual and seconds > 0


# ------------------------------------------------------------------ list and remove


def test_list_and_remove(tiny_store, tmp_path):
    store = CellArrStore(tiny_store)
    old = quiet_ensure(store, np.arange(50), None, tmp_path)
    new = quiet_ensure(store, np.arange(60), None, tmp_path)
    month_ago = time.time() - 30 * 86400
    os.utime(old.path / "last_used", (month_ago, month_ago))
    listed = list_caches(tmp_path)
    assert [entry["key"] for entry in listed] == [new.key, old.key]  # recent first
    assert listed[1]["n_rows"] == 50 and listed[1]["size"] > 0
    assert listed[1]["status"] == "ok" and listed[1]["store"] == os.path.realpath(tiny_store)
    assert remove_caches(tmp_path, older_than_days=7) == [old.path]
    with pytest.raises(ValueError, match="too short"):
        remove_caches(tmp_path, key="ab")
    assert remove_caches(tmp_path, key="0" * 64) == []
    assert remove_caches(tmp_path, key=new.key[:10]) == [new.path]
    assert list_caches(tmp_path) == []


def test_command_line_lists_and_removes(tiny_store, tmp_path):
    quiet_ensure(CellArrStore(tiny_store), np.arange(40), None, tmp_path)
    command = [sys.executable, str(REPO / "bin" / "scimtrain_cache.py")]
    listed = subprocess.run(command + ["--cache_dir", str(tmp_path), "list"],
                            capture_output=True, text=True, cwd=REPO)
    assert listed.returncode == 0 and "40" in listed.stdout, listed.stderr
    refused = subprocess.run(command + ["--cache_dir", str(tmp_path), "remove"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "--all" in refused.stderr
    removed = subprocess.run(command + ["--cache_dir", str(tmp_path), "remove", "--all"],
                             capture_output=True, text=True, cwd=REPO)
    assert removed.returncode == 0 and "removed 1" in removed.stdout, removed.stderr
    assert list_caches(tmp_path) == []


# ------------------------------------------------------------------ reused batch buffers


def test_a_worker_buffer_is_reused_only_after_the_consumer_let_go():
    from scimtrain.cache.buffers import SLOTS_PER_RING, BufferRing, make_flags, register

    flags = make_flags(2, shared=True)
    ring = BufferRing(flags, ring=1)  # the worker's side
    x, dirty = ring.take_dense((3, 4))
    assert not dirty and torch.count_nonzero(x) == 0
    x.fill_(7.0)
    # What the consuming process gets: its own mapping of the same shared memory.
    fd, size = x.untyped_storage()._share_fd_cpu_()
    received = torch.empty(0).set_(torch.UntypedStorage._new_shared_fd_cpu(fd, size), 0, (3, 4))
    del x
    register(received, flags)
    view = received[1:]
    weights = torch.ones(4, 2, requires_grad=True)
    out = (view @ weights).sum()  # autograd keeps view for the backward pass
    del received, view
    assert flags[SLOTS_PER_RING:].tolist()[0] == 1  # still readable through the graph
    out.backward()
    assert flags.tolist() == [0] * (2 * SLOTS_PER_RING)  # now free
    again, dirty = ring.take_dense((3, 4))
    assert dirty and (again == 7.0).all()  # the same memory, to be cleared by the filler


def test_in_process_buffers_are_reused_once_dropped_and_never_while_held():
    from scimtrain.cache.buffers import SLOTS_PER_RING, BufferRing

    ring = BufferRing()
    held = [ring.take_dense((2, 3))[0] for _ in range(SLOTS_PER_RING + 2)]
    pointers = {x.data_ptr() for x in held}
    assert len(pointers) == SLOTS_PER_RING + 2  # all held: all distinct
    del held
    first, _ = ring.take_dense((2, 3))
    second, dirty = ring.take_dense((2, 3))
    assert dirty and {first.data_ptr(), second.data_ptr()} <= pointers
    assert first.data_ptr() != second.data_ptr()


@pytest.mark.parametrize("output", ["dense", "csr"])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_dropped_as_they_come_are_still_exact(tiny_store, selection, cache, output,
                                                      workers):
    """A consumer that drops each batch (buffers get reused) sees the right values."""
    tiledb_stream, _ = streams(tiny_store, selection, cache, "train", world=1, output=output,
                               n_batches=12)
    reference = list(tiledb_stream)
    _, cached = streams(tiny_store, selection, cache, "train", world=1, output=output,
                        n_batches=12, num_workers=workers)
    copies, pointers = [], set()
    for batch in cached:
        x = batch.x
        pointers.add((x.values() if output == "csr" else x).data_ptr())
        copies.append(batch._replace(x=x.to_dense().clone() if output == "csr" else x.clone()))
        del batch, x
    assert identical(copies, [b._replace(x=b.x.to_dense()) for b in reference])
    if workers == 0:
        assert len(pointers) < 12  # buffers were reused


@pytest.mark.parametrize("output", ["dense", "csr"])
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_persistent_workers_reuse_their_buffers_across_epochs_exactly(tiny_store, selection,
                                                                     cache, context, output):
    """Three epochs on the same workers, each batch dropped as it comes (so the workers'
    buffers are refilled across the epoch boundaries): the TileDB batches of each epoch, and
    those of workers started for that epoch alone."""
    def dropped_as_they_come(stream) -> list:
        copies = []
        for batch in stream:
            x = batch.x.to_dense().clone() if output == "csr" else batch.x.clone()
            copies.append(batch._replace(x=x))
            del batch, x
        return copies

    knobs = {"world": 1, "output": output, "n_batches": 8}
    tiledb_stream, _ = streams(tiny_store, selection, cache, "train", **knobs)
    _, cached = streams(tiny_store, selection, cache, "train", num_workers=2,
                        multiprocessing_context=context, **knobs)
    pids = []
    for epoch in range(3):
        tiledb_stream.set_epoch(epoch)
        reference = [b._replace(x=b.x.to_dense()) for b in tiledb_stream]
        _, fresh = streams(tiny_store, selection, cache, "train", num_workers=2, **knobs)
        fresh.set_epoch(epoch)
        fresh_batches = dropped_as_they_come(fresh)
        fresh.close()
        cached.set_epoch(epoch)
        got = dropped_as_they_come(cached)
        pids.append(cached.worker_pids)
        assert identical(got, reference) and identical(got, fresh_batches), epoch
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    cached.load_state_dict({"epoch": 0, "consumed": 3})  # a jump: new workers, still exact
    tiledb_stream.set_epoch(0)
    reference = [b._replace(x=b.x.to_dense()) for b in tiledb_stream]
    assert identical(dropped_as_they_come(cached), reference[3:])
    assert not set(cached.worker_pids) & set(pids[0])
    cached.close()


def test_persistent_workers_refill_a_few_buffers_across_epochs(tiny_store, selection, cache,
                                                              monkeypatch):
    """90 dense batches over 3 epochs on the same (forked) workers, each dropped as it
    comes: the workers' rings make at most their slots' worth of buffers, not one a batch."""
    import multiprocessing

    from scimtrain.cache import buffers

    made = multiprocessing.get_context("fork").Value("i", 0)  # counted in the workers
    original = buffers._new_storage

    def counting(nbytes: int, shared: bool):
        with made.get_lock():
            made.value += 1
        return original(nbytes, shared)

    monkeypatch.setattr(buffers, "_new_storage", counting)
    _, cached = streams(tiny_store, selection, cache, "train", world=1, n_batches=30,
                        num_workers=2, multiprocessing_context="fork")
    pids = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        for batch in cached:
            del batch
        pids.add(cached.worker_pids)
    cached.close()
    assert len(pids) == 1
    assert 0 < made.value <= 2 * buffers.SLOTS_PER_RING
