"""Building a store from h5ad files (scimtrain.ingest, bin/build_store.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("anndata")
pytest.importorskip("h5py")
import anndata as ad

from scimtrain import ingest
from scimtrain.columns import BUILT_CELL_COLUMNS
from scimtrain.ingest import (
    BUILD_RECORD,
    BuildOptions,
    IngestError,
    Source,
    SourceOptions,
    build_store,
    find_sources,
)
from scimtrain.store import CellArrStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bin"))
import build_store as cli

QUIET = BuildOptions(progress=False, chunk_cells=64)  # several chunks per file
LABELS = np.array(["CL:0000084", "CL:0000236", "CL:0000576", None], dtype=object)


# --------------------------------------------------------------------------- helpers


def counts(n_cells: int, n_genes: int, seed: int, density: float = 0.3) -> sp.csr_matrix:
    """Integer UMI counts as float32 CSR (as h5ad files usually hold them), some empty cells."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(4.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    dense[::17] = 0
    return sp.csr_matrix(dense.astype(np.float32))


def write_h5ad(path: Path, X, genes, obs: pd.DataFrame, var: pd.DataFrame | None = None,
               layers: dict | None = None, raw_X=None, raw_genes=None) -> Path:
    var = var if var is not None else pd.DataFrame(index=pd.Index(genes, dtype=str))
    adata = ad.AnnData(X=X, obs=obs, var=var, layers=layers or {})
    if raw_X is not None:
        adata.raw = ad.AnnData(X=raw_X, obs=obs, var=pd.DataFrame(index=raw_genes or genes))
    adata.write_h5ad(path)
    return path


def cells(prefix: str, n: int, seed: int, **columns) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(columns, index=[f"{prefix}{i}" for i in range(n)])
    frame["label"] = pd.Categorical(LABELS[rng.integers(0, len(LABELS), n)])
    return frame


GENES_A = [f"G{i}" for i in range(120)] + ["MT-CO1", "MT-ND1"]
GENES_B = [f"G{i}" for i in range(60, 200)] + ["mt-co1", "MT-CYB"]


@pytest.fixture
def two_files(tmp_path: Path):
    """File A: counts in X, study/sample/disease/doublet columns, label 'label'.
    File B: log data in X, counts in layers['counts'], other genes, label
    'cell_type_ontology_term_id', no study column (study = file stem)."""
    n_a, n_b = 300, 200
    obs_a = cells("a", n_a, 1, study=np.where(np.arange(n_a) < 200, "s1", "s2"),
                  donor=[f"d{i % 3}" for i in range(n_a)],
                  disease=np.where(np.arange(n_a) % 3 == 0, "lung adenocarcinoma", "normal"),
                  doublet=np.arange(n_a) % 10 == 0)
    obs_b = cells("b", n_b, 2).rename(columns={"label": "cell_type_ontology_term_id"})
    x_a, x_b = counts(n_a, len(GENES_A), 1), counts(n_b, len(GENES_B), 2)
    a = write_h5ad(tmp_path / "alpha.h5ad", x_a, GENES_A, obs_a)
    b = write_h5ad(tmp_path / "beta.h5ad", x_b.log1p(), GENES_B, obs_b,
                   layers={"counts": x_b.copy()})
    sources = [
        Source(a, SourceOptions(label_column="label", study_column="study",
                                sample_column="donor", disease_column="disease",
                                doublet_column="doublet")),
        Source(b, SourceOptions()),
    ]
    return {"sources": sources, "counts": [x_a, x_b], "obs": [obs_a, obs_b],
            "genes": [GENES_A, GENES_B]}


def remapped(x: sp.csr_matrix, genes: list[str], store_genes: list[str]) -> np.ndarray:
    """A file's counts in the store's gene order (zeros where the file lacks a gene)."""
    out = np.zeros((x.shape[0], len(store_genes)), dtype=np.float32)
    out[:, [store_genes.index(g) for g in genes]] = x.toarray()
    return out


# --------------------------------------------------------------------------- the build


