"""The store reader: layout discovery, metadata queries, row reads, per-process handles."""

from __future__ import annotations

import ast
import multiprocessing as mp
import pickle

import numpy as np
import pandas as pd
import pytest
import tiledb

from scimtrain.condition import (
    ENUM,
    NUMBER,
    TEXT,
    ConditionError,
    ConditionPlan,
    parse_numbers,
    plan_condition,
)
from scimtrain.selection import default_filter
from scimtrain.source import csr_from_coordinates
from scimtrain.store import DEFAULT_CONFIG, CellArrStore, StoreError, coalesce_ranges
from tests.conftest import hand_store, random_counts


def _cells(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "cellTypeOntologyID": ["CL:0000236"] * n,
        "datasetID": [f"s{i % 3}" for i in range(n)],
        "sampleID": [f"s{i % 3}_a" for i in range(n)],
        "total_counts": np.arange(n, dtype=np.float64) * 100,
        "n_genes_by_counts": np.arange(n),
        "pct_counts_mt": np.full(n, 1.0),
        "predicted_doublets": np.zeros(n, dtype=np.int64),
    })


@pytest.fixture
def small(tmp_path):
    counts = random_counts(40, 20)
    uri = hand_store(tmp_path / "small", _cells(40), counts)
    return uri, counts


def test_sizes_and_genes(small):
    uri, _ = small
    store = CellArrStore(uri)
    assert (store.n_cells, store.n_genes) == (40, 20)
    assert list(store.gene_symbols) == [f"G{i}" for i in range(20)]
    assert store.counts_attr == "data"
    assert store.counts_uri.endswith("/counts")


def test_read_rows_in_order_asked_with_repeats(small):
    uri, counts = small
    store = CellArrStore(uri)
    ask = np.array([5, 3, 3, 39, 0, 7, 8, 9, 14])  # 7 and 14 are all-zero rows
    got = store.read_rows(ask)
    assert got.shape == (len(ask), 20)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.toarray(), counts[ask].toarray())
    assert got.has_sorted_indices
    assert store.read_rows([]).shape == (0, 20)


def test_read_rows_rejects_out_of_range(small):
    store = CellArrStore(small[0])
    with pytest.raises(StoreError, match="cell index 40"):
        store.read_rows([1, 40])


def test_coalesce_ranges():
    assert coalesce_ranges(np.array([1, 2, 3, 7, 9, 10])).tolist() == [[1, 3], [7, 7], [9, 10]]
    assert coalesce_ranges(np.array([], dtype=np.int64)).shape == (0, 2)


def test_query_cells_condition_and_missing_values(tmp_path):
    cells = _cells(10)
    cells.loc[2, "cellTypeOntologyID"] = None  # written as '\x00': missing
    cells.loc[3, "cellTypeOntologyID"] = "nan"  # the string 'nan' is a value, not missing
    cells.loc[4, "pct_counts_mt"] = np.nan
    store = CellArrStore(hand_store(tmp_path / "s", cells))
    got = store.query_cells("total_counts>=200", ["cellTypeOntologyID", "pct_counts_mt"])
    assert got.index.name == "cell_index"
    assert got.index.tolist() == [3, 5, 6, 7, 8, 9]
    assert got.loc[3, "cellTypeOntologyID"] == "nan"
    everything = store.query_cells(None, ["datasetID"])
    assert everything.index.tolist() == list(range(10))
    strings = store.query_cells("cellTypeOntologyID!='nan' and datasetID=='s1'", ["datasetID"])
    assert strings.index.tolist() == [1, 4, 7]


def test_query_cells_bad_input(small):
    store = CellArrStore(small[0])
    with pytest.raises(StoreError, match="no_such_column"):
        store.query_cells("no_such_column>1", ["datasetID"])
    with pytest.raises(StoreError, match="could not evaluate"):
        store.query_cells("total_counts >> 1", ["datasetID"])
    with pytest.raises(StoreError, match=r"no column\(s\) \['nope'\]"):
        store.query_cells(None, ["nope"])


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        CellArrStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no counts array"):
        CellArrStore(tmp_path / "empty")


def test_missing_frame(small, tmp_path):
    import shutil
    uri = small[0]
    shutil.rmtree(f"{uri}/sample_metadata")
    with pytest.raises(StoreError, match="lacks the array\\(s\\) sample_metadata"):
        CellArrStore(uri)


def test_cellarr_location_and_explicit_counts(tmp_path):
    counts = random_counts(12, 20)
    uri = hand_store(tmp_path / "ca", _cells(12), counts, counts_location="assays/counts")
    store = CellArrStore(uri)
    assert store.counts_uri.endswith("assays/counts")
    np.testing.assert_array_equal(store.read_rows([4, 2]).toarray(), counts[[4, 2]].toarray())
    with pytest.raises(StoreError, match="'elsewhere'"):
        CellArrStore(uri, counts="elsewhere")


