"""The selection (docs/scimilarity.md §2) step by step, on small hand-built stores whose right
answer is known by construction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from scimtrain.model_folder import write_label_ints
from scimtrain.ontology import CellOntology
from scimtrain.selection import (
    MIN_GENE_ORDER_MATCH,
    SelectionConfig,
    SelectionError,
    default_filter,
    sampling_weights,
    select_cells,
)
from scimtrain.store import CellArrStore, StoreError
from tests.conftest import TINY_FILTER, hand_store

MONO, CLASSICAL, NONCLASSICAL = "CL:0000576", "CL:0000860", "CL:0000875"
BCELL, TREG, TREG_CD25 = "CL:0000236", "CL:0000815", "CL:0000792"


def cell_table(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    """rows of (label, study, sample, how many cells) -> a cell_metadata frame passing QC."""
    records = []
    for label, study, sample, n in rows:
        records += [(label, study, sample)] * n
    frame = pd.DataFrame(records, columns=["cellTypeOntologyID", "datasetID", "sampleID"])
    frame["total_counts"] = 5000.0
    frame["n_genes_by_counts"] = 1000
    frame["pct_counts_mt"] = 1.0
    frame["predicted_doublets"] = 0
    return frame


def store_of(tmp_path, rows, samples=None, **kwargs) -> CellArrStore:
    return CellArrStore(hand_store(tmp_path / "store", cell_table(rows), samples=samples, **kwargs))


BASE = [(BCELL, "A", "a1", 4), (BCELL, "B", "b1", 3), (MONO, "A", "a1", 2), (MONO, "B", "b2", 2)]


def test_step1_filter_drops_failing_and_missing(tmp_path):
    cells = cell_table(BASE + [("nan", "A", "a1", 2), (BCELL, "C", "c1", 2)])
    cells.loc[0, "total_counts"] = 500.0  # fails QC
    cells.loc[1, "pct_counts_mt"] = 40.0  # fails QC
    cells.loc[2, "predicted_doublets"] = 1  # fails QC
    cells.loc[3, "sampleID"] = None  # missing sample: dropped
    cells.loc[len(cells) - 1, "cellTypeOntologyID"] = "CL:0009010"  # excluded type
    store = CellArrStore(hand_store(tmp_path / "s", cells))
    selection = select_cells(store)
    kept = set(selection.train.index)
    assert not kept & {0, 1, 2, 3, len(cells) - 1}
    assert not (selection.train["label_id"] == "nan").any()
    assert selection.steps[0] == ("1 filter", len(cells) - 2 - 5, 0)


def test_step2_exclusions(tmp_path):
    rows = BASE + [(BCELL, "C", "c1", 3), (MONO, "C", "c1", 2), (BCELL, "C", "c2", 3),
                   (MONO, "D", "d1", 2), (BCELL, "D", "d2", 2)]
    samples = pd.DataFrame({"datasetID": ["A", "B", "B", "C", "C", "D", "D"],
                            "sampleID": ["a1", "b1", "b2", "c1", "c2", "d1", "d2"],
                            "disease": ["normal", "normal", "Metastatic melanoma", "normal",
                                        "normal", "normal", "B-cell LYMPHOMA"]})
    store = store_of(tmp_path, rows, samples=samples)
    cfg = SelectionConfig(exclude_studies=("A",), exclude_samples=(("C", "c2"),))
    train = select_cells(store, cfg).train
    assert set(train["study"]) == {"B", "C", "D"}
    pairs = set(zip(train["study"], train["sample"]))
    assert ("C", "c2") not in pairs  # listed
    assert ("B", "b2") not in pairs and ("D", "d2") not in pairs  # cancer keywords, any case
    assert ("D", "d1") in pairs and ("B", "b1") in pairs
    off = select_cells(store, SelectionConfig(disease_keywords=())).train
    assert ("B", "b2") in set(zip(off["study"], off["sample"]))


def test_step3_harmonisation(tmp_path):
    store = store_of(tmp_path, BASE + [(TREG_CD25, "A", "a1", 2), (TREG, "B", "b1", 2)])
    train = select_cells(store).train
    assert TREG_CD25 not in set(train["label_id"])
    assert (train["label_id"] == TREG).sum() == 4
    # A table of one's own replaces whole ids only; without it, mast cells (one study, no
    # parent present) would be dropped by step 5.
    store = store_of(tmp_path / "custom", BASE + [("CL:0000097", "A", "a1", 2)])
    table = {"CL:0000097": BCELL, "CL:00000": "never a prefix match"}
    assert (select_cells(store, SelectionConfig(harmonisation=table)).train["label_id"]
            == BCELL).sum() == 4 + 3 + 2
    assert (select_cells(store, SelectionConfig(harmonisation={})).train["label_id"]
            == BCELL).sum() == 4 + 3


def test_step4_validation_split(tmp_path):
    rows = BASE + [(BCELL, "V1", "v1", 3), (TREG, "V1", "v1", 2), (BCELL, "V2", "v2", 2),
                   (TREG, "V2", "v2", 2), (MONO, "V2", "v2", 1)]
    store = store_of(tmp_path, rows)
    with pytest.raises(SelectionError, match=r"\['nowhere'\] have no cells.*its studies are"):
        select_cells(store, SelectionConfig(val_studies=("V1", "V2", "nowhere")))
    sel = select_cells(store, SelectionConfig(val_studies=("V1", "V2")))
    assert set(sel.val["study"]) == {"V1", "V2"}
    assert not set(sel.train["study"]) & {"V1", "V2"}
    # Validation keeps only labels present in training: the Tregs go.
    assert set(sel.val["label_id"]) == {BCELL}  # MONO is in one validation study only
    lenient = select_cells(store, SelectionConfig(val_studies=("V1", "V2"), val_min_studies=1))
    assert set(lenient.val["label_id"]) == {BCELL, MONO}
    assert set(sel.val["label_int"]) <= set(sel.train["label_int"])


def test_step5_coarse_grain_singletons(tmp_path):
    rows = BASE + [(CLASSICAL, "A", "a1", 3),  # one study; its parent MONO is present
                   (NONCLASSICAL, "B", "b1", 2),  # one study; parent MONO present
                   ("CL:0000097", "A", "a1", 2)]  # mast cell: one study, no parent present
    train = select_cells(store_of(tmp_path, rows)).train
    labels = train["label_id"]
    assert (labels == MONO).sum() == 4 + 3 + 2
    assert not labels.isin([CLASSICAL, NONCLASSICAL, "CL:0000097"]).any()
    assert train.groupby("label_id")["study"].nunique().min() >= 2


def test_step6_unknown_labels_dropped_and_reported(tmp_path):
    rows = BASE + [("CL:9999999", "A", "a1", 2), ("CL:9999999", "B", "b1", 1)]
    sel = select_cells(store_of(tmp_path, rows))
    assert sel.unknown_labels == {"CL:9999999": 3}
    assert "CL:9999999" not in set(sel.train["label_id"])
    assert "unknown to the ontology" in sel.summary()
    assert sel.train.loc[sel.train["label_id"] == BCELL, "label_name"].iloc[0] == "B cell"


def test_no_ontology_mode_keeps_plain_labels(tmp_path):
    rows = [("alpha", "A", "a1", 3), ("alpha", "B", "b1", 2), ("beta", "A", "a1", 2),
            ("beta", "B", "b1", 2), ("gamma", "A", "a1", 4)]
    sel = select_cells(store_of(tmp_path, rows), SelectionConfig(filter_condition=""),
                       CellOntology.none())
    assert sel.label2int == {"alpha": 0, "beta": 1}  # gamma: one study, nothing to coarsen to


def test_step7_weights_and_cap():
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({
        "label_id": ["x"] * 1500 + ["y"] * 498 + ["rare"] * 2,
        "study": rng.choice(["s1", "s2", "s3"], size=2000, p=[0.6, 0.3, 0.1]),
    })
    got = sampling_weights(cells)["sampling_weight"].to_numpy()
    n_label = cells["label_id"].map(cells["label_id"].value_counts()).to_numpy()
    n_study = cells["study"].map(cells["study"].value_counts()).to_numpy()
    raw = 1 / np.log1p(n_label / 1e4) / np.log1p(n_study / 1e6)
    cap = 2 * np.quantile(raw, 0.999)
    assert raw.max() > cap  # the two rare cells are far above the cap ...
    np.testing.assert_allclose(got, np.minimum(raw, cap))  # ... and are capped exactly
    assert (got[-2:] == cap).all()


def test_step8_label_ints_sorted_and_stable_across_processes(tiny_store):
    cfg = SelectionConfig(filter_condition=TINY_FILTER)
    sel = select_cells(CellArrStore(tiny_store), cfg)
    assert list(sel.label2int) == sorted(sel.label2int)
    assert list(sel.label2int.values()) == list(range(sel.n_labels))
    assert (sel.train["label_name"].map(sel.label2int) == sel.train["label_int"]).all()
    code = ("import json,sys; from scimtrain.store import CellArrStore; "
            "from scimtrain.selection import SelectionConfig, select_cells; "
            "s = select_cells(CellArrStore(sys.argv[1]), "
            f"SelectionConfig(filter_condition={TINY_FILTER!r})); "
            "print(json.dumps(s.label2int))")
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, tiny_store], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == sel.label2int


def test_label_ints_file_round_trip(tmp_path):
    sel = select_cells(store_of(tmp_path, BASE))
    write_label_ints(sel.int2label, tmp_path / "label_ints.csv")
    back = pd.read_csv(tmp_path / "label_ints.csv", index_col=0)["0"]
    assert back.to_dict() == sel.int2label


def test_step9_gene_order(tmp_path):
    genes = [f"G{i}" for i in range(20)]
    store = store_of(tmp_path, BASE, genes=genes)
    order = tmp_path / "order.txt"
    order.write_text("G5\nG2\nNOPE\n\nG19\n")
    sel = select_cells(store, SelectionConfig(gene_order=str(order)))
    assert sel.gene_order == ["G5", "G2", "G19"]
    assert sel.gene_indices.tolist() == [5, 2, 19]
    assert sel.missing_genes == ["NOPE"]
    everything = select_cells(store)
    assert everything.gene_order == genes and everything.gene_indices.tolist() == list(range(20))
    order.write_text("\n".join(["G1"] + [f"ENSG{i:011d}" for i in range(5)]))
    with pytest.raises(SelectionError, match=rf"only 1 of the 6 .*{MIN_GENE_ORDER_MATCH:.0%}"):
        select_cells(store, SelectionConfig(gene_order=str(order)))
    with pytest.raises(SelectionError, match="does not exist"):
        select_cells(store, SelectionConfig(gene_order=str(tmp_path / "missing.txt")))


def test_empty_selection_names_the_step(tmp_path):
    store = store_of(tmp_path, BASE)
    with pytest.raises(SelectionError, match="after step '2a exclude studies'"):
        select_cells(store, SelectionConfig(exclude_studies=("A", "B")))
    with pytest.raises(SelectionError, match="(?s)filter keeps no cell.*total_counts > "
                       "1000000000.0: 0"):
        select_cells(store, SelectionConfig(filter_condition="total_counts>1e9"))


def test_missing_columns_and_bad_filter(tmp_path):
    store = store_of(tmp_path, BASE)
    with pytest.raises(StoreError,
                       match=r"lacks the column\(s\) \['cell_type'\].*--label_id_column"):
        select_cells(store, SelectionConfig(label_column="cell_type"))
    with pytest.raises(StoreError, match="could not evaluate"):
        select_cells(store, SelectionConfig(filter_condition="total_counts >>> 3"))


def test_default_filter_is_scimilarity():
    assert default_filter() == (
        "cellTypeOntologyID!='nan' and total_counts>1000 and n_genes_by_counts>500 and "
        "pct_counts_mt<20 and predicted_doublets==0 and cellTypeOntologyID!='CL:0009010'")


def test_selection_on_synthetic_store(tiny_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny store's validation studies all exist
        sel = select_cells(CellArrStore(tiny_store),
                           SelectionConfig(filter_condition=TINY_FILTER,
                                           val_studies=("study_04", "study_05")))
    assert len(sel.train) > 1000 and len(sel.val) > 100
    assert sel.train["sampling_weight"].gt(0).all()
    assert "study_04" in sel.studies


def test_step2c_disease_by_cellarr_sample(tmp_path):
    """sample_metadata as the cellarr package writes it: one row per input file, linked to the
    cells by ``cellarr_sample``, no study/sample columns."""
    rows = BASE + [(BCELL, "C", "c1", 3), (MONO, "C", "c1", 2)]
    cells = cell_table(rows)
    cells["cellarr_sample"] = ["sample_1"] * 11 + ["sample_2"] * 5  # A, B | C
    samples = pd.DataFrame({"cellarr_sample": ["sample_1", "sample_2"],
                            "cellarr_cell_counts": ["11", "5"],
                            "disease": ["normal", "acute myeloid LEUKEMIA"]})
    store = CellArrStore(hand_store(tmp_path / "s", cells, samples=samples))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the link is there: nothing to warn about
        train = select_cells(store).train
    assert set(train["study"]) == {"A", "B"}
    assert len(train) == 11


def test_step2c_without_disease_column_warns_once(tmp_path):
    cells = cell_table(BASE)
    cells["cellarr_sample"] = "sample_1"
    samples = pd.DataFrame({"cellarr_sample": ["sample_1"], "cellarr_cell_counts": ["11"],
                            "cellarr_original_gene_set": ["G0,G1"]})
    store = CellArrStore(hand_store(tmp_path / "s", cells, samples=samples))
    with pytest.warns(UserWarning) as caught:
        sel = select_cells(store)
    disease = [w for w in caught if "disease" in str(w.message)]
    assert len(disease) == 1
    assert "no 'disease' column" in str(disease[0].message)
    assert "no sample is excluded" in str(disease[0].message)
    assert len(sel.train) == 11
    # A disease column but no way to find a sample's cells: said once too.
    samples = pd.DataFrame({"name": ["x"], "disease": ["lymphoma"]})
    store = CellArrStore(hand_store(tmp_path / "t", cell_table(BASE), samples=samples))
    with pytest.warns(UserWarning, match=r"neither the columns \['datasetID', 'sampleID'\] nor "
                                         "'cellarr_sample'") as caught:
        assert len(select_cells(store).train) == 11
    assert len([w for w in caught if "disease" in str(w.message)]) == 1