def test_two_files_round_trip(tmp_path, two_files):
    out = tmp_path / "store"
    summary = build_store(out, two_files["sources"], QUIET)
    store = CellArrStore(out)
    genes_a, genes_b = two_files["genes"]
    union = genes_a + [g for g in genes_b if g not in genes_a]  # first-seen order
    assert list(store.gene_symbols) == union
    assert (store.n_cells, summary.n_cells, summary.n_genes) == (500, 500, len(union))
    assert [f[2] for f in summary.files] == ["X", "layers/counts"]
    assert not (tmp_path / "store.partial").exists()

    expected = np.vstack([remapped(x, g, union)
                          for x, g in zip(two_files["counts"], two_files["genes"])])
    assert np.array_equal(store.read_rows(np.arange(500)).toarray(), expected)

    meta = store.read_frame("cell_metadata")
    assert list(meta.columns) == list(BUILT_CELL_COLUMNS)
    obs_a, obs_b = two_files["obs"]
    labels = pd.concat([obs_a["label"].astype(object),
                        obs_b["cell_type_ontology_term_id"].astype(object)])
    assert list(meta["cellTypeOntologyID"]) == list(labels.fillna("nan"))
    assert list(meta["datasetID"]) == list(obs_a["study"]) + ["beta"] * 200
    assert list(meta["sampleID"]) == list(obs_a["donor"]) + ["beta"] * 200
    assert list(meta["cell_id"]) == list(obs_a.index) + list(obs_b.index)
    assert list(meta["predicted_doublets"]) == list(obs_a["doublet"].astype(int)) + [0] * 200
    assert np.allclose(meta["total_counts"], expected.sum(axis=1))
    assert list(meta["n_genes_by_counts"]) == list((expected > 0).sum(axis=1))
    is_mt = np.array([g.upper().startswith("MT-") for g in union])
    pct = 100 * expected[:, is_mt].sum(axis=1) / np.maximum(expected.sum(axis=1), 1)
    assert np.allclose(meta["pct_counts_mt"], pct)
    assert store.query_cells("total_counts>0 and pct_counts_mt<101", ["datasetID"]).shape[0] \
        == int((expected.sum(axis=1) > 0).sum())

    samples = store.sample_metadata().sort_values(["datasetID", "sampleID"])
    assert samples.values.tolist() == [
        ["beta", "beta", "nan"],
        ["s1", "d0", "lung adenocarcinoma"], ["s1", "d1", "normal"], ["s1", "d2", "normal"],
        ["s2", "d0", "lung adenocarcinoma"], ["s2", "d1", "normal"], ["s2", "d2", "normal"]]
    record = json.loads((out / BUILD_RECORD).read_text())
    assert record["status"] == "complete" and len(record["files"]) == 2


@pytest.mark.parametrize("layout", ["csc", "dense"])
def test_csc_and_dense_matrices_and_raw_x(tmp_path, layout):
    x = counts(150, 40, 3)
    genes = [f"G{i}" for i in range(40)]
    obs = cells("c", 150, 3)
    raw = x.tocsc() if layout == "csc" else x.toarray()
    # X holds log data over fewer genes; raw.X the counts over all of them: auto finds raw.X.
    path = write_h5ad(tmp_path / "f.h5ad", x[:, :30].log1p(), genes[:30], obs,
                      raw_X=raw, raw_genes=genes)
    build_store(tmp_path / "s", [Source(path, SourceOptions(label_column="label"))], QUIET)
    store = CellArrStore(tmp_path / "s")
    assert list(store.gene_symbols) == genes
    assert np.array_equal(store.read_rows(np.arange(150)).toarray(), x.toarray())


