"""Training state and user input under the failures users meet: kills, preemption, corrupt
checkpoints, two runs in one folder, changed settings, bad config values, bad output folders."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scimtrain import runlock
from scimtrain.build import build_training
from scimtrain.checkpoint import CheckpointError
from scimtrain.config import DEMO_DEFAULTS, TrainingConfig, parse_args
from scimtrain.trainer import weights_digest
from tests.conftest import NAME, TINY_FILTER, TRAIN, make_trainer, run_folder, small_run_flags


def env(threads: int = 2) -> dict:
    # Two torch threads: exactness must hold with the default multi-threaded kernels.
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))


def flags(store: str, out: Path, *extra: str, epochs: int = 3) -> list[str]:
    base = small_run_flags(store, out)
    base[base.index("--num_workers") + 1] = "2"
    base[base.index("-e") + 1] = str(epochs)
    return base + ["--checkpoint_every", "3", *extra]


def start(args: list[str]) -> subprocess.Popen:
    """A run in the foreground: Ctrl-C (SIGINT) acts even when the tests themselves were
    started in the background, whose SIGINT is ignored and would be inherited."""
    return subprocess.Popen([sys.executable, TRAIN, *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, TRAIN, *args], env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def wait_for(predicate, timeout: float = 300, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def encoder_state(out: Path) -> dict:
    return torch.load(out / "models" / NAME / "encoder.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpoints(out: Path) -> list[Path]:
    folder = out / "logs" / NAME / "t" / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


# --------------------------------------------------------------------------- 1. exact resume


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_kill_9_and_resume_is_exact_with_two_workers(tiny_store, tmp_path, method):
    """kill -9 mid-run, start again: the weights equal an uninterrupted run's, bit for bit."""
    args = ["--worker_start_method", method]
    finish(flags(tiny_store, tmp_path / "reference", *args))
    out = tmp_path / "killed"
    run = start(flags(tiny_store, out, *args))
    wait_for(lambda: any(p.name >= "step-00000006" for p in checkpoints(out)), process=run)
    os.killpg(run.pid, signal.SIGKILL)  # the run and its loader workers, no clean-up
    run.wait()
    assert not (out / "models" / NAME).exists()
    done = finish(flags(tiny_store, out, *args))
    assert "resumed from" in done.stdout
    assert_same_weights(encoder_state(out), encoder_state(tmp_path / "reference"))


# --------------------------------------------------------------------------- 2. epoch's end


def test_checkpoint_on_an_epochs_last_step_does_not_replay_it(parts, tmp_path):
    """Killed during validation after a step checkpoint on the epoch's last step."""
    reference = make_trainer(parts, None, checkpoint_every=5)
    reference.fit()

    class Killed(Exception):
        pass

    def dies_in_first_validation(objective):
        def step(model, batch, ctx):
            if not ctx.training and ctx.step == 5:
                raise Killed
            return objective(model, batch, ctx)
        return step

    with pytest.raises(Killed):
        make_trainer(parts, tmp_path / "run", dies_in_first_validation,
                     checkpoint_every=5).fit()
    resumed = make_trainer(parts, tmp_path / "run", checkpoint_every=5)
    history = resumed.fit()
    assert resumed.state.step == 15  # 3 epochs of 5 steps, epoch 0 not trained twice
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert weights_digest(resumed.raw_model) == weights_digest(reference.raw_model)


