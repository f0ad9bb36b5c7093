"""The Trainer and bin/train.py: end to end, two processes, exact resume, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scimtrain import checkpoint as checkpoint_module
from scimtrain.checkpoint import CheckpointError, load_file
from scimtrain.config import parse_args
from scimtrain.model import Encoder
from scimtrain.trainer import weights_digest
from tests.conftest import NAME, SMALL, TRAIN, make_trainer, run_folder, small_run_flags

REPO = Path(__file__).resolve().parents[1]
SPEC_TRAIN_TAGS = {"loss", "triplet_loss", "mse", "hard_triplets", "num_nonzero_loss",
                   "num_hard_triplets", "num_viable_triplets", "l1_penalty", "lr"}
SPEC_VAL_TAGS = {"loss", "triplet_loss", "mse", "hard_triplets", "num_nonzero_loss",
                 "num_hard_triplets", "num_viable_triplets", "asw", "nmse",
                 "evaluation_metric"}


def run_script(args: list[str], launcher: list[str] | None = None, timeout: int = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run((launcher or [sys.executable]) + [TRAIN] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one set of logs
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_train_script_end_to_end(tiny_store, tmp_path):
    done = run_script(small_run_flags(tiny_store, tmp_path))
    name = "model_48_0.05_8_2_0.001_t"
    folder = tmp_path / "models" / name
    # docs/scimilarity.md §7, read the way SCimilarity's CellEmbedding reads it.
    genes = (folder / "gene_order.tsv").read_text().split()
    sizes = json.loads((folder / "layer_sizes.json").read_text())
    layers = [(k, sizes[k]) for k in sorted(sizes) if "weight" in k and len(sizes[k]) > 1]
    encoder = Encoder(len(genes), latent_dim=layers[-1][1][0],
                      hidden_dim=[shape[0] for _, shape in layers[:-1]])
    encoder.load_state_dict(torch.load(folder / "encoder.ckpt", weights_only=True)["state_dict"])
    assert (layers[-1][1][0], [s[0] for _, s in layers[:-1]]) == (8, [32, 32])
    assert layers[0][0] == "network.0.1.weight"
    encoder.eval()
    out = encoder(torch.rand(5, len(genes)))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    decoder = torch.load(folder / "decoder.ckpt", weights_only=True)["state_dict"]
    assert decoder["network.2.weight"].shape == (len(genes), 32)
    labels = pd.read_csv(folder / "label_ints.csv", index_col=0)["0"].to_dict()
    assert list(labels) == list(range(len(labels))) and list(labels.values()) == sorted(
        labels.values())
    hyper = json.loads((folder / "hyperparameters.json").read_text())
    assert {"latent_dim", "hidden_dim", "dropout", "input_dropout", "margin",
            "triplet_loss_weight", "negative_selection", "sample_across_studies",
            "perturb_labels", "perturb_labels_fraction", "lr", "l1_lambda", "l2_lambda",
            "batch_size", "max_epochs"} <= set(hyper)
    assert json.loads((folder / "metadata.json").read_text())["store"] == tiny_store
    train_cells = pd.read_csv(folder / "train_cells.csv.gz", index_col=0)
    assert set(train_cells["label_name"]) == set(labels.values())
    val_cells = pd.read_csv(folder / "val_cells.csv.gz", index_col=0)
    assert set(val_cells["study"]) == {"study_04", "study_05"}
    metrics = json.loads((tmp_path / "results" / name / f"{name}.test.json").read_text())
    assert SPEC_VAL_TAGS <= set(metrics)
    assert metrics["evaluation_metric"] == pytest.approx((1 - metrics["asw"]) / 2
                                                         + metrics["nmse"])
    tags = scalar_tags(tmp_path / "logs" / name / "t")
    assert {f"train/{t}" for t in SPEC_TRAIN_TAGS} <= tags
    assert {f"val/{t}" for t in SPEC_VAL_TAGS} <= tags
    assert {"time/data_wait", "time/forward", "time/mining", "time/backward",
            "train/cells_per_s"} <= tags
    assert "labels" in done.stdout  # the selection summary
    # best/ holds the weights of the epoch with the lowest validation evaluation_metric: the
    # epoch-end checkpoint of that epoch (2 epochs of 4 steps, both checkpoints kept).
    run_dir = tmp_path / "logs" / name / "t"
    scores = scalar_values(run_dir, "val/evaluation_metric")
    best_step = min(scores, key=scores.get)
    saved = load_file(run_dir / "checkpoints" / f"step-{best_step:08d}" / "trainer.pt")["model"]
    best = torch.load(folder / "best" / "encoder.ckpt", weights_only=True)["state_dict"]
    assert best.keys() and all(torch.equal(best[k], saved[f"encoder.{k}"]) for k in best)
    again = run_script(small_run_flags(tiny_store, tmp_path))
    assert "already exists" in again.stdout


def scalar_values(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))))
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars(tag)}


@pytest.mark.slow
def test_two_processes_train_one_model(tiny_store, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU forms one gloo group."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29517"]
    flags = small_run_flags(tiny_store, tmp_path)
    flags[flags.index("--num_workers") + 1] = "1"
    run_script(flags, launcher=launcher, timeout=600)
    name = "model_48_0.05_8_2_0.001_t"
    run_dir = tmp_path / "logs" / name / "t"
    scalar_tags(run_dir)  # exactly one event file
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    ranks = [load_file(checkpoint / f"rank-{r}.pt") for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all("MULTI_CPU" in r["distributed_type"] for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients in sync
    assert ranks[0]["batches_sha256"] != ranks[1]["batches_sha256"]  # different batches
    assert [r["data"]["rank"] for r in ranks] == [0, 1]
    assert (tmp_path / "models" / name / "encoder.ckpt").is_file()
    assert not list((tmp_path / "models").glob("*/.tmp*"))


# --------------------------------------------------------------------------- in-process


class Killed(Exception):
    pass


def kill_at(step_number: int):
    def wrap(objective):
        def step(model, batch, ctx):
            if ctx.step == step_number:
                raise Killed(f"killed before step {step_number}")
            return objective(model, batch, ctx)
        return step
    return wrap


@pytest.fixture
def two_threads():
    """Two torch threads: exactness must hold with multi-threaded kernels (issue 17)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_exact_resume_mid_epoch(parts, tmp_path, two_threads):
    """Two loader workers, two threads: killed mid-epoch and resumed, bit for bit."""
    reference = make_trainer(parts, tmp_path / "reference", num_workers=2)
    reference.fit()
    expected = weights_digest(reference.raw_model)
    interrupted = make_trainer(parts, tmp_path / "run", kill_at(6), num_workers=2)  # epoch 1
    with pytest.raises(Killed):
        interrupted.fit()
    assert [p.name for p in interrupted.checkpoints.complete()] == ["step-00000004",
                                                                     "step-00000005"]
    assert interrupted.run_dir == run_folder(tmp_path / "run")
    resumed = make_trainer(parts, tmp_path / "run", num_workers=2)
    history = resumed.fit()
    assert weights_digest(resumed.raw_model) == expected  # bitwise
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history == reference.state.history  # validation too, exactly