def test_cli_manifest_help_and_append(tmp_path, two_files, capsys):
    a, b = (s.path for s in two_files["sources"])
    manifest = tmp_path / "files.tsv"
    manifest.write_text("path\tlabel_column\tstudy_column\tsample_column\tdisease\n"
                        f"{a.name}\tlabel\tstudy\tdonor\thealthy\n")
    out = tmp_path / "store"
    assert cli.main([str(out), "--manifest", str(manifest), "--no-progress"]) == 0
    assert CellArrStore(out).n_cells == 300
    # Appending adds B's cells and new genes at the end; A's rows are untouched.
    assert cli.main([str(out), str(b), "--append", "--no-progress"]) == 0
    store = CellArrStore(out)
    genes_a, genes_b = two_files["genes"]
    union = genes_a + [g for g in genes_b if g not in genes_a]
    assert store.n_cells == 500 and list(store.gene_symbols) == union
    expected = np.vstack([remapped(x, g, union)
                          for x, g in zip(two_files["counts"], two_files["genes"])])
    assert np.array_equal(store.read_rows(np.arange(500)).toarray(), expected)
    assert set(store.sample_metadata()["disease"]) == {"healthy", "nan"}
    assert len(json.loads((out / BUILD_RECORD).read_text())["files"]) == 2
    assert "500 cells" in capsys.readouterr().out
    # The same file again would duplicate its samples: refused, the store left as it was.
    assert cli.main([str(out), str(b), "--append", "--no-progress"]) == 2
    assert "appending the same file twice" in capsys.readouterr().err
    assert CellArrStore(out).n_cells == 500 and not (tmp_path / "store.partial").exists()

    help_text = cli.parser().format_help()
    for option in ("--counts-layer", "--gene-column", "--label-column", "--study-column",
                   "--sample-column", "--disease-column", "--doublet-column", "--manifest",
                   "--append", "--overwrite", "--value-dtype"):
        assert option in help_text


# --------------------------------------------------------------------------- bad input


def one_file(tmp_path: Path, name: str = "f", X=None, genes=None, **kwargs) -> Path:
    X = counts(80, 30, 5) if X is None else X
    genes = genes if genes is not None else [f"G{i}" for i in range(X.shape[1])]
    return write_h5ad(tmp_path / f"{name}.h5ad", X, genes, cells(name, X.shape[0], 5), **kwargs)


def fails(tmp_path, sources, *match: str, out=None, **kwargs) -> IngestError:
    out = out or tmp_path / "out"
    with pytest.raises(IngestError) as info:
        build_store(out, sources, QUIET, **kwargs)
    for text in match:
        assert text in str(info.value)
    assert not (out.with_name(out.name + ".partial")).exists()
    return info.value


@pytest.mark.parametrize("values, problem", [
    (lambda x: x.log1p(), "non-integer"),
    (lambda x: x * -1.0, "negative"),
])
def test_no_raw_counts(tmp_path, values, problem):
    path = one_file(tmp_path, X=values(counts(80, 30, 5)))
    src = [Source(path, SourceOptions(label_column="label"))]
    fails(tmp_path, src, str(path), problem, "--counts-layer")
    assert not (tmp_path / "out").exists()
    # Naming an element that is missing says what the file has.
    named = [Source(path, SourceOptions(label_column="label", counts_layer="counts"))]
    fails(tmp_path, named, str(path), "has no 'counts'", "--counts-layer")


def test_bad_counts_past_the_checked_rows_stop_the_build(tmp_path, monkeypatch):
    x = counts(200, 30, 5).tolil()
    x[150, 3] = 0.5
    x = x.tocsr()
    monkeypatch.setattr(ingest, "CHECK_ROWS", 100)  # inspection sees only clean rows
    path = one_file(tmp_path, X=x)
    fails(tmp_path, [Source(path, SourceOptions(label_column="label"))],
          str(path), "rows 128-191", "non-integer")
    assert not (tmp_path / "out").exists()


def test_counts_too_large_for_uint16(tmp_path):
    x = counts(80, 30, 5).tolil()
    x[3, 3] = 70_000
    x = x.tocsr()
    path = one_file(tmp_path, X=x)
    with pytest.raises(IngestError, match="--value-dtype uint32"):
        build_store(tmp_path / "out", [Source(path, SourceOptions(label_column="label"))],
                    BuildOptions(progress=False, value_dtype="uint16"))
    build_store(tmp_path / "out", [Source(path, SourceOptions(label_column="label"))], QUIET)
    assert CellArrStore(tmp_path / "out").read_rows([3])[0, 3] == 70_000