# --------------------------------------------------------------------------- 3. corrupt newest


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(parts, tmp_path):
    reference = make_trainer(parts, None)
    reference.fit()

    class Killed(Exception):
        pass

    def dies_at_step_9(objective):
        def step(model, batch, ctx):
            if ctx.training and ctx.step == 9:
                raise Killed
            return objective(model, batch, ctx)
        return step

    with pytest.raises(Killed):
        make_trainer(parts, tmp_path / "run", dies_at_step_9).fit()
    folder = run_folder(tmp_path / "run") / "checkpoints"
    newest, older = folder / "step-00000008", folder / "step-00000005"
    assert newest.is_dir() and older.is_dir()
    data = (newest / "trainer.pt").read_bytes()
    (newest / "trainer.pt").write_bytes(data[: len(data) // 3])  # truncated: a full disk
    resumed = make_trainer(parts, tmp_path / "run")
    with pytest.warns(UserWarning, match="step-00000008.*resuming from .*step-00000005"):
        resumed.fit()
    assert weights_digest(resumed.raw_model) == weights_digest(reference.raw_model)
    for path in folder.glob("step-*"):
        (path / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint .* can be read"):
        make_trainer(parts, tmp_path / "run").fit()


# --------------------------------------------------------------------------- 4. one run a folder


def test_second_run_in_the_same_folder_is_refused_and_a_dead_lock_taken_over(parts, tmp_path):
    run_dir = run_folder(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scimtrain import runlock; "
         f"runlock.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runlock.RunLockedError, match=f"process {holder.pid} on "):
        make_trainer(parts, tmp_path / "run", max_epochs=1).fit()
    assert not (run_dir / "checkpoints").exists()  # refused before writing anything
    holder.kill()  # kill -9: the lock file stays, the lock goes with the process
    holder.wait()
    trainer = make_trainer(parts, tmp_path / "run", max_epochs=1)
    trainer.fit()
    assert trainer.state.step == 5
    runlock.acquire(run_dir)  # released after fit: free again
    runlock.release(run_dir)


# --------------------------------------------------------------------------- 5. data settings


def config(store: str, out: Path, **changes) -> TrainingConfig:
    values = dict(tiledb=store, filter_condition=TINY_FILTER, val_studies=["study_04",
                  "study_05"], batch_size=48, n_batches=3, max_epochs=1, val_batches=1,
                  hidden_dim=[16], latent_dim=8, num_workers=0, no_progress=True, suffix="t",
                  model_folder=str(out / "models"), result_folder=str(out / "results"),
                  log_folder=str(out / "logs"))
    return TrainingConfig(**{**values, **changes})


def test_resume_with_other_data_settings_is_refused(tiny_store, tmp_path):
    build_training(config(tiny_store, tmp_path)).trainer.fit()
    other = config(tiny_store, tmp_path, val_studies=["study_04"], val_min_studies=1)
    with pytest.raises(CheckpointError, match="val_studies: \\['study_04', 'study_05'\\] in "
                       "the checkpoint, \\['study_04'\\] now"):
        build_training(other).trainer.fit()
    with pytest.raises(CheckpointError, match="filter_condition"):
        build_training(config(tiny_store, tmp_path, filter_condition=TINY_FILTER.replace(
            ">300", ">301"))).trainer.fit()


# --------------------------------------------------------------------------- 6. preemption


@pytest.mark.slow
@pytest.mark.parametrize("sig, to", [(signal.SIGTERM, "job"), (signal.SIGUSR1, "process")])
def test_preemption_signal_checkpoints_and_exits(tiny_store, tmp_path, sig, to):
    """To the training process, or to every process of the job, loader workers included (as
    SLURM sends SIGTERM): finish the step, checkpoint, exit 128 + the signal, no traceback."""
    out = tmp_path / "run"
    args = flags(tiny_store, out, "--checkpoint_every", "0", epochs=100_000)  # until signalled
    run = start(args)
    wait_for(lambda: any(checkpoints(out)), process=run)  # the first epoch is done
    if to == "job":  # the run leads its own process group (start_new_session)
        os.killpg(run.pid, sig)
    else:
        os.kill(run.pid, sig)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name} after step" in err
    assert "Run the same command again to continue" in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert (checkpoints(out)[-1]).name == f"step-{step:08d}"
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigint_in_the_foreground_and_the_background(tiny_store, tmp_path):
    """Foreground: Ctrl-C ends the run with one line. Background (the shell ignores SIGINT
    for it): SIGINT is ignored, as asked, instead of crashing inside TileDB's handler."""
    out = tmp_path / "run"
    args = flags(tiny_store, out, "--checkpoint_every", "0", epochs=100_000)  # until signalled
    run = start(args)
    wait_for(lambda: any(checkpoints(out)), process=run)
    os.kill(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, err[-3000:]
    assert "run the same command again" in err and "Traceback" not in err
    background = subprocess.Popen(
        [sys.executable, TRAIN, *args], env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    newest = checkpoints(out)[-1].name
    # Training (and so its signal handling) has started once it writes a newer checkpoint.
    wait_for(lambda: checkpoints(out)[-1].name > newest, process=background)
    os.kill(background.pid, signal.SIGINT)
    time.sleep(2)
    assert background.poll() is None  # still training (was: rc 139, a segfault)
    os.kill(background.pid, signal.SIGTERM)
    out_text, err = background.communicate(timeout=300)
    assert background.returncode == 128 + signal.SIGTERM, out_text[-2000:] + err[-3000:]


# --------------------------------------------------------------------------- 7. config files


def test_config_file_values_go_through_the_flags_types(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("tiledb: s\nval_studies: study_06\nhidden_dim: 64\nsparse_batches: 'false'\n"
                    "exclude_studies: [2019, b]\n")
    cfg = parse_args(["--config", str(good)])
    assert cfg.val_studies == ["study_06"] and cfg.hidden_dim == [64]
    assert cfg.sparse_batches is False and cfg.exclude_studies == ["2019", "b"]
    for text, message in [("batch_size: 64.7", "batch_size must be an integer, got 64.7"),
                          ("cross: 5", "cross must be one of [0, 1], got 5"),
                          ("sparse_batches: maybe", "sparse_batches must be true or false"),
                          ("hidden_dim: [64, x]", "hidden_dim must be an integer, got 'x'")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"tiledb: s\n{text}\n")
        with pytest.raises(SystemExit):
            parse_args(["--config", str(bad)])
        err = capsys.readouterr().err
        assert f"config file {bad}: {message}" in err and err.count("\n") == 1


def test_training_config_validates_itself(tmp_path):
    with pytest.raises(ValueError, match="latent_dim must be at least 1"):
        TrainingConfig(latent_dim=0)
    with pytest.raises(ValueError, match="unknown keys \\['batchsize'\\]"):
        TrainingConfig.from_mapping({"batchsize": 3})
    assert TrainingConfig(val_studies="a").val_studies == ["a"]
    assert TrainingConfig().model_name == "model_1000_0.05_128_3_0.001_version_0"
    assert parse_args([]).batch_size == DEMO_DEFAULTS["batch_size"]


# --------------------------------------------------------------------------- 8-9. outputs, errors


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], env=env(1), capture_output=True,
                          text=True, timeout=300)


def test_output_folders_are_checked_before_training(tiny_store, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for flag in ("--model_folder", "--result_folder"):
        args = small_run_flags(tiny_store, tmp_path)
        args[args.index(flag) + 1] = str(tmp_path / "file" / "sub")
        done = run_cli(args)
        assert done.returncode == 2
        assert f"{flag}: cannot make the folder" in done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        assert not (tmp_path / "logs" / NAME / "t" / "checkpoints").exists()  # no training


def test_rerun_writes_a_missing_test_json(tiny_store, tmp_path):
    args = small_run_flags(tiny_store, tmp_path)
    assert run_cli(args).returncode == 0
    result = tmp_path / "results" / NAME / f"{NAME}.test.json"
    first = json.loads(result.read_text())
    result.unlink()
    again = run_cli(args)
    assert again.returncode == 0 and "running its test pass only" in again.stdout
    assert json.loads(result.read_text()) == first  # same weights, same test cells
    assert "already exists: nothing to train" in run_cli(args).stdout


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tiny_store, tmp_path):
    args = small_run_flags(tiny_store, tmp_path)
    args[args.index("--tiledb") + 1] = str(tmp_path / "no_store")
    done = run_cli(args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("scimtrain-train: error: ") and done.stderr.count("\n") == 1
    debug = run_cli(args + ["--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --------------------------------------------------------------------------- 12. stale builds


def test_stale_demo_store_builds_are_removed(tmp_path, monkeypatch):
    from scimtrain import cli
    from scimtrain.synthetic import SIMULATION_VERSION

    monkeypatch.setenv("SCIMTRAIN_CACHE", str(tmp_path))
    name = f"demo-store-v{SIMULATION_VERSION}"
    (tmp_path / name).mkdir()  # a finished store (not rebuilt)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp-{name}.{dead.pid}").mkdir()  # left by a killed build
    (tmp_path / f".tmp-{name}.{os.getpid()}").mkdir()  # a live build
    assert cli.demo_store() == str(tmp_path / name)
    assert not (tmp_path / f".tmp-{name}.{dead.pid}").exists()
    assert (tmp_path / f".tmp-{name}.{os.getpid()}").exists()


# --------------------------------------------------------------------------- 10-11. messages


def select(store: str, **changes):
    from scimtrain.ontology import CellOntology
    from scimtrain.selection import SelectionConfig, select_cells
    from scimtrain.store import CellArrStore

    ontology = changes.pop("ontology", None)
    ontology = CellOntology.default() if ontology is None else ontology
    settings = {"filter_condition": TINY_FILTER, **changes}
    return select_cells(CellArrStore(store), SelectionConfig(**settings), ontology)


def test_validation_that_would_vanish_is_an_error(tiny_store):
    from scimtrain.selection import SelectionError

    with pytest.raises(SelectionError, match=r"validation studies \['study_99'\] have no cells.*"
                       r"its studies are \['study_00', 'study_01'"):
        select(tiny_store, val_studies=("study_04", "study_99"))
    with pytest.raises(SelectionError, match="validation split .* is empty.*"
                       "--val_min_studies 1"):
        select(tiny_store, val_studies=("study_04",))
    one = select(tiny_store, val_studies=("study_04",), val_min_studies=1)
    assert set(one.val["study"]) == {"study_04"}


def test_a_filter_that_keeps_nothing_names_its_clauses(tiny_store):
    from scimtrain.selection import SelectionError

    with pytest.raises(SelectionError) as caught:
        select(tiny_store, filter_condition="total_counts>300 and n_genes_by_counts>500")
    message = str(caught.value)
    assert "Cells each clause keeps on its own" in message
    assert "n_genes_by_counts > 500: 0" in message
    assert re.search(r"total_counts > 300: [1-9][\d,]*", message)


def test_plain_labels_and_unknown_labels(tmp_path):
    import pandas as pd

    from scimtrain.ontology import CellOntology
    from scimtrain.selection import SelectionError
    from tests.conftest import hand_store

    n = 60
    cells = pd.DataFrame({"cellTypeOntologyID": ["T cell", "B cell", "NK cell"] * (n // 3),
                          "datasetID": [f"s{i // 3 % 3}" for i in range(n)],
                          "sampleID": [f"x{i // 3 % 3}" for i in range(n)]})
    plain = hand_store(tmp_path / "plain", cells)
    with pytest.raises(SelectionError, match="look like plain names.*--ontology none"):
        select(plain, filter_condition="")
    assert select(plain, filter_condition="", ontology=CellOntology.none()).n_labels == 3
    cells["cellTypeOntologyID"] = ["CL:9999998", "CL:9999999", "CL:0000236"] * (n // 3)
    unknown = hand_store(tmp_path / "unknown", cells)
    with pytest.raises(SelectionError, match="unknown to the ontology.*--allow_unknown_labels"):
        select(unknown, filter_condition="")
    kept = select(unknown, filter_condition="", allow_unknown_labels=True)
    assert set(kept.train["label_id"]) == {"CL:0000236"}


def test_empty_gene_order_file(tiny_store, tmp_path):
    from scimtrain.selection import SelectionError

    (tmp_path / "genes.txt").write_text("\n\n")
    with pytest.raises(SelectionError, match="gene order file .*genes.txt is empty"):
        select(tiny_store, gene_order=str(tmp_path / "genes.txt"))
