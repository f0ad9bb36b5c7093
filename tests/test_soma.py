"""Training from SOMA experiments and the CELLxGENE Census (issue 16).

The experiments are written by ``tiledbsoma.io.from_anndata`` from a small AnnData object with
Census-style obs and var (duplicate cells with ``is_primary_data == False``, ``unknown``
labels, a cancer donor), and compared with a CellArr store that ``bin/build_store.py`` builds
from the primary cells of the same AnnData: the same cells must be selected with the same
weights and labels, and the caches built from either must hold the same bits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
import torch

from scimtrain.build import build_training, open_source
from scimtrain.cache import TrainingCache
from scimtrain.config import ConfigError, TrainingConfig
from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.soma import SomaSource, census_source
from scimtrain.source import StoreError
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig
from scimtrain.synthetic import CELL_TYPES
from tests.conftest import REPO, TRAIN, load_like_cell_embedding
from tests.test_features import Killed, full_state, kill_at

STUDIES = ("A", "B", "C", "D")
LABELS = [cl for cl, _ in CELL_TYPES[:8]]
SMALL_SOMA = dict(batch_size=48, n_batches=3, val_batches=2, pool_batches=2,
                  hidden_dim=[32, 32], latent_dim=8, num_workers=0, max_epochs=2,
                  checkpoint_every=2, no_progress=True, suffix="t")


def census_like(n_cells: int = 2400, n_genes: int = 700, seed: int = 0) -> anndata.AnnData:
    """Counts and Census-style obs/var. Most cells pass SCimilarity's QC mapped to Census
    columns (raw_sum > 1000, nnz > 500); a tenth are low quality, a tenth are duplicates
    (``is_primary_data == False``), 5 % are ``unknown``; donor D-1 has a cancer."""
    rng = np.random.default_rng(seed)
    rate = np.where(rng.random(n_cells) < 0.1, 0.3, 2.5)[:, None]
    counts = rng.poisson(rate * rng.uniform(0.5, 1.5, size=(1, n_genes)), size=(n_cells, n_genes))
    x = sp.csr_matrix(counts.astype(np.float32))
    study = rng.choice(STUDIES, n_cells)
    donor = np.array([f"{s}-{k}" for s, k in zip(study, rng.integers(0, 2, n_cells))])
    label = rng.choice(LABELS, n_cells).astype(object)
    label[rng.random(n_cells) < 0.05] = "unknown"
    obs = pd.DataFrame({
        "cell_type_ontology_term_id": pd.Categorical(label),
        "dataset_id": pd.Categorical(study), "donor_id": pd.Categorical(donor),
        "disease": pd.Categorical(np.where(donor == "D-1", "lung adenocarcinoma", "normal")),
        "is_primary_data": rng.random(n_cells) >= 0.1,
        "raw_sum": np.asarray(x.sum(axis=1)).ravel().astype(np.float64),
        "nnz": np.diff(x.indptr).astype(np.int64),
    }, index=[f"cell-{i}" for i in range(n_cells)])
    var = pd.DataFrame({"feature_name": [f"GENE{i:03d}" for i in range(n_genes)]},
                       index=[f"ENSG{i:011d}" for i in range(n_genes)])
    return anndata.AnnData(X=x, obs=obs, var=var)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """``soma``: the experiment; ``store``: a CellArr store of its primary cells; ``adata``."""
    root = tmp_path_factory.mktemp("soma")
    adata = census_like()
    experiment = str(root / "experiment")
    tiledbsoma.io.from_anndata(experiment, adata, measurement_name="RNA", X_layer_name="raw")
    primary = adata[adata.obs["is_primary_data"].to_numpy()].copy()
    primary.var.index = primary.var["feature_name"].astype(str)  # build_store: symbols
    primary.obs["obs_id"] = primary.obs.index
    primary.write_h5ad(root / "primary.h5ad")
    store = str(root / "store")
    subprocess.run([sys.executable, str(REPO / "bin" / "build_store.py"), store,
                    str(root / "primary.h5ad"), "--label-column", "cell_type_ontology_term_id",
                    "--study-column", "dataset_id", "--sample-column", "donor_id",
                    "--disease-column", "disease"], check=True, capture_output=True)
    return {"soma": experiment, "store": store, "adata": adata, "root": root}


# The CellArr store's columns after bin/build_store.py, and the same filter in its names.
CELLARR_SELECTION = SelectionConfig(
    filter_condition=("cellTypeOntologyID!='unknown' and total_counts>1000 and "
                      "n_genes_by_counts>500"), val_studies=("C", "D"))
SOMA_SELECTION = SelectionConfig(label_column="cell_type_ontology_term_id",
                                 study_column="dataset_id", sample_column="donor_id",
                                 val_studies=("C", "D"))


def cell_names(store: CellArrStore, index: pd.Index) -> list[str]:
    names = store.read_frame("cell_metadata", ["cell_id"])["cell_id"]
    return list(names.loc[index])


@pytest.fixture(scope="module")
def selections(data) -> dict:
    soma = SomaSource(data["soma"])
    with pytest.warns(UserWarning, match="pct_counts_mt<20 and predicted_doublets==0"):
        from_soma = select_cells(soma, SOMA_SELECTION)
    store = CellArrStore(data["store"])
    return {"soma": (soma, from_soma), "store": (store, select_cells(store, CELLARR_SELECTION))}


def test_soma_selection_equals_the_cellarr_selection(data, selections):
    soma, from_soma = selections["soma"]
    store, from_store = selections["store"]
    obs = data["adata"].obs
    for split in ("train", "val"):
        ours, theirs = getattr(from_soma, split), getattr(from_store, split)
        assert len(ours) > 100
        assert list(obs.index[ours.index]) == cell_names(store, theirs.index)  # same cells
        for column in ("label_id", "label_name", "study", "sample", "label_int", "study_int"):
            assert ours[column].tolist() == theirs[column].tolist(), column
        np.testing.assert_array_equal(ours["sampling_weight"], theirs["sampling_weight"])
    assert from_soma.label2int == from_store.label2int
    assert from_soma.gene_order == from_store.gene_order
    # What the Census defaults dropped: duplicates, unknown labels, low quality, the cancer.
    kept = obs.iloc[np.concatenate([from_soma.train.index, from_soma.val.index])]
    assert kept["is_primary_data"].all() and (kept["cell_type_ontology_term_id"] != "unknown").all()
    assert (kept["nnz"] > 500).all() and not (kept["donor_id"] == "D-1").any()
    assert (obs["donor_id"] == "D-1").sum() > 0 and (~obs["is_primary_data"]).sum() > 0


def test_unknown_labels_are_unlabelled_whatever_the_filter(selections):
    soma, _ = selections["soma"]
    chosen = select_cells(soma, SelectionConfig(
        label_column="cell_type_ontology_term_id", study_column="dataset_id",
        sample_column="donor_id", filter_condition="nnz>0", val_studies=("C", "D")))
    assert "unknown" not in set(chosen.train["label_id"]) | set(chosen.val["label_id"])
    assert not chosen.unknown_labels


def test_soma_cache_equals_the_cellarr_cache(selections, tmp_path):
    soma, from_soma = selections["soma"]
    store, from_store = selections["store"]
    caches = []
    for source, chosen in ((soma, from_soma), (store, from_store)):
        cells = np.concatenate([chosen.train.index, chosen.val.index]).astype(np.int64)
        caches.append(TrainingCache.ensure(source, cells, chosen.gene_indices, tmp_path,
                                           workers=2, chunk_cells=300, progress=False,
                                           announce=lambda _: None))
    ours, theirs = caches
    assert ours.key != theirs.key
    for name in ("values", "indices", "indptr"):
        assert np.array_equal(ours._array(name), theirs._array(name)), name
    # Batches of the training stream from either cache: the same bits and labels.
    config = StreamConfig(batch_size=64, n_batches=3, seed=4, num_workers=0)
    streams = [CellStream(source, CellTable.from_frame(chosen.train), chosen.gene_indices, config,
                          0, 1, cache=cache)
               for (source, chosen), cache in zip((selections["soma"], selections["store"]),
                                                  caches)]
    for a, b in zip(*streams):
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)


def test_the_cache_key_follows_the_experiment(data, tmp_path):
    """Same experiment, same identity; a copy elsewhere or a write to X changes it."""
    soma = SomaSource(data["soma"])
    assert soma.identity() == SomaSource(data["soma"]).with_config({"a.b": 1}).identity()
    copy = tmp_path / "copy"
    shutil.copytree(data["soma"], copy)
    moved = SomaSource(copy)
    assert moved.identity()["fragments"] == soma.identity()["fragments"]
    assert moved.identity()["uri"] != soma.identity()["uri"]
    before = moved.identity()
    with tiledbsoma.SparseNDArray.open(str(copy / "ms" / "RNA" / "X" / "raw"), "w") as x:
        x.write(pa.Table.from_pydict({"soma_dim_0": pa.array([0], pa.int64()),
                                      "soma_dim_1": pa.array([0], pa.int64()),
                                      "soma_data": pa.array([7.0], pa.float32())}))
    after = SomaSource(copy).identity()
    assert after["fragments"]["X"] != before["fragments"]["X"]
    assert after["fragments"]["obs"] == before["fragments"]["obs"]


def small_soma_config(soma: str, out: Path, **changes) -> TrainingConfig:
    return TrainingConfig(**{**SMALL_SOMA, "soma": soma, "val_studies": ["C", "D"],
                             "model_folder": str(out / "models"),
                             "result_folder": str(out / "results"),
                             "log_folder": str(out / "logs"), **changes})


def test_soma_training_resumes_exactly(data, tmp_path):
    reference = build_training(small_soma_config(data["soma"], tmp_path / "ref"))
    assert reference.selection.train.index.isin(np.flatnonzero(
        data["adata"].obs["is_primary_data"])).all()
    assert reference.train_data.cache is not None  # trained from the SOMA-built cache
    reference.trainer.fit()
    interrupted = build_training(small_soma_config(data["soma"], tmp_path / "run"))
    kill_at(interrupted, 4)  # mid-epoch 1: resumes from the checkpoint after step 3
    with pytest.raises(Killed):
        interrupted.trainer.fit()
    resumed = build_training(small_soma_config(data["soma"], tmp_path / "run"))
    resumed.trainer.fit()
    assert resumed.trainer.state.step == 6
    ours, theirs = full_state(resumed.trainer.raw_model), full_state(reference.trainer.raw_model)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def train_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          timeout=600)


def test_train_script_on_a_soma_experiment(data, tmp_path):
    """Done when: ``bin/train.py --soma EXPERIMENT --val_studies A B`` trains with no other data
    flag (the small-model and output flags do not touch the data)."""
    out = tmp_path / "run"
    done = train_cli(["--soma", data["soma"], "--val_studies", "C", "D", "-b", "48", "-n", "3",
                      "-e", "2", "--val_batches", "2", "--hidden_dim", "32", "32",
                      "--latent_dim", "8", "--num_workers", "2", "--no_progress",
                      "--suffix", "t", "--model_folder", str(out / "models"),
                      "--result_folder", str(out / "results"), "--log_folder",
                      str(out / "logs")])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    dropped = [line for line in done.stderr.splitlines() if "default filter, dropped" in line]
    assert dropped == [f"scimtrain-train: warning: obs of {data['soma']} lacks the columns of 2 "
                       "clause(s) of SCimilarity's default filter, dropped: pct_counts_mt<20 and "
                       "predicted_doublets==0"]  # one line
    genes, encoder = load_like_cell_embedding(out / "models" / "model_48_0.05_8_2_0.001_t")
    assert genes == list(data["adata"].var["feature_name"])
    with torch.no_grad():
        assert encoder.eval()(torch.rand(3, len(genes))).shape == (3, 8)
    metadata = json.loads((out / "models" / "model_48_0.05_8_2_0.001_t" /
                           "metadata.json").read_text())
    assert metadata["store"] == data["soma"]


@pytest.mark.parametrize("flags, message", [
    (["--soma", "/nonexistent/experiment"], "/nonexistent/experiment is not a SOMA experiment"),
    (["--soma_measurement", "ATAC"], "has no measurement 'ATAC'; it has ['RNA']"),
    (["--soma_layer", "normalized"], "has no X layer 'normalized'; it has ['raw']"),
    (["--gene_column", "symbol"], "has no column 'symbol'"),
    (["--label_id_column", "cell_type"], "lacks the column(s) ['cell_type']"),
    (["--tiledb", "x"], "--tiledb and --soma each name the training data: give one"),
])
def test_bad_soma_input_is_one_clear_line(data, tmp_path, flags, message):
    args = ["--soma", data["soma"], "--val_studies", "C", "D", "--no_progress",
            "--model_folder", str(tmp_path / "m"), "--result_folder", str(tmp_path / "r"),
            "--log_folder", str(tmp_path / "l"), *flags]
    done = train_cli(args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_census_opens_through_cellxgene_census(data, tmp_path, monkeypatch):
    """``--census VERSION``: the experiment ``cellxgene_census.open_soma`` finds (here a local
    Census-shaped collection: this machine has no network)."""
    import cellxgene_census

    census = str(tmp_path / "census")
    with tiledbsoma.Collection.create(census) as root:
        root.add_new_collection("census_data")
    with tiledbsoma.Collection.open(census, "w") as root:
        root["census_data"].set("homo_sapiens", tiledbsoma.Experiment.open(data["soma"]),
                                use_relative_uri=False)
    asked = []

    def open_soma(*, census_version=None, **_):
        asked.append(census_version)
        return tiledbsoma.Collection.open(census)

    monkeypatch.setattr(cellxgene_census, "open_soma", open_soma)
    source = open_source(TrainingConfig(census="2025-01-30"))
    assert asked == ["2025-01-30"] and isinstance(source, SomaSource)
    assert source.identity()["fragments"] == SomaSource(data["soma"]).identity()["fragments"]
    with pytest.raises(StoreError, match="has no organism 'mus_musculus'; it has"):
        census_source("2025-01-30", "mus_musculus")

    def offline(**_):
        raise RuntimeError("Cannot connect to host s3.us-west-2.amazonaws.com")

    monkeypatch.setattr(cellxgene_census, "open_soma", offline)
    with pytest.raises(StoreError, match="could not open CELLxGENE Census 'stable': Cannot"):
        census_source("stable")


def test_config_names_one_source():
    with pytest.raises(ConfigError, match="--soma and --census each name"):
        TrainingConfig(soma="x", census="stable")
    with pytest.raises(ConfigError, match="--soma_measurement / --soma_layer"):
        TrainingConfig(soma="x", counts_location="assays/counts")


def test_tiledb_and_tiledbsoma_load_side_by_side(data, selections):
    """setup.cfg's ranges: tiledb and tiledbsoma share one process (both bundle libtiledb)."""
    import tiledb

    code = ("import tiledb, tiledbsoma, sys; "
            f"tiledb.open({data['store'] + '/counts'!r}).close(); "
            f"e = tiledbsoma.Experiment.open({data['soma']!r}); "
            "print(tiledb.libtiledb.version(), e.obs.count)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(len(data["adata"]))
    assert tiledb.libtiledb.version() >= (2, 30)