def test_different_gene_naming(tmp_path):
    symbols = [f"G{i}" for i in range(30)]
    ensembl = [f"ENSG{i:011d}" for i in range(30)]
    a = one_file(tmp_path, "a", genes=symbols)
    b = one_file(tmp_path, "b", genes=ensembl,
                 var=pd.DataFrame({"feature_name": symbols}, index=ensembl))
    label = SourceOptions(label_column="label")
    err = fails(tmp_path, [Source(a, label), Source(b, label)], "Ensembl", "--gene-column",
                str(b), "feature_name")
    assert str(a) in str(err)
    # The fix the message names works.
    build_store(tmp_path / "out", [Source(a, label), Source(b, SourceOptions(
        label_column="label", gene_column="feature_name"))], QUIET)
    assert list(CellArrStore(tmp_path / "out").gene_symbols) == symbols
    # Other naming schemes (here mouse-style casing) show up as almost no shared genes.
    c = one_file(tmp_path, "c", genes=[f"Gene{i}" for i in range(30)])
    fails(tmp_path, [Source(a, label), Source(c, label)], str(c), "shares only 0%",
          "--gene-column", out=tmp_path / "out2")


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_gene_symbols(tmp_path):
    path = one_file(tmp_path, genes=[f"G{i}" for i in range(29)] + ["G3"])
    fails(tmp_path, [Source(path, SourceOptions(label_column="label"))],
          str(path), "duplicate gene symbols", "'G3'", "--gene-column")


def test_missing_label_or_study_column(tmp_path):
    path = one_file(tmp_path)
    fails(tmp_path, [path], str(path), "no label column", "'cellTypeOntologyID'",
          "--label-column", "['label']")
    fails(tmp_path, [Source(path, SourceOptions(label_column="label", study_column="study"))],
          str(path), "no study column 'study'", "--study-column")