def test_config_reaches_tiledb(small):
    store = CellArrStore(small[0], config={"sm.compute_concurrency_level": 1})
    store.read_rows([1])
    assert store._context().config()["sm.compute_concurrency_level"] == "1"


def _read_in_child(store, rows, queue):
    queue.put(store.read_rows(rows).toarray())


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_handles_are_per_process(small, method):
    uri, counts = small
    store = CellArrStore(uri)
    store.read_rows([0, 1])  # the parent holds an open handle and a context
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, [3, 4], queue))
    child.start()
    got = queue.get(timeout=60)  # a hang fails here instead of stalling the suite
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, counts[[3, 4]].toarray())


def test_pickles_without_handles(small):
    store = CellArrStore(small[0])
    store.read_rows([0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._counts is None and clone._ctx is None
    assert clone.read_rows([0]).shape == (1, 20)


def test_synthetic_layout_is_cellarr(tiny_store):
    """Dims, attribute and frames as docs/scimilarity.md §1 describes a CellArr store."""
    with tiledb.open(f"{tiny_store}/counts") as arr:
        schema = arr.schema
        assert schema.sparse
        dims = [schema.domain.dim(i) for i in range(2)]
        assert [d.name for d in dims] == ["cell_index", "gene_index"]
        assert all(d.dtype == np.uint32 for d in dims)
        assert dims[0].domain[1] >= np.iinfo(np.uint32).max - 1
        assert schema.attr(0).name == "data"
        assert isinstance(schema.attr(0).filters[0], tiledb.GzipFilter)
    store = CellArrStore(tiny_store)
    meta = store.read_frame("cell_metadata")
    for column in ("cellTypeOntologyID", "datasetID", "sampleID", "total_counts",
                   "n_genes_by_counts", "pct_counts_mt", "predicted_doublets"):
        assert column in meta.columns
    assert set(store.sample_metadata().columns) >= {"datasetID", "sampleID", "disease"}
    assert len(meta) == store.n_cells == 3000


def test_synthetic_qc_columns_match_counts(tiny_store):
    store = CellArrStore(tiny_store)
    meta = store.read_frame("cell_metadata")
    rows = np.arange(0, 3000, 37)
    counts = store.read_rows(rows)
    np.testing.assert_allclose(meta["total_counts"].to_numpy()[rows],
                               np.asarray(counts.sum(axis=1)).ravel())
    np.testing.assert_array_equal(meta["n_genes_by_counts"].to_numpy()[rows],
                                  np.diff(counts.indptr))
    mt = np.char.startswith(store.gene_symbols.astype(str), "MT-")
    mt_share = np.asarray(counts[:, mt].sum(axis=1)).ravel() / np.maximum(
        np.asarray(counts.sum(axis=1)).ravel(), 1)
    np.testing.assert_allclose(meta["pct_counts_mt"].to_numpy()[rows], 100 * mt_share, rtol=1e-6)
    # What the generator promises: unlabelled cells, doublets, damaged cells, disease samples.
    assert (meta["cellTypeOntologyID"] == "nan").any()
    assert meta["predicted_doublets"].sum() > 0
    assert (meta["pct_counts_mt"] > 20).any()
    assert (store.sample_metadata()["disease"] != "normal").any()
    # Cells are stored study by study, as real atlases are.
    studies = meta["datasetID"].to_numpy()
    assert (studies[1:] != studies[:-1]).sum() == len(set(studies)) - 1


def test_synthetic_types_follow_the_ontology():
    """Each simulated type's parent is a real CL ancestor, so children resemble ancestors."""
    from scimtrain.ontology import CellOntology
    from scimtrain.synthetic import CELL_TYPES

    cl = CellOntology.default()
    for term, parent in CELL_TYPES:
        assert term in cl
        if parent is not None:
            assert parent in cl.ancestors(term), (term, parent)


def test_read_rows_from_several_fragments(tmp_path):
    """Unordered reads over several fragments interleave; read_rows still returns CSR order."""
    counts = random_counts(30, 20, seed=3)
    uri = hand_store(tmp_path / "frag", _cells(30), counts)
    extra = random_counts(30, 20, seed=4)
    extra[:, :10] = 0  # a second fragment holding genes 10..19 of every cell, new values
    extra.eliminate_zeros()
    coo = extra.tocoo()
    with tiledb.open(f"{uri}/counts", mode="w") as arr:  # tiledb-py writes unordered
        arr[coo.row.astype(np.uint32), (coo.col).astype(np.uint32)] = coo.data.astype(np.uint16)
    expected = counts.toarray()
    expected[coo.row, coo.col] = coo.data  # the newer fragment wins where both have a value
    store = CellArrStore(uri)
    got = store.read_rows([29, 0, 13, 14, 15])
    assert not store._csr_ordered(store.counts_array())
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), expected[[29, 0, 13, 14, 15]])


