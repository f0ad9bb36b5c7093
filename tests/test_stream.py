"""The sampling plan and the streaming loader."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from scimtrain.sampling import SamplingError, SamplingPlan
from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore, StoreError
from scimtrain.stream import CellStream, CellTable, StreamConfig, lognormalize
from tests.conftest import TINY_FILTER, hand_store, random_counts

# ------------------------------------------------------------------ sampling plan


def test_batches_are_distinct_and_deterministic():
    w = np.random.default_rng(0).lognormal(size=5000)
    plan = SamplingPlan(w, batch_size=300, n_batches=20, seed=3)
    batches = plan.epoch(0)
    assert len(batches) == 20
    assert all(len(np.unique(b)) == 300 for b in batches)
    again = SamplingPlan(w, batch_size=300, n_batches=20, seed=3).epoch(0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(plan.batch(1, 0, 0), batches[0])  # epochs differ
    two = SamplingPlan(w, batch_size=300, n_batches=20, seed=3, world_size=2)
    assert not np.array_equal(two.batch(0, 1, 0), two.batch(0, 0, 0))  # ranks differ


@pytest.mark.parametrize("n_cells", [40, 3000])  # Gumbel top-k path, rejection path
def test_first_draw_follows_the_weights(n_cells):
    """The first cell of a batch is drawn with probability w / sum(w) (chi-square)."""
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 5.0, size=n_cells)
    b = 30 if n_cells == 40 else 5
    plan = SamplingPlan(w, batch_size=b, n_batches=1, seed=0)
    assert plan._use_topk == (n_cells == 40)
    n = 8000 if n_cells == 40 else 30000
    groups = np.minimum(np.arange(n_cells) * 20 // n_cells, 19)  # 20 bins of cells
    first = np.array([plan.batch(e, 0, 0)[0] for e in range(n)])
    observed = np.bincount(groups[first], minlength=20)
    expected = np.bincount(groups, weights=w, minlength=20) / w.sum() * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_inclusion_matches_successive_sampling():
    """Inclusion frequencies equal numpy's choice(replace=False, p) (SCimilarity's sampler),
    and are proportional to the weights when a batch is a small share of the cells."""
    rng = np.random.default_rng(2)
    w = np.repeat([1.0, 2.0, 4.0, 8.0], 25)  # 100 cells in 4 weight classes
    plan = SamplingPlan(w, batch_size=20, n_batches=1, seed=5)
    ours = np.bincount(np.concatenate([plan.batch(e, 0, 0) for e in range(4000)]),
                       minlength=100)
    numpy = np.bincount(np.concatenate(
        [rng.choice(100, 20, replace=False, p=w / w.sum()) for _ in range(4000)]), minlength=100)
    classes = np.repeat(np.arange(4), 25)
    ours_c, numpy_c = np.bincount(classes, ours), np.bincount(classes, numpy)
    assert stats.chi2_contingency(np.stack([ours_c, numpy_c])).pvalue > 1e-3
    big = np.tile(w, 50)  # 5000 cells: 20 per batch is a small share
    plan = SamplingPlan(big, batch_size=20, n_batches=1, seed=5)
    counts = np.bincount(np.concatenate([plan.batch(e, 0, 0) for e in range(3000)]),
                         minlength=big.size)
    per_class = np.bincount(np.tile(classes, 50), counts)
    expected = np.bincount(np.tile(classes, 50), big) / big.sum() * counts.sum()
    assert stats.chisquare(per_class, expected).pvalue > 1e-3


def test_full_mode_visits_every_cell_once_with_equal_batches_per_rank():
    plan = SamplingPlan(np.ones(1003), batch_size=100, mode="full", seed=1, world_size=3)
    per_rank = [plan.epoch(4, r) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(1003))
    assert max(len(b) for batches in per_rank for b in batches) <= 100
    assert not np.array_equal(plan.epoch(5, 0)[0], per_rank[0][0])


@pytest.mark.parametrize("weights, match", [
    (np.array([1.0, 0.0, 2.0]), "zero, negative or not finite"),
    (np.array([1.0, -1.0, 2.0]), "zero, negative or not finite"),
    (np.array([1.0, np.nan, 2.0]), "zero, negative or not finite"),
    (np.array([]), "selection is empty"),
])
def test_bad_weights(weights, match):
    with pytest.raises(SamplingError, match=match):
        SamplingPlan(weights, batch_size=1)


def test_batch_larger_than_selection():
    with pytest.raises(SamplingError, match="batch_size 10 is larger than the 3 selected cells"):
        SamplingPlan(np.ones(3), batch_size=10)


# ------------------------------------------------------------------ the stream


@pytest.fixture(scope="module")
def tiny_selection(tiny_store):
    return select_cells(CellArrStore(tiny_store), SelectionConfig(filter_condition=TINY_FILTER))


def make_stream(store, selection, **knobs) -> CellStream:
    config = StreamConfig(**{"batch_size": 64, "n_batches": 9, "num_workers": 0,
                             "pool_batches": 2, **knobs})
    return CellStream(store, CellTable.from_frame(selection.train), selection.gene_indices,
                      config)


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.x, y.x) and torch.equal(x.labels, y.labels)
        and torch.equal(x.studies, y.studies) for x, y in zip(a, b))


def test_workers_and_pool_sizes_give_the_same_batches(tiny_store, tiny_selection):
    reference = list(make_stream(tiny_store, tiny_selection))
    assert len(reference) == 9 and reference[0].x.shape == (64, 300)
    for workers, pool in [(0, 1), (0, 8), (1, 3), (2, 1), (2, 4)]:
        got = list(make_stream(tiny_store, tiny_selection, num_workers=workers,
                               pool_batches=pool, prefetch_pools=workers % 2))
        assert same(got, reference), (workers, pool)


def test_expression_is_lognormalised_counts_in_gene_order(tmp_path):
    counts = random_counts(60, 20, seed=11)  # every 7th cell has no counts
    cells = pd.DataFrame({"cellTypeOntologyID": "CL:0000236", "datasetID": "s",
                          "sampleID": "a", "total_counts": 1.0, "n_genes_by_counts": 1,
                          "pct_counts_mt": 0.0, "predicted_doublets": 0}, index=range(60))
    store = CellArrStore(hand_store(tmp_path / "s", cells, counts))
    table = CellTable(cell_index=np.arange(60), labels=np.arange(60) % 3,
                      studies=np.zeros(60, dtype=np.int64), weights=np.ones(60))
    genes = np.array([7, 3, 19, 0, 12])
    stream = CellStream(store, table, genes, StreamConfig(batch_size=20, n_batches=3,
                                                          num_workers=0, pool_batches=2))
    for k, batch in enumerate(stream):
        positions = stream.plan.batch(0, 0, k)
        raw = store.read_rows(table.cell_index[positions]).toarray()[:, genes]
        sums = raw.sum(axis=1, keepdims=True)
        expected = np.log1p(np.divide(raw * 1e4, sums, out=np.zeros_like(raw), where=sums > 0))
        np.testing.assert_allclose(batch.x.numpy(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(batch.labels, torch.from_numpy(table.labels[positions]))
        zero = (raw.sum(axis=1) == 0)
        assert (batch.x.numpy()[zero] == 0).all()
    assert zero.any() or True  # some batches hold all-zero cells (every 7th cell)


def test_lognormalize_zero_rows():
    import scipy.sparse as sp
    m = sp.csr_matrix(np.array([[0, 0], [1, 3], [0, 0]], dtype=np.float32))
    np.testing.assert_allclose(lognormalize(m, 4.0), np.log1p([1.0, 3.0]))


def test_csr_output_equals_dense(tiny_store, tiny_selection):
    dense = list(make_stream(tiny_store, tiny_selection, n_batches=3))
    sparse = list(make_stream(tiny_store, tiny_selection, n_batches=3, output="csr"))
    for d, s in zip(dense, sparse):
        assert s.x.layout == torch.sparse_csr
        assert torch.equal(s.x.to_dense(), d.x)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(tiny_store, tiny_selection, workers):
    full = list(make_stream(tiny_store, tiny_selection))
    stream = make_stream(tiny_store, tiny_selection, num_workers=workers)
    head = []
    for batch in stream:
        head.append(batch)
        if len(head) == 4:
            state = stream.state_dict()
            break
    assert state["consumed"] == 4
    resumed = make_stream(tiny_store, tiny_selection, num_workers=workers)
    resumed.load_state_dict(state)
    assert same(head + list(resumed), full)


def test_resume_does_not_read_skipped_batches(tiny_store, tiny_selection, monkeypatch):
    stream = make_stream(tiny_store, tiny_selection, pool_batches=1)
    stream.load_state_dict({"epoch": 0, "consumed": 7})
    read = []
    original = stream.store.read_rows
    monkeypatch.setattr(stream.store, "read_rows", lambda idx: read.append(len(idx)) or
                        original(idx))
    assert len(list(stream)) == 2
    assert len(read) == 2  # batches 7 and 8 only


def test_epochs_ranks_and_state_checks(tiny_store, tiny_selection):
    stream = make_stream(tiny_store, tiny_selection, n_batches=2)
    first = list(stream)
    stream.set_epoch(1)
    assert not same(list(stream), first)
    ranks = [CellStream(tiny_store, CellTable.from_frame(tiny_selection.train),
                        tiny_selection.gene_indices,
                        StreamConfig(batch_size=64, mode="full", num_workers=0), r, 2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    cells = [set(torch.cat([b.labels for b in r]).tolist()) for r in ranks]
    assert sum(len(list(r)) for r in ranks) == 2 * len(ranks[0])
    with pytest.raises(ValueError, match="world_size=2"):
        stream.load_state_dict(ranks[0].state_dict())
    assert cells


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_start_methods_finish(tiny_store, context):
    code = textwrap.dedent(f"""
        from scimtrain.selection import SelectionConfig, select_cells
        from scimtrain.store import CellArrStore
        from scimtrain.stream import CellStream, CellTable, StreamConfig
        if __name__ == "__main__":
            store = CellArrStore({tiny_store!r})
            store.read_rows([0, 1])  # the parent has used TileDB before the workers start
            sel = select_cells(store, SelectionConfig(filter_condition={TINY_FILTER!r}))
            stream = CellStream(store, CellTable.from_frame(sel.train), sel.gene_indices,
                                StreamConfig(batch_size=32, n_batches=4, num_workers=2,
                                             multiprocessing_context={context!r}))
            print(sum(b.x.shape[0] for b in stream))
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                          text=True, timeout=180)  # a hang fails instead of stalling
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "128"


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_process_exits_with_live_workers_left_running(tiny_store, context):
    """Workers left running after two epochs (never closed) do not keep the process from
    exiting, and they were the same processes in both epochs."""
    code = textwrap.dedent(f"""
        from scimtrain.selection import SelectionConfig, select_cells
        from scimtrain.store import CellArrStore
        from scimtrain.stream import CellStream, CellTable, StreamConfig
        if __name__ == "__main__":
            store = CellArrStore({tiny_store!r})
            sel = select_cells(store, SelectionConfig(filter_condition={TINY_FILTER!r}))
            stream = CellStream(store, CellTable.from_frame(sel.train), sel.gene_indices,
                                StreamConfig(batch_size=32, n_batches=4, num_workers=2,
                                             multiprocessing_context={context!r}))
            n = sum(b.x.shape[0] for b in stream)
            pids = stream.worker_pids
            stream.set_epoch(1)
            n += sum(b.x.shape[0] for b in stream)
            print(n, len(pids), stream.worker_pids == pids)
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                          text=True, timeout=180)  # a hang fails instead of stalling
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "256 2 True"


# ------------------------------------------------------------------ workers across epochs


def epochs_of(stream: CellStream, epochs: range) -> tuple[list[list], list[tuple]]:
    """Each epoch's batches and the worker processes that were running after it."""
    batches, pids = [], []
    for epoch in epochs:
        stream.set_epoch(epoch)
        batches.append(list(stream))
        pids.append(stream.worker_pids)
    return batches, pids


def fresh_epochs(make, epochs: range) -> list[list]:
    """Each epoch from a new stream (workers started for that epoch alone)."""
    out = []
    for epoch in epochs:
        stream = make()
        stream.set_epoch(epoch)
        out.append(list(stream))
        stream.close()
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_persist_across_epochs_with_the_same_batches(tiny_store, tiny_selection,
                                                             context):
    reference, _ = epochs_of(make_stream(tiny_store, tiny_selection), range(4))
    fresh = fresh_epochs(lambda: make_stream(tiny_store, tiny_selection, num_workers=2),
                         range(3))
    stream = make_stream(tiny_store, tiny_selection, num_workers=2,
                         multiprocessing_context=context)
    got, pids = epochs_of(stream, range(3))
    assert all(same(g, r) and same(g, f) for g, r, f in zip(got, reference, fresh))
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    old = list(stream._workers.iterator._workers)
    # a jump (load_state_dict elsewhere) starts new workers there and stops the old ones
    stream.load_state_dict({"epoch": 1, "consumed": 4})
    assert same(list(stream), reference[1][4:])
    assert len(stream.worker_pids) == 2 and not set(stream.worker_pids) & set(pids[0])
    assert not any(p.is_alive() for p in old)
    running = list(stream._workers.iterator._workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "a loader worker failed while being stopped"
        stream.close()  # with the next epoch's batches already queued by the workers
    assert stream.worker_pids == () and not any(p.is_alive() for p in running)
    stream.set_epoch(3)  # after close(): fresh workers again
    assert same(list(stream), reference[3])
    stream.close()


def test_a_left_epoch_continues_on_the_same_workers_or_restarts_for_another(tiny_store,
                                                                              tiny_selection):
    reference, _ = epochs_of(make_stream(tiny_store, tiny_selection), range(3))
    stream = make_stream(tiny_store, tiny_selection, num_workers=2)
    head = []
    for batch in stream:  # epoch 0 left after 3 batches
        head.append(batch)
        if len(head) == 3:
            break
    pids = stream.worker_pids
    rest = list(stream)  # the rest of epoch 0: what the live workers make next
    assert same(head + rest, reference[0]) and stream.worker_pids == pids
    stream.set_epoch(1)
    head = [batch for batch, _ in zip(stream, range(2))]  # epoch 1 left after 2 batches
    assert same(head, reference[1][:2]) and stream.worker_pids == pids
    stream.set_epoch(2)  # the rest of epoch 1 abandoned: fresh workers at epoch 2
    assert same(list(stream), reference[2]) and not set(stream.worker_pids) & set(pids)
    pids = stream.worker_pids
    stream.set_epoch(5)  # skipping epochs is a jump too
    skipped = make_stream(tiny_store, tiny_selection)
    skipped.set_epoch(5)
    assert same(list(stream), list(skipped)) and not set(stream.worker_pids) & set(pids)
    stream.close()


def test_a_dropped_stream_stops_its_workers_at_once(tiny_store, tiny_selection):
    stream = make_stream(tiny_store, tiny_selection, num_workers=2)
    list(stream)
    running = list(stream._workers.iterator._workers)
    assert running and all(p.is_alive() for p in running)
    del stream  # no close(): nothing but this name held the stream
    assert not any(p.is_alive() for p in running)


def test_an_older_iteration_stops_when_a_newer_one_takes_the_workers(tiny_store,
                                                                    tiny_selection):
    reference, _ = epochs_of(make_stream(tiny_store, tiny_selection), range(1))
    stream = make_stream(tiny_store, tiny_selection, num_workers=2)
    first = iter(stream)
    head = [next(first), next(first)]
    second = iter(stream)  # continues where the first left: batch 2 on
    assert same(head + list(second), reference[0])
    assert list(first) == []  # it no longer owns the workers: it must not steal batches
    stream.close()


def test_exact_resume_across_epochs_with_persistent_workers(tiny_store, tiny_selection):
    reference, _ = epochs_of(make_stream(tiny_store, tiny_selection), range(3))
    stream = make_stream(tiny_store, tiny_selection, num_workers=2)
    got = list(stream)
    stream.set_epoch(1)
    for batch in stream:
        got.append(batch)
        if stream.state_dict()["consumed"] == 5:
            state = stream.state_dict()
            break
    stream.close()
    resumed = make_stream(tiny_store, tiny_selection, num_workers=2)
    resumed.load_state_dict(state)
    got += list(resumed)
    resumed.set_epoch(2)
    got += list(resumed)
    resumed.close()
    assert same(got, reference[0] + reference[1] + reference[2])


def test_a_pickled_or_copied_stream_leaves_the_live_workers_behind(tiny_store, tiny_selection):
    import copy
    import pickle

    stream = make_stream(tiny_store, tiny_selection, num_workers=2)
    first = list(stream)
    assert len(stream.worker_pids) == 2
    clone = pickle.loads(pickle.dumps(stream))  # a live DataLoader iterator cannot pickle
    shallow = copy.copy(stream)
    assert clone.worker_pids == () and shallow.worker_pids == ()
    assert len(stream.worker_pids) == 2
    shallow.set_epoch(0)
    assert same(list(shallow), first)  # its own workers
    shallow.close()
    stream.close()


def test_dynamic_weights_restart_workers_each_epoch_with_the_same_batches(tiny_store,
                                                                          tiny_selection):
    """A dynamic plan is prepared in this process before each epoch: its workers restart."""
    from scimtrain.dynamic_sampling import DynamicCellStream

    def make(workers: int) -> DynamicCellStream:
        return DynamicCellStream(tiny_store, CellTable.from_frame(tiny_selection.train),
                                 tiny_selection.gene_indices,
                                 StreamConfig(batch_size=64, n_batches=5, pool_batches=2,
                                              num_workers=workers))

    reference, _ = epochs_of(make(0), range(3))
    stream = make(2)
    pids = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        batches = []
        for batch in stream:
            batches.append(batch)
            if len(batches) == 1:
                pids.append(stream.worker_pids)
        assert same(batches, reference[epoch])
        assert stream.worker_pids == ()  # stopped at the epoch's end
    assert len(set(pids)) == 3


def test_missing_counts_array(tmp_path, tiny_store):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    shutil.rmtree(copy / "counts")
    with pytest.raises(StoreError, match="no counts array"):
        CellStream(str(copy), CellTable(np.arange(3), np.zeros(3, int), np.zeros(3, int),
                                        np.ones(3)))


def test_bad_stream_config():
    with pytest.raises(ValueError, match="pool_batches"):
        StreamConfig(pool_batches=0)
    with pytest.raises(ValueError, match="output"):
        StreamConfig(output="parquet")


def test_prefetch_order_errors_and_early_stop():
    import threading

    from scimtrain.prefetch import prefetch

    assert list(prefetch(range(10), 2)) == list(range(10))
    assert list(prefetch(range(3), 0)) == [0, 1, 2]

    def failing():
        yield 1
        raise RuntimeError("producer failed")

    got = []
    with pytest.raises(RuntimeError, match="producer failed"):
        for item in prefetch(failing(), 1):
            got.append(item)
    assert got == [1]
    before = threading.active_count()
    for _item in prefetch(iter(range(100)), 1):  # the consumer leaves with the buffer full
        break
    assert threading.active_count() == before  # the producer thread stopped and was joined


def test_pools_ramp_up_to_the_pool_size():
    from scimtrain.stream import ramped_pools

    pools = ramped_pools(list(range(20)), 4)
    assert [len(p) for p in pools] == [1, 2, 4, 4, 4, 4, 1]
    assert sum(pools, []) == list(range(20))
    assert ramped_pools([], 4) == []


def test_own_loop_with_cell_dataloader_and_not_a_wrapping_dataloader(tiny_store, tiny_selection):
    """Outside the Trainer: cell_dataloader loads with workers and its state_dict counts what
    the loop consumed; a DataLoader with workers around a stream is refused with the fix."""
    from torch.utils.data import DataLoader

    from scimtrain import cell_dataloader

    full = list(make_stream(tiny_store, tiny_selection))
    loader = cell_dataloader(make_stream(tiny_store, tiny_selection), num_workers=2)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    assert loader.state_dict()["consumed"] == 3 and same(head, full[:3])
    rest = cell_dataloader(make_stream(tiny_store, tiny_selection), num_workers=2)
    rest.load_state_dict(loader.state_dict())
    assert same(head + list(rest), full)
    wrapped = DataLoader(make_stream(tiny_store, tiny_selection), batch_size=None,
                         num_workers=1)
    with pytest.raises(RuntimeError, match="cell_dataloader"):
        next(iter(wrapped))


def test_rank_and_world_size_from_torch_distributed(tiny_store, tiny_selection, monkeypatch):
    assert (make_stream(tiny_store, tiny_selection).rank,
            make_stream(tiny_store, tiny_selection).world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    stream = make_stream(tiny_store, tiny_selection)
    assert (stream.rank, stream.world_size) == (1, 2)
    given = CellStream(tiny_store, CellTable.from_frame(tiny_selection.train), None,
                       StreamConfig(batch_size=64, num_workers=0), rank=0, world_size=1)
    assert (given.rank, given.world_size) == (0, 1)  # what is given wins