def test_two_files_with_one_stem(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = one_file(tmp_path / "x", "same"), one_file(tmp_path / "y", "same")
    label = SourceOptions(label_column="label")
    fails(tmp_path, [Source(a, label), Source(b, label)], "both be study 'same'")


def test_output_folder_checks(tmp_path, two_files):
    out = tmp_path / "store"
    build_store(out, two_files["sources"][1:], QUIET)
    src = two_files["sources"][:1]
    fails(tmp_path, src, "already holds a store", "--append", "--overwrite", out=out)
    assert CellArrStore(out).n_cells == 200  # untouched
    build_store(out, src, QUIET, overwrite=True)
    assert CellArrStore(out).n_cells == 300
    assert not (tmp_path / "store.replaced").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    fails(tmp_path, src, "not a store", out=other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    build_store(empty, src, QUIET)  # an empty folder (cellarr wants one made) is fine
    assert CellArrStore(empty).n_cells == 300


def test_interrupted_build_leaves_no_store(tmp_path, two_files, monkeypatch):
    out = tmp_path / "store"
    original = ingest._convert
    calls = []

    def convert_then_crash(info, *args):
        calls.append(info.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the second file
        yield from original(info, *args)

    monkeypatch.setattr(ingest, "_convert", convert_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_store(out, two_files["sources"], QUIET)
    assert not out.exists() and not (tmp_path / "store.partial").exists()
    monkeypatch.setattr(ingest, "_convert", original)

    # A killed build leaves its partial folder: a rerun removes it and completes.
    partial = tmp_path / "store.partial"
    (partial / "counts").mkdir(parents=True)
    (partial / BUILD_RECORD).write_text('{"status": "building"}')
    build_store(out, two_files["sources"], QUIET)
    assert CellArrStore(out).n_cells == 500 and not partial.exists()

    # A folder of that name that is not ours is never removed.
    partial.mkdir()
    (partial / "keep.txt").write_text("x")
    with pytest.raises(IngestError, match="not made by build_store"):
        build_store(out, two_files["sources"], QUIET, overwrite=True)
    assert (partial / "keep.txt").exists() and CellArrStore(out).n_cells == 500


def test_failed_append_keeps_the_store(tmp_path, two_files, monkeypatch):
    out = tmp_path / "store"
    build_store(out, two_files["sources"][:1], QUIET)
    before = CellArrStore(out).read_rows(np.arange(300)).toarray()
    # The bad value sits past the rows inspection checks: the append fails while writing
    # counts into the hard-linked copy, which must not touch the store's own files.
    x = counts(200, 30, 5).tolil()
    x[150, 3] = 0.5
    monkeypatch.setattr(ingest, "CHECK_ROWS", 100)
    bad = one_file(tmp_path, "bad", X=x.tocsr())
    fails(tmp_path, [Source(bad, SourceOptions(label_column="label"))], "--counts-layer",
          out=out, append=True)
    store = CellArrStore(out)
    assert store.n_cells == 300 and np.array_equal(store.read_rows(np.arange(300)).toarray(),
                                                   before)
    assert json.loads((out / BUILD_RECORD).read_text())["status"] == "complete"


def test_find_sources(tmp_path):
    one_file(tmp_path, "b")
    one_file(tmp_path, "a")
    assert [s.path.name for s in find_sources([tmp_path])] == ["a.h5ad", "b.h5ad"]
    with pytest.raises(IngestError, match="does not exist"):
        find_sources([tmp_path / "nope.h5ad"])
    with pytest.raises(IngestError, match="local folder"):
        build_store("s3://bucket/atlas", find_sources([tmp_path]), QUIET)


# --------------------------------------------------------------------------- training reads it


def test_selection_and_training_on_a_built_store(tmp_path):
    """The selection (docs/scimilarity.md §2) with SCimilarity's defaults (filter, cancer
    exclusion, >= 2 studies) selects
    exactly the cells the built metadata says it should, without any extra option; then
    bin/train.py trains on the store."""
    from scimtrain import selection

    n = 150
    # ~600 of 650 genes expressed per cell, ~2,500 UMIs: cells pass n_genes_by_counts>500.
    genes_a = [f"G{i}" for i in range(640)] + ["MT-CO1", "MT-ND1"]
    genes_b = [f"G{i}" for i in range(40, 680)] + ["MT-CO1", "MT-CYB"]
    obs_a = cells("a", n, 11, donor=[f"d{i % 3}" for i in range(n)],
                  disease=np.where(np.arange(n) % 3 == 0, "acute myeloid leukemia", "normal"),
                  doublet=np.arange(n) % 25 == 0)
    obs_b = cells("b", n, 12)
    a = write_h5ad(tmp_path / "a.h5ad", counts(n, len(genes_a), 11, 0.95), genes_a, obs_a)
    b = write_h5ad(tmp_path / "b.h5ad", counts(n, len(genes_b), 12, 0.95), genes_b, obs_b)
    out = tmp_path / "store"
    build_store(out, [
        Source(a, SourceOptions(label_column="label", sample_column="donor",
                                disease_column="disease", doublet_column="doublet")),
        Source(b, SourceOptions(label_column="label"))], QUIET)

    store = CellArrStore(out)
    chosen = selection.select_cells(store)
    meta = store.read_frame("cell_metadata")
    cancer = (meta["datasetID"] == "a") & (meta["sampleID"] == "d0")
    passing = ((meta["cellTypeOntologyID"] != "nan") & (meta["total_counts"] > 1000)
               & (meta["n_genes_by_counts"] > 500) & (meta["pct_counts_mt"] < 20)
               & (meta["predicted_doublets"] == 0) & ~cancer)
    assert passing.sum() > 150  # the data are made to pass; the filter is what is tested
    assert list(chosen.train.index) == list(meta.index[passing])
    assert set(chosen.train["study"]) == {"a", "b"} and chosen.n_labels == 3
    assert len(chosen.gene_order) == store.n_genes

    train = Path(__file__).resolve().parents[1] / "bin" / "train.py"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", str(train), "--tiledb", str(out), "-b", "32", "-n",
         "3", "-e", "1", "--hidden_dim", "16", "--latent_dim", "4", "--num_workers", "0",
         "--no_progress", "--model_folder", str(tmp_path / "models"), "--result_folder",
         str(tmp_path / "results"), "--log_folder", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = tmp_path / "models" / "model_32_0.05_4_1_0.001_version_0"
    assert (model / "encoder.ckpt").is_file()
    assert (model / "gene_order.tsv").read_text().split() == list(store.gene_symbols)


def test_script_runs_as_a_command(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bin" / "build_store.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--no-progress",
                           str(tmp_path / "missing.h5ad")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and "missing.h5ad does not exist" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_without_cells_is_refused_by_name(tmp_path):
    path = write_h5ad(tmp_path / "empty.h5ad", sp.csr_matrix((0, 3), dtype=np.float32),
                      ["G0", "G1", "G2"], pd.DataFrame({"label": pd.Categorical([])},
                                                       index=pd.Index([], dtype=str)))
    script = Path(__file__).resolve().parents[1] / "bin" / "build_store.py"
    done = subprocess.run([sys.executable, str(script),
                           str(tmp_path / "out"), str(path), "--label-column", "label"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path} holds no cells (0 rows): remove it from the inputs" in done.stderr