def test_with_config_copies_without_touching_the_original(small):
    uri, counts = small
    store = CellArrStore(uri)
    store.read_rows([0])
    tuned = store.with_config({"sm.compute_concurrency_level": 1})
    assert tuned.config == {**DEFAULT_CONFIG, "sm.compute_concurrency_level": "1"}
    assert store.config == DEFAULT_CONFIG
    assert tuned._counts is None and tuned.counts_uri == store.counts_uri
    np.testing.assert_array_equal(tuned.read_rows([3]).toarray(), counts[[3]].toarray())
    assert tuned._context().config()["sm.compute_concurrency_level"] == "1"
    assert store._context() is not tuned._context()


# --------------------------------------------------------------------------- text and numbers


def _frame_store(tmp_path, frame: pd.DataFrame, column_types: dict | None = None) -> CellArrStore:
    """A store whose cell_metadata is ``frame`` written by ``tiledb.from_pandas`` with the given
    column types (as the cellarr package writes its frames)."""
    uri = hand_store(tmp_path / "plain", frame)
    import shutil

    shutil.rmtree(f"{uri}/cell_metadata")
    tiledb.from_pandas(f"{uri}/cell_metadata", frame, column_types=column_types)
    return CellArrStore(uri)


def _qc_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = _cells(n)
    frame["total_counts"] = rng.integers(0, 3000, n).astype(np.float64)
    frame["n_genes_by_counts"] = rng.integers(0, 1000, n)
    frame["pct_counts_mt"] = np.round(rng.random(n) * 40, 3)
    frame.loc[::5, "pct_counts_mt"] = 5.5
    frame.loc[::17, "pct_counts_mt"] = np.nan  # written as the text 'nan'
    frame["predicted_doublets"] = rng.integers(0, 2, n)
    frame["cellTypeOntologyID"] = rng.choice(["CL:0000236", "nan", "CL:0009010"], n)
    return frame


CONDITIONS = [
    default_filter(),
    "total_counts>=1000.5",
    "1000 < total_counts",  # the column on the right, as TileDB accepts it
    "500 <= n_genes_by_counts < 700",  # a chain
    "predicted_doublets in [1] or pct_counts_mt > 30",
    "n_genes_by_counts not in [3, 4, 5] and datasetID in ['s0', 's2']",
    "(total_counts > 2000) & (pct_counts_mt != 5.5)",
    "not (total_counts > 1500) and pct_counts_mt >= -1 and n_genes_by_counts > val(10)",
    "attr('n_genes_by_counts') > 800 and cellTypeOntologyID == 'CL:0000236'",
    "pct_counts_mt != 5.5",  # NaN != 5.5, as in TileDB
    "pct_counts_mt == 5.5 or pct_counts_mt > 39",
]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_numbers_stored_as_text_select_as_numbers(tmp_path, condition):
    """The same frame with every column ascii (cellarr's default) selects what TileDB selects
    with numeric columns."""
    frame = _qc_frame()
    numeric = _frame_store(tmp_path / "n", frame)
    text = _frame_store(tmp_path / "t", frame, {c: "ascii" for c in frame.columns})
    wanted = ["cellTypeOntologyID", "datasetID", "sampleID"]
    expected = numeric.query_cells(condition, wanted)
    got = text.query_cells(condition, wanted)
    assert 0 < len(expected) < len(frame)  # the condition selects something, not everything
    pd.testing.assert_frame_equal(got, expected)


def test_text_columns_come_back_as_str(tmp_path):
    """ascii, UTF-8 and enumeration columns all read as plain str; null strings stay missing."""
    frame = _cells(6)
    frame["cellTypeOntologyID"] = ["CL:0000236", "\x00", "CL:0000576", "nan", "CL:0000236",
                                   "CL:0000576"]
    frame["tissue"] = pd.Categorical(["blood", "lung", "blood", "blood", "lung", "lung"])
    store = _frame_store(tmp_path / "a", frame,
                         {"cellTypeOntologyID": "ascii", "datasetID": "ascii", "sampleID": str})
    got = store.query_cells(None, ["cellTypeOntologyID", "datasetID", "tissue"])
    assert got.index.tolist() == [0, 2, 3, 4, 5]  # the null string is missing
    for column in got.columns:
        assert all(type(v) is str for v in got[column]), column
    assert got["cellTypeOntologyID"].tolist() == ["CL:0000236", "CL:0000576", "nan",
                                                  "CL:0000236", "CL:0000576"]
    assert got["tissue"].tolist() == ["blood", "blood", "blood", "lung", "lung"]
    # tiledb-py cannot return an enumeration under a condition (it decodes the codes of the
    # rows filtered out); the condition is then evaluated on the decoded columns.
    lung = store.query_cells("tissue == 'lung' and total_counts > 100", ["tissue", "datasetID"])
    assert lung.index.tolist() == [4, 5] and lung["datasetID"].tolist() == ["s1", "s2"]


