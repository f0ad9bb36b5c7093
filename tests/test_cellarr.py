"""Stores built by the real ``cellarr`` package train as they are (issue 11).

Two h5ad files with different cells and different gene sets are assembled three ways: (a) by
cellarr with its defaults (every frame column TileDB ``ascii``, numbers included), (b) by cellarr
with the numeric QC columns declared through ``column_types`` and a sample_metadata frame with a
disease column, (c) by our own writer. All three must select the same cells with the same
labels and weights, read the same counts, and train with ``bin/train.py`` into model folders
holding plain strings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from cellarr.build import build_cellarrdataset as cellarr_build
from cellarr.build import build_options as cellarr_options

from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore, StoreError
from tests.conftest import hand_store, load_like_cell_embedding

TRAIN = str(Path(__file__).resolve().parents[1] / "bin" / "train.py")
LABELS = ["CL:0000236", "CL:0000576", "CL:0000084", "CL:0000623"]  # B, monocyte, T, NK
# Per file: (study, cells); the validation studies A and B hold the same labels as training.
FILES = [[("T1", 70), ("A", 50)], [("T2", 70), ("B", 50)]]
N_GENES = 650  # enough for SCimilarity's n_genes_by_counts>500 filter
QC_TYPES = {"total_counts": float, "n_genes_by_counts": int, "pct_counts_mt": float,
            "predicted_doublets": int}


def _gene_names() -> list[str]:
    """Gene symbols in the order of the first file; mitochondrial ones in both files."""
    names = [f"GENE{i:04d}" for i in range(N_GENES - 5)]
    return names[:100] + [f"MT-G{i}" for i in range(5)] + names[100:]


def _one_file(index: int, rng: np.random.Generator) -> anndata.AnnData:
    """One h5ad: raw counts in ``layers['counts']`` (X holds normalised values, which a
    reader of X would get wrong), cell metadata with QC computed from the counts."""
    names = _gene_names()
    genes = names[:-20] if index == 0 else names[20:][::-1]  # different sets, orders
    cells = [(study, i) for study, n in FILES[index] for i in range(n)]
    n = len(cells)
    detected = rng.random((n, len(genes))) < np.where(rng.random((n, 1)) < 0.15, 0.6, 0.97)
    counts = rng.poisson(3.0, (n, len(genes))) * detected
    mito = np.array([g.startswith("MT-") for g in genes])
    damaged = rng.random(n) < 0.1
    counts[np.ix_(damaged, mito)] *= 300  # these cells fail pct_counts_mt<20
    total = counts.sum(axis=1)
    labels = rng.choice(LABELS + ["nan", "CL:0009010"], n, p=[0.22] * 4 + [0.08, 0.04])
    obs = pd.DataFrame({
        "cellTypeOntologyID": labels,
        "datasetID": [study for study, _ in cells],
        "sampleID": [f"{study}_s{i % 2}" for study, i in cells],
        "total_counts": total.astype(np.float64),
        "n_genes_by_counts": (counts > 0).sum(axis=1),
        "pct_counts_mt": 100 * counts[:, mito].sum(axis=1) / np.maximum(total, 1),
        "predicted_doublets": (rng.random(n) < 0.08).astype(np.int64),
    }, index=[f"f{index}_c{i}" for i in range(n)])
    raw = sp.csr_matrix(counts.astype(np.float32))
    normalised = sp.csr_matrix(np.log1p(counts / np.maximum(total[:, None], 1) * 1e4))
    data = anndata.AnnData(X=normalised.astype(np.float32), obs=obs,
                           var=pd.DataFrame(index=genes))
    data.layers["counts"] = raw
    return data


def _union_counts(files: list[anndata.AnnData], genes: list[str]) -> sp.csr_matrix:
    """The files' counts stacked in the store gene order (absent genes are zero)."""
    blocks = []
    for data in files:
        column = {g: i for i, g in enumerate(genes)}
        coo = data.layers["counts"].tocoo()
        cols = np.array([column[g] for g in data.var_names])[coo.col]
        blocks.append(sp.csr_matrix((coo.data, (coo.row, cols)), shape=(data.n_obs, len(genes))))
    return sp.vstack(blocks).tocsr()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """{'defaults': cellarr defaults, 'typed': cellarr with column_types, 'ours': our writer}."""
    root = tmp_path_factory.mktemp("cellarr")
    rng = np.random.default_rng(11)
    files = [_one_file(i, rng) for i in range(2)]
    paths = []
    for i, data in enumerate(files):
        paths.append(str(root / f"file{i}.h5ad"))
        data.write_h5ad(paths[-1])
    cells = pd.concat([f.obs for f in files], ignore_index=True)
    out = {"defaults": str(root / "defaults"), "typed": str(root / "typed")}
    counts = cellarr_options.MatrixOptions(matrix_name="counts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cellarr warns at every scan
        os.makedirs(out["defaults"])
        cellarr_build.build_cellarrdataset(files=paths, output_path=out["defaults"],
                                           cell_metadata=cells.copy(), matrix_options=counts)
        os.makedirs(out["typed"])
        cellarr_build.build_cellarrdataset(
            files=paths, output_path=out["typed"], cell_metadata=cells.copy(),
            sample_metadata=pd.DataFrame({"disease": ["normal", "normal"]}),
            cell_metadata_options=cellarr_options.CellMetadataOptions(column_types=QC_TYPES),
            matrix_options=counts)
    genes = sorted(_gene_names())  # cellarr orders the union of the files' genes by name
    samples = cells[["datasetID", "sampleID"]].drop_duplicates().assign(disease="normal")
    out["ours"] = hand_store(root / "ours", cells, _union_counts(files, genes), genes, samples)
    return out


def _select(uri: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # defaults: no disease column, said in a warning
        return select_cells(CellArrStore(uri), SelectionConfig(val_studies=("A", "B")))


def test_cellarr_writes_text_where_we_write_numbers(stores):
    """The premise: cellarr's defaults really write numbers as ascii, counts at assays/."""
    import tiledb

    with tiledb.open(f"{stores['defaults']}/cell_metadata") as arr:
        assert arr.schema.attr("total_counts").isascii
    with tiledb.open(f"{stores['typed']}/cell_metadata") as arr:
        assert arr.schema.attr("total_counts").dtype == np.float64
        assert arr.schema.attr("datasetID").isascii
    assert CellArrStore(stores["defaults"]).counts_uri.endswith("assays/counts")


@pytest.mark.parametrize("flavour", ["defaults", "typed"])
def test_same_selection_and_counts_as_our_writer(stores, flavour):
    store = CellArrStore(stores[flavour])
    ours = _select(stores["ours"])
    got = _select(stores[flavour])
    assert len(ours.train) > 80 and len(ours.val) > 20  # the filters kept a real selection
    assert ours.steps[0][1] < 240 * 0.8  # ... and dropped the cells failing QC or unlabelled
    pd.testing.assert_frame_equal(got.train, ours.train)
    pd.testing.assert_frame_equal(got.val, ours.val)
    assert got.label2int == ours.label2int and got.studies == ours.studies
    assert got.gene_order == ours.gene_order == sorted(_gene_names())
    assert all(type(g) is str for g in store.gene_symbols)
    rows = np.r_[got.train.index[:20], got.val.index[:20]]
    reference = CellArrStore(stores["ours"]).read_rows(rows)
    np.testing.assert_array_equal(store.read_rows(rows).toarray(), reference.toarray())


def test_disease_exclusion_says_once_when_cellarr_has_no_disease(stores):
    with pytest.warns(UserWarning) as caught:
        select_cells(CellArrStore(stores["defaults"]), SelectionConfig(val_studies=("A", "B")))
    disease = [str(w.message) for w in caught if "disease" in str(w.message)]
    assert len(disease) == 1 and "no 'disease' column" in disease[0]
    assert "cellarr_sample" in disease[0]  # it lists the columns cellarr wrote
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # typed: a disease column, linked by cellarr_sample
        select_cells(CellArrStore(stores["typed"]), SelectionConfig(val_studies=("A", "B")))


def test_numeric_filter_on_text_that_is_not_a_number(stores):
    store = CellArrStore(stores["defaults"])
    with pytest.raises(StoreError, match=r"column 'sampleID' is stored as text and holds "
                                         r"'\w+_s\d', which is not a number"):
        select_cells(store, SelectionConfig(filter_condition="total_counts>1000 and sampleID>3"))


def _train(store: str, out: Path, *extra: str) -> Path:
    """bin/train.py on ``store`` with SCimilarity's selection flags; returns the model folder."""
    flags = ["--tiledb", store, "--val_studies", "A", "B", *extra,
             "--num_workers", "0", "-b", "32", "-n", "2", "-e", "1", "--val_batches", "1",
             "--hidden_dim", "16", "--latent_dim", "8", "--no_progress",
             "--model_folder", str(out / "models"), "--result_folder", str(out / "results"),
             "--log_folder", str(out / "logs")]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, TRAIN, *flags], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    folders = [p for p in (out / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1
    return folders[0]


@pytest.mark.parametrize("flavour", ["defaults", "typed"])
def test_cellarr_store_trains_with_no_other_flag(stores, tmp_path, flavour):
    """Done when: ``bin/train.py --tiledb STORE --val_studies A B`` (plus output and small-model
    flags, which do not touch the data) trains on a cellarr store, its defaults included."""
    folder = _train(stores[flavour], tmp_path)
    genes, encoder = load_like_cell_embedding(folder)
    store = CellArrStore(stores[flavour])
    assert genes == list(store.gene_symbols) == sorted(_gene_names())
    encoder.eval()
    with torch.no_grad():
        assert encoder(torch.rand(3, len(genes))).shape == (3, 8)
    labels = pd.read_csv(folder / "label_ints.csv", index_col=0)["0"].to_dict()
    assert labels == _select(stores["ours"]).int2label
    assert not any("b'" in v for v in labels.values())
    assert "b'" not in (folder / "gene_order.tsv").read_text()


@pytest.mark.parametrize("flavour", ["defaults", "typed"])
def test_gene_order_file_against_cellarr_store(stores, tmp_path, flavour):
    """--gene_order (SelectionConfig.gene_order) matches the symbols of a cellarr store."""
    order = ["GENE0300", "MT-G2", "GENE0007", "NOT_A_GENE", "GENE0644"]
    (tmp_path / "order.txt").write_text("\n".join(order) + "\n")
    store = CellArrStore(stores[flavour])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select_cells(store, SelectionConfig(val_studies=("A", "B"),
                                                  gene_order=str(tmp_path / "order.txt")))
    assert sel.gene_order == ["GENE0300", "MT-G2", "GENE0007", "GENE0644"]
    assert sel.missing_genes == ["NOT_A_GENE"]
    symbols = list(store.gene_symbols)
    assert [symbols[i] for i in sel.gene_indices] == sel.gene_order