def test_resume_after_kill_while_writing_a_checkpoint(parts, tmp_path, monkeypatch):
    reference = make_trainer(parts, None)
    reference.fit()
    run = make_trainer(parts, tmp_path / "run")
    real_save = checkpoint_module.save_file

    def dying_save(obj, path):
        if "step-00000008" in str(path) and path.name == "trainer.pt":
            path.write_bytes(b"half a checkpoint")  # the bytes a kill would leave
            raise Killed("killed while writing")
        real_save(obj, path)

    monkeypatch.setattr("scimtrain.trainer.save_file", dying_save)
    with pytest.raises(Killed):
        run.fit()
    monkeypatch.setattr("scimtrain.trainer.save_file", real_save)
    folder = run.checkpoints
    assert folder.latest().name == "step-00000005"  # the half-written one is not a candidate
    assert (folder.folder / ".tmp-step-00000008").is_dir()
    resumed = make_trainer(parts, tmp_path / "run")
    resumed.fit()
    assert weights_digest(resumed.raw_model) == weights_digest(reference.raw_model)
    assert not list(folder.folder.glob(".tmp-*"))  # cleaned by the next save


def test_resume_refuses_other_settings(parts, tmp_path):
    make_trainer(parts, tmp_path / "run", max_epochs=1).fit()
    with pytest.raises(CheckpointError, match="other settings"):
        make_trainer(parts, tmp_path / "run", max_epochs=1, lr=0.1).fit()
    trainer = make_trainer(parts, tmp_path / "run", max_epochs=1, lr=0.1, resume="none")
    trainer.fit()
    assert trainer.state.step == 5


def test_bf16_on_cpu_runs(parts):
    trainer = make_trainer(parts, None, max_epochs=1, mixed_precision="bf16")
    history = trainer.fit()
    assert trainer.state.step == 5
    assert trainer.accelerator.mixed_precision == "bf16"
    assert np.isfinite(history[-1]["loss"]) and np.isfinite(history[-1]["asw"])