def test_gene_symbols_and_sample_metadata_are_str(tmp_path):
    uri = hand_store(tmp_path / "g", _cells(10), genes=["MT-CO1", "CD3E", "HLA-A"] + [
        f"G{i}" for i in range(17)])
    import shutil

    for frame, table in (("gene_annotation", None), ("sample_metadata", None)):
        table = CellArrStore(uri).read_frame(frame).reset_index(drop=True)
        shutil.rmtree(f"{uri}/{frame}")
        tiledb.from_pandas(f"{uri}/{frame}", table, column_types={c: "ascii" for c in table})
    store = CellArrStore(uri)
    assert store.gene_symbols[:3].tolist() == ["MT-CO1", "CD3E", "HLA-A"]
    assert all(type(g) is str for g in store.gene_symbols)
    samples = store.sample_metadata()
    assert samples["disease"].tolist() == ["normal"] * 3
    assert all(type(v) is str for v in samples["datasetID"])


def test_text_that_is_not_a_number_is_a_clear_error(tmp_path):
    frame = _qc_frame(20)
    frame["total_counts"] = frame["total_counts"].astype(object)
    frame.loc[7, "total_counts"] = "12k"
    store = _frame_store(tmp_path, frame, {c: "ascii" for c in frame.columns})
    with pytest.raises(StoreError, match=r"column 'total_counts' .* holds '12k', which is not a "
                                         r"number"):
        store.query_cells("total_counts > 1000", ["datasetID"])
    # Text compared with text stays with TileDB and needs no numbers.
    assert len(store.query_cells("total_counts != '12k'", ["datasetID"])) == 19


def test_plan_keeps_what_tiledb_can_evaluate_in_tiledb():
    kinds = {"label": TEXT, "total_counts": TEXT, "pct": NUMBER, "tissue": ENUM}
    plan = plan_condition("label != 'nan' and total_counts > 1000 and pct < 20", kinds,
                          read=["label"])
    assert plan.tiledb == "(label != 'nan') and (pct < 20)"
    assert ast.unparse(plan.python) == "total_counts > 1000" and plan.columns == ("total_counts",)
    # Nothing to do here: TileDB gets the condition unchanged, bad syntax included.
    assert plan_condition("label != 'nan' and pct < 20", kinds) == ConditionPlan(
        "label != 'nan' and pct < 20")
    assert plan_condition("pct >>> 3", kinds) == ConditionPlan("pct >>> 3")
    assert plan_condition("", kinds) == ConditionPlan(None)
    # An enumeration read under a condition: all of it is evaluated on the decoded columns.
    plan = plan_condition("label != 'nan' and pct < 20", kinds, read=["tissue"])
    assert plan.tiledb is None and plan.columns == ("label", "pct")
    with pytest.raises(ConditionError, match=r"no column of the frame: \['nope'\]"):
        plan_condition("total_counts > 1 or nope > 2", kinds)


def test_parse_numbers():
    values = np.array(["1", " 2.5 ", "nan", "None", "", "\x00", "True", "false", "-1e3"],
                      dtype=object)
    np.testing.assert_array_equal(parse_numbers(values, "x"),
                                  [1, 2.5, np.nan, np.nan, np.nan, np.nan, 1, 0, -1000])
    with pytest.raises(ConditionError, match="column 'x' .* holds 'abc'"):
        parse_numbers(np.array(["1", "abc"], dtype=object), "x")


@pytest.mark.parametrize("shuffle", ["rows interleaved", "any order", "sorted"])
def test_csr_from_coordinates_in_any_read_order(shuffle):
    """Coordinates as reads return them (tiles interleave rows; fragments can put a row's
    genes out of order) become the canonical CSR of the requested cells."""
    rng = np.random.default_rng(3)
    expected = random_counts(50, 40, seed=2).tocsr()
    cells = np.sort(rng.choice(10_000, 50, replace=False))  # sparse ids: the searchsorted path
    coo = expected.tocoo()
    cell, gene, values = cells[coo.row], coo.col.astype(np.int64), coo.data
    if shuffle == "rows interleaved":  # gene tiles of 8: each row's genes ascend per tile
        order = np.lexsort((gene, cell, gene // 8))
    elif shuffle == "any order":
        order = rng.permutation(cell.size)
    else:
        order = np.arange(cell.size)
    for ids in (cells, np.arange(50)):  # and dense ids: the lookup-table path
        got = csr_from_coordinates(ids, (ids[coo.row])[order], gene[order], values[order], 40,
                                   ordered=shuffle == "sorted")
        assert got.has_sorted_indices
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_array_equal(got.data, expected.data)
