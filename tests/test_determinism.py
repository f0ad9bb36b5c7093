"""Issue 17: two identical CPU runs with more than one torch thread end bitwise equal.

The runs are separate ``bin/train.py`` processes with ``OMP_NUM_THREADS=2`` (tests/test_train.py
runs its scripts with one thread, which hid the bug), on a store shaped like the issue's
(765 genes, 10 labels, 2 training studies, batch 200) and on the demo's shape.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scimtrain.config import DEMO_DEFAULTS
from scimtrain.determinism import CUBLAS_WORKSPACE, configure
from scimtrain.losses import triplet_loss
from scimtrain.synthetic import SyntheticConfig, make_synthetic_store
from tests.conftest import hand_store, random_counts

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "bin" / "train.py")
THREADS = "2"  # at least 2: with one thread every kernel is trivially ordered
# The issue's store: PBMC-like label mix (skewed: many same-label pairs, so many triplets).
LABELS = {"CL:0000624": 0.25, "CL:0000625": 0.15, "CL:0000236": 0.12, "CL:0000623": 0.10,
          "CL:0000860": 0.12, "CL:0000875": 0.06, "CL:0000784": 0.05, "CL:0000786": 0.05,
          "CL:0000097": 0.05, "CL:0000451": 0.05}
STUDIES = ("PBMC-A", "PBMC-B", "PBMC-C", "PBMC-D")


def threaded_env() -> dict[str, str]:
    """The environment of a default multi-threaded run: no thread count forced to 1."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    return dict(env, OMP_NUM_THREADS=THREADS, PYTHONWARNINGS="ignore")


def train(flags: list[str], out: Path) -> Path:
    """Run bin/train.py with 2 torch threads; returns the model folder."""
    done = subprocess.run(
        [sys.executable, TRAIN, *flags, "--no_progress", "--model_folder", str(out / "models"),
         "--result_folder", str(out / "results"), "--log_folder", str(out / "logs")],
        env=threaded_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    folders = [p.parent for p in (out / "models").glob("*/encoder.ckpt")]
    assert len(folders) == 1, folders
    return folders[0]


def assert_same_weights(first: Path, second: Path) -> None:
    """Encoder and decoder of two model folders are equal bit for bit."""
    for name in ("encoder.ckpt", "decoder.ckpt"):
        a = torch.load(first / name, weights_only=True)["state_dict"]
        b = torch.load(second / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        differ = {k: float((a[k].double() - b[k].double()).abs().max())
                  for k in a if not torch.equal(a[k], b[k])}
        assert not differ, f"{name}: tensors differ between two identical runs " \
                           f"(largest difference per tensor): {differ}"


def test_child_processes_run_with_two_threads():
    """The premise of the run tests: their processes use 2 torch threads."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          env=threaded_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.stdout.strip() == THREADS, done.stderr


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    yield
    torch.set_num_threads(before)


def test_triplet_loss_gradient_repeats_bitwise_with_two_threads(two_threads):
    """3,000 triplets x 32 dimensions: above the size where indexing's backward went parallel
    (atomic adds in thread-arrival order)."""
    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
    anchor, positive, negative = torch.randint(0, 200, (3, 3000), generator=g)

    def gradient() -> torch.Tensor:
        leaf = embeddings.clone().requires_grad_()
        loss, per = triplet_loss(leaf, anchor, positive, negative, margin=0.5)
        (loss + per.square().sum()).backward()
        return leaf.grad

    first = gradient()
    runs_that_differ = sum(not torch.equal(gradient(), first) for _ in range(20))
    assert runs_that_differ == 0


def issue_store(path: Path) -> str:
    """700 cells x 765 genes, 10 labels, 4 studies of 2 samples (as the issue's PBMC store)."""
    rng = np.random.default_rng(17)
    n = 700
    labels = rng.choice(list(LABELS), size=n, p=np.array(list(LABELS.values())))
    studies = np.repeat(STUDIES, n // len(STUDIES))
    cells = pd.DataFrame({"cellTypeOntologyID": labels, "datasetID": studies,
                          "sampleID": [f"{s}-{i % 2}" for i, s in enumerate(studies)],
                          "total_counts": 5000.0, "n_genes_by_counts": 1000,
                          "pct_counts_mt": 1.0, "predicted_doublets": 0})
    counts = random_counts(n, 765, seed=17, density=0.3).toarray()
    # A label-specific block of genes, so the embedding has something to learn.
    for i, label in enumerate(LABELS):
        counts[np.ix_(labels == label, np.arange(i * 20, i * 20 + 20))] += 8.0
    return hand_store(path, cells, sp.csr_matrix(counts), genes=[f"G{i}" for i in range(765)])


def test_two_runs_equal_on_the_issue_store(tmp_path):
    store = issue_store(tmp_path / "store")
    flags = ["--tiledb", store, "--filter_condition", "cellTypeOntologyID!='nan'",
             "--val_studies", "PBMC-C", "PBMC-D", "-b", "200", "-n", "6", "-e", "1",
             "--val_batches", "1", "--hidden_dim", "256", "256", "--latent_dim", "32",
             "--num_workers", "0", "--suffix", "det"]
    assert_same_weights(train(flags, tmp_path / "one"), train(flags, tmp_path / "two"))


def demo_flags(store: str, max_epochs: int) -> list[str]:
    """The demo run's settings (DEMO_DEFAULTS) on ``store``, for fewer epochs."""
    flags = ["--tiledb", store]
    for key, value in {**DEMO_DEFAULTS, "max_epochs": max_epochs}.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *map(str, values)]
    return flags


def test_two_runs_equal_on_the_demo_shape(tmp_path):
    """The demo's model, batch, workers and studies; a smaller store of the same simulation."""
    store = make_synthetic_store(tmp_path / "demo", SyntheticConfig(n_cells=2000, n_genes=2000),
                                 progress=False)
    flags = demo_flags(store, max_epochs=1)
    assert_same_weights(train(flags, tmp_path / "one"), train(flags, tmp_path / "two"))


def test_configure_sets_and_clears_the_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        on = configure(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert on == {"deterministic": True, "cublas_workspace": CUBLAS_WORKSPACE,
                      "cudnn_deterministic": True}
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice is kept
        assert configure(True)["cublas_workspace"] == ":16:8"
    finally:
        off = configure(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not off["deterministic"] and not torch.backends.cudnn.deterministic
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        configure("yes")  # type: ignore[arg-type]