def readme_examples() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Embedding the loop in your own code",
                                                      1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_build_training_example_runs(tiny_store, tmp_path, monkeypatch):
    """The README's build_training example, as written but for the store and run size."""
    code = readme_examples()[0]
    line = re.search(r"config = scimtrain\.TrainingConfig\(.*?\)\n", code, re.S).group(0)
    small = {k: v for k, v in SMALL.items() if k != "checkpoint_every"}
    code = code.replace(line, f"config = scimtrain.TrainingConfig(tiledb={tiny_store!r}, "
                              f"**{small!r})\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["test_metrics"]
    assert metrics == json.loads((tmp_path / "results" / NAME / f"{NAME}.test.json").read_text())
    assert (tmp_path / "models" / NAME / "encoder.ckpt").is_file()
    assert "train/labels_per_batch" in scalar_tags(tmp_path / "logs" / NAME / "t")


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    """The README's plain Trainer example, executed as written."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_examples()[1], "README.md", "exec"), namespace)
    history, trainer = namespace["history"], namespace["trainer"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    model = trainer.raw_model.eval()
    with torch.no_grad():  # the logged accuracy is the final model's on the validation data
        accuracy = np.mean([float((model(x).argmax(1) == y).float().mean())
                            for x, y in namespace["batches"][:4]])
    assert history[-1]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert (tmp_path / "runs" / "classifier" / "checkpoints").is_dir()


@pytest.mark.slow
def test_rank_without_triplets_does_not_hang(tmp_path):
    """Two processes; rank 1's batches hold one label in one study: no triplet there."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "29518", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["digest"] == reports[1]["digest"]  # parameters in sync
    assert reports[1]["triplets"] == [1] * 4  # only SCimilarity's dummy triplet
    assert max(reports[0]["triplets"]) > 1  # rank 0 mines real triplets


DDP_SCRIPT = '''
import json, sys
import torch
from scimtrain.losses import LossConfig, mine_triplets
from scimtrain.model import EncoderDecoder
from scimtrain.objective import MetricLearningObjective
from scimtrain.trainer import Trainer, TrainerConfig, make_accelerator, weights_digest

accelerator = make_accelerator()
rank = accelerator.process_index
g = torch.Generator().manual_seed(rank)
batches = []
for _ in range(4):
    x = torch.rand(16, 20, generator=g)
    if rank == 0:
        labels, studies = torch.arange(16) % 4, (torch.arange(16) // 4) % 2
    else:
        labels, studies = torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long)
    batches.append((x, labels, studies))
descendant = torch.zeros(4, 4, dtype=torch.bool)
objective = MetricLearningObjective(descendant, LossConfig(), l1=0.0)
seen = []

def step(model, batch, ctx):
    emb = model(batch[0])[0]
    a, *_ = mine_triplets(emb.detach(), batch[1], batch[2], descendant, margin=0.05,
                          selection="semihard", generator=torch.Generator().manual_seed(0))
    seen.append(int(a.numel()))
    return objective(model, batch, ctx)

torch.manual_seed(0)
trainer = Trainer(EncoderDecoder(20, latent_dim=4, hidden_dim=[8]), step, batches,
                  config=TrainerConfig(max_epochs=1, progress=False), accelerator=accelerator)
trainer.fit()
out = {"world": accelerator.num_processes, "digest": weights_digest(trainer.raw_model),
       "triplets": seen}
open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps(out))
'''


# --------------------------------------------------------------------------- the command line


def test_bad_flags_are_named(capsys):
    for argv, message in [(["-b", "0"], "batch_size must be at least 1"),
                          (["--margin", "-1"], "margin must be > 0"),
                          (["-t", "nearest"], "invalid choice: 'nearest'"),
                          (["--gene_order", "/no/such/file"],
                           "gene_order /no/such/file: no such file"),
                          (["--dropout", "1.5"], "dropout must be below 1"),
                          (["-b", "64.7"], "batch_size must be an integer, got '64.7'")]:
        with pytest.raises(SystemExit):
            parse_args(["--tiledb", "x"] + argv)
        assert message in capsys.readouterr().err


def test_config_files(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"tiledb": "store", "batch_size": 64,
                                                 "hidden_dim": [16, 16]}))
    args = parse_args(["--config", str(tmp_path / "c.json"), "-b", "32"])
    assert (args.tiledb, args.batch_size, args.hidden_dim) == ("store", 32, [16, 16])
    (tmp_path / "c.yaml").write_text("tiledb: s\nmargin: 0.1\nval_studies: [a, b]\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (args.margin, args.val_studies) == (0.1, ["a", "b"])
    (tmp_path / "c.toml").write_text('tiledb = "s"\nlr = 0.01\n')
    assert parse_args(["--config", str(tmp_path / "c.toml")]).lr == 0.01
    (tmp_path / "bad.json").write_text(json.dumps({"tiledb": "s", "batchsize": 5}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "bad.json")])
    assert "unknown keys ['batchsize']" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "broken.json")])
    assert "is not valid json" in capsys.readouterr().err


def test_demo_defaults_apply_only_without_a_store():
    demo = parse_args([])
    assert (demo.tiledb, demo.batch_size, demo.suffix) == (None, 256, "demo")
    real = parse_args(["--tiledb", "x"])
    assert (real.batch_size, real.max_epochs, real.hidden_dim, real.num_workers) == (
        1000, 500, [1024, 1024, 1024], 8)
