"""SCimilarity's optional training features (docs/scimilarity.md §9, issue 14): the L1 layer,
fine-tuning with frozen layers, dynamic sampling weights and triplet tracking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scimtrain.build import build_training, hyperparameters
from scimtrain.config import ConfigError, TrainingConfig, parse_args
from scimtrain.dynamic_sampling import (
    DynamicCellStream,
    DynamicSamplingPlan,
    draw_without_replacement,
)
from scimtrain.finetune import FrozenBatchNorm1d
from scimtrain.losses import LossConfig, compute_loss, l1_penalty, triplet_loss
from scimtrain.model import Encoder, EncoderDecoder, encoder_layer_sizes
from scimtrain.model_folder import ModelFolderError, read_model_folder, write_model_folder
from scimtrain.selection import SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import CellTable, StreamConfig
from scimtrain.sum_tree import SumTree
from scimtrain.trainer import weights_digest
from scimtrain.triplet_log import COLUMNS, TripletLog, triplet_file
from tests.conftest import SMALL, TINY_FILTER

SIZES = dict(hidden_dim=[32, 32], latent_dim=8)


def small_config(store: str, out: Path, **changes) -> TrainingConfig:
    """A small run (as tests/conftest.make_trainer builds it) with its files under ``out``."""
    return TrainingConfig(**{**SMALL, "tiledb": store, "model_folder": str(out / "models"),
                             "result_folder": str(out / "results"),
                             "log_folder": str(out / "logs"), "n_batches": 3,
                             "max_epochs": 2, "checkpoint_every": 2, **changes})


class Killed(Exception):
    pass


def kill_at(run, step_number: int) -> None:
    """Make ``run``'s step ``step_number`` (from 0) raise, as a kill would."""
    objective = run.trainer.step_fn

    def step(model, batch, ctx):
        if ctx.step == step_number:
            raise Killed(step_number)
        return objective(model, batch, ctx)

    run.trainer.step_fn = step


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- 1. the L1 layer


@pytest.mark.parametrize("layer", ["last", "first"])
def test_l1_penalty_on_the_chosen_layer(layer):
    encoder = Encoder(7, latent_dim=3, hidden_dim=[5, 4])
    chosen = encoder.network[-1] if layer == "last" else encoder.network[0][1]
    expect = 2e-3 * 0.5 * (chosen.weight.abs().sum() + chosen.bias.abs().sum())
    got = l1_penalty(encoder, 2e-3, 0.5, layer=layer)
    torch.testing.assert_close(got, expect)
    got.backward()
    with_grad = {n for n, p in encoder.named_parameters() if p.grad is not None}
    prefix = "network.2" if layer == "last" else "network.0.1"
    assert with_grad == {f"{prefix}.weight", f"{prefix}.bias"}


def test_l1_layer_default_choice_and_record():
    encoder = Encoder(7, latent_dim=3, hidden_dim=[5, 4])
    torch.testing.assert_close(l1_penalty(encoder, 1e-4, 0.005),
                               l1_penalty(encoder, 1e-4, 0.005, layer="last"))
    with pytest.raises(ValueError, match="layer must be one of"):
        l1_penalty(encoder, 1e-4, 0.005, layer="middle")
    assert hyperparameters(TrainingConfig())["l1_layer"] == "last"
    assert hyperparameters(TrainingConfig(l1_layer="first"))["l1_layer"] == "first"
    assert parse_args(["--tiledb", "x", "--l1_layer", "first"]).l1_layer == "first"
    with pytest.raises(SystemExit):
        parse_args(["--tiledb", "x", "--l1_layer", "middle"])


# --------------------------------------------------------------------------- 2. fine-tuning


def pretrained_model(n_genes: int, seed: int) -> EncoderDecoder:
    """A model with non-trivial BatchNorm statistics, as a trained one has."""
    torch.manual_seed(seed)
    model = EncoderDecoder(n_genes, **SIZES)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    return model


def scimtrain_folder(path: Path, genes: list[str]) -> Path:
    model = pretrained_model(len(genes), seed=11)
    return write_model_folder(path, model.encoder, model.decoder, gene_order=genes,
                              int2label={0: "a"}, hyperparameters={"latent_dim": 8},
                              metadata={})


def scimilarity_folder(path: Path, genes: list[str]) -> Path:
    """SCimilarity's release layout, written by hand: no hyperparameters.json, no labels."""
    model = pretrained_model(len(genes), seed=12)
    path.mkdir()
    torch.save({"state_dict": model.encoder.state_dict()}, path / "encoder.ckpt")
    torch.save({"state_dict": model.decoder.state_dict()}, path / "decoder.ckpt")
    (path / "layer_sizes.json").write_text(json.dumps(encoder_layer_sizes(model.encoder)))
    (path / "gene_order.tsv").write_text("\n".join(genes) + "\n")
    return path


FROZEN = ("network.0.1.", "network.0.2.", "network.1.1.", "network.1.2.")  # Linear, BN


@pytest.mark.parametrize("layout", ["scimtrain", "scimilarity"])
def test_finetune_freeze_keeps_frozen_layers(tiny_store, tmp_path, layout):
    store_genes = [str(g) for g in CellArrStore(tiny_store).gene_symbols]
    rng = np.random.default_rng(3)
    # The folder's genes: another order than the store's, and (SCimilarity's) some genes the
    # store lacks, which the selection skips and reports as for a gene-order file.
    genes = [store_genes[i] for i in rng.permutation(len(store_genes))[:250]]
    if layout == "scimilarity":
        genes += ["NOT_IN_STORE_1", "NOT_IN_STORE_2"]
        folder = scimilarity_folder(tmp_path / "release", genes)
    else:
        folder = scimtrain_folder(tmp_path / "ours", genes)
    loaded = read_model_folder(folder)
    run = build_training(small_config(tiny_store, tmp_path / "run", init_from=str(folder),
                                      freeze=1, l1_layer="first", **SIZES))
    kept = [g for g in genes if not g.startswith("NOT_IN")]
    assert run.selection.gene_order == kept
    if layout == "scimilarity":
        assert run.selection.missing_genes == ["NOT_IN_STORE_1", "NOT_IN_STORE_2"]
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in run.trainer.optimizer.param_groups) == len(trainable)
    run.fit()
    encoder = run.trainer.raw_model.encoder
    after = full_state(encoder)
    frozen = [k for k in after if k.startswith(FROZEN)]
    assert len(frozen) == 2 * 2 + 2 * 5  # Linear weight/bias; BN weight/bias/stats/count
    expect = dict(loaded.encoder_state)
    # The genes the store lacks leave the model; the others' columns are the folder's.
    expect["network.0.1.weight"] = expect["network.0.1.weight"][:, [genes.index(g)
                                                                   for g in kept]]
    for name in frozen:
        assert torch.equal(after[name], expect[name]), name
    assert all(isinstance(m, FrozenBatchNorm1d) and not m.training
               for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert not torch.equal(after["network.2.weight"], loaded.encoder_state["network.2.weight"])
    decoder = run.trainer.raw_model.decoder.state_dict()
    assert not torch.equal(decoder["network.0.0.weight"],
                           loaded.decoder_state["network.0.0.weight"])
    # The model folder: the folder's genes, the choices recorded, loadable as a plain model.
    out = read_model_folder(run.model_dir)
    assert out.gene_order == kept
    hyper = out.hyperparameters
    assert (hyper["init_from"], hyper["freeze"], hyper["l1_layer"]) == (str(folder), True,
                                                                       "first")
    out.build_model()


def test_finetune_genes_matched_by_name(tmp_path):
    from scimtrain.finetune import load_pretrained

    folder = read_model_folder(scimtrain_folder(tmp_path / "f", ["A", "B", "C", "D"]))
    model = EncoderDecoder(3, **SIZES)
    missing = pytest.warns(UserWarning, match="1 of the run's 3 genes")
    with missing:
        assert load_pretrained(model, folder, ["C", "X", "A"]) == ["X"]
    first = folder.encoder_state["network.0.1.weight"]
    got = model.encoder.state_dict()["network.0.1.weight"]
    assert torch.equal(got[:, 0], first[:, 2]) and torch.equal(got[:, 2], first[:, 0])
    assert not got[:, 1].any()
    last = folder.decoder_state["network.2.weight"]
    assert torch.equal(model.decoder.state_dict()["network.2.weight"][0], last[2])
    with pytest.raises(ModelFolderError, match="--latent_dim 8 --hidden_dim 32 32"):
        load_pretrained(EncoderDecoder(3, hidden_dim=[16], latent_dim=8), folder, ["A"])
    with pytest.raises(ConfigError, match="--init_from"):
        TrainingConfig(freeze=1)


def test_finetune_resume_is_exact(tiny_store, tmp_path):
    folder = scimtrain_folder(tmp_path / "pre", [str(g) for g in
                                                 CellArrStore(tiny_store).gene_symbols])
    changes = dict(init_from=str(folder), freeze=1, val_studies=[], **SIZES)
    reference = build_training(small_config(tiny_store, tmp_path / "ref", **changes))
    reference.trainer.fit()
    interrupted = build_training(small_config(tiny_store, tmp_path / "run", **changes))
    kill_at(interrupted, 5)  # mid-epoch 1: resumes from the checkpoint after step 4
    with pytest.raises(Killed):
        interrupted.trainer.fit()
    resumed = build_training(small_config(tiny_store, tmp_path / "run", **changes))
    resumed.trainer.fit()
    assert resumed.trainer.state.step == 6
    ours, theirs = full_state(resumed.trainer.raw_model), full_state(reference.trainer.raw_model)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # parameters and statistics


# --------------------------------------------------------------------------- 3. dynamic weights


def replay(plan: DynamicSamplingPlan, epochs: int, rank: int = 0) -> list[np.ndarray]:
    """The rule by hand: the weights at the start of each epoch, from the plan's batches."""
    w = plan.weights.copy()
    starts = [w.copy()]
    for epoch in range(epochs):
        for batch in plan.epoch(epoch, rank):
            w[batch] = np.maximum(w[batch] * plan.decay, plan.floor)
        starts.append(w.copy())
    return starts


def test_dynamic_weights_follow_the_rule():
    weights = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.005, 1.0, 4.0])
    plan = DynamicSamplingPlan(weights, batch_size=4, n_batches=3, seed=5, world_size=2,
                               decay=0.5)
    for rank in (0, 1):
        starts = replay(plan, 3, rank)
        for epoch in range(4):
            np.testing.assert_array_equal(plan.weights_at(epoch, rank), starts[epoch])
        # Each batch is drawn from the weights the earlier batches left (this rank's only).
        w = weights.copy()
        for epoch in range(3):
            for k, batch in enumerate(plan.epoch(epoch, rank)):
                assert np.unique(batch).size == batch.size == 4  # distinct cells
                again = draw_without_replacement(
                    SumTree(w), 4, np.random.default_rng([5, epoch, rank, k]))
                np.testing.assert_array_equal(batch, again)
                w[batch] = np.maximum(w[batch] * 0.5, 0.01)
    assert not np.array_equal(plan.epoch(0, 0)[1], plan.epoch(0, 1)[1])
    final = plan.weights_at(3, 0)
    drawn = np.unique(np.concatenate([b for e in range(3) for b in plan.epoch(e, 0)]))
    assert (final[drawn] >= 0.01).all() and (final[drawn] < np.maximum(weights[drawn], 0.02)
                                            ).all()
    untouched = np.setdiff1d(np.arange(weights.size), drawn)
    np.testing.assert_array_equal(final[untouched], weights[untouched])
    # A weight below the floor is raised to it by its first draw (max(w * d, floor)).
    low = DynamicSamplingPlan(np.array([0.005, 1.0]), 2, 1, decay=0.5)
    np.testing.assert_array_equal(low.weights_at(1), [0.01, 0.5])


def test_draws_follow_the_weights():
    """First draws of a batch are by weight; a batch is a successive sample (distinct)."""
    weights = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    tree = SumTree(weights)
    firsts = np.array([draw_without_replacement(tree, 2, np.random.default_rng(s))[0]
                       for s in range(4000)])
    freq = np.bincount(firsts, minlength=5) / firsts.size
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.03)
    full = draw_without_replacement(tree, 5, np.random.default_rng(0))  # Gumbel fallback
    assert sorted(full) == [0, 1, 2, 3, 4]


def test_sum_tree_is_a_function_of_its_leaves():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100):
        tree = SumTree(rng.random(n) + 0.1)
        for _ in range(30):
            p = rng.choice(n, size=min(n, 3), replace=False)
            tree.set(p, rng.random(p.size) + 0.1)
        assert np.array_equal(tree.tree[1:], SumTree(tree.leaves.copy()).tree[1:])
        assert np.isclose(tree.total, tree.leaves.sum())


@pytest.fixture(scope="module")
def tiny_train(tiny_store):
    selection = select_cells(CellArrStore(tiny_store), SelectionConfig(
        filter_condition=TINY_FILTER, val_studies=("study_04", "study_05")))
    return tiny_store, CellTable.from_frame(selection.train), selection.gene_indices


def dynamic_stream(tiny_train, workers: int) -> DynamicCellStream:
    store, cells, genes = tiny_train
    return DynamicCellStream(store, cells, genes, StreamConfig(
        batch_size=40, n_batches=5, pool_batches=2, num_workers=workers, seed=3), decay=0.5)


def epoch_batches(stream: DynamicCellStream, epoch: int) -> list:
    stream.set_epoch(epoch)
    return [(b.x.clone(), b.labels.clone()) for b in stream]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(s, t)
                                    for (x, s), (y, t) in zip(a, b))


def test_dynamic_stream_workers_and_resume(tiny_train):
    serial = dynamic_stream(tiny_train, 0)
    reference = [epoch_batches(serial, e) for e in range(3)]
    pooled = dynamic_stream(tiny_train, 2)
    assert all(same(epoch_batches(pooled, e), reference[e]) for e in range(3))
    # The stream's batches are the plan's, and the plan is the decayed one.
    labels = tiny_train[1].labels
    plan = DynamicSamplingPlan(tiny_train[1].weights, 40, 5, seed=3, decay=0.5)
    assert all(np.array_equal(labels[plan.batch(e, 0, k)], reference[e][k][1].numpy())
               for e in range(3) for k in range(5))
    # Resume mid-epoch 1 from a state_dict, in a fresh stream, with and without workers.
    first = dynamic_stream(tiny_train, 0)
    epoch_batches(first, 0)
    first.set_epoch(1)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    iterator.close()  # its reading thread stops before workers fork
    assert state["dynamic_weights"]["epoch"] == 1 and state["consumed"] == 2
    for workers in (0, 2):
        resumed = dynamic_stream(tiny_train, workers)
        resumed.load_state_dict(state)
        rest = [(b.x.clone(), b.labels.clone()) for b in resumed]
        assert same(rest, reference[1][2:])
        assert same(epoch_batches(resumed, 2), reference[2])
    # The saved weights are what the resumed draws use (not a replay from the run's start).
    tampered = dynamic_stream(tiny_train, 0)
    tampered.load_state_dict({**state, "dynamic_weights": {
        **state["dynamic_weights"], "values": state["dynamic_weights"]["values"] * 100}})
    assert not same([(b.x.clone(), b.labels.clone()) for b in tampered], reference[1][2:])


def test_dynamic_weights_trainer_resume_is_exact(tiny_store, tmp_path):
    changes = dict(dynamic_weights=1, dynamic_weight_decay=0.5, val_studies=[], **SIZES)
    reference = build_training(small_config(tiny_store, tmp_path / "ref", **changes))
    assert isinstance(reference.train_data, DynamicCellStream)
    reference.trainer.fit()
    interrupted = build_training(small_config(tiny_store, tmp_path / "run", **changes))
    kill_at(interrupted, 5)  # mid-epoch 1: the saved state is the weights of epoch 1's start
    with pytest.raises(Killed):
        interrupted.trainer.fit()
    resumed = build_training(small_config(tiny_store, tmp_path / "run", **changes))
    resumed.trainer.fit()
    assert weights_digest(resumed.trainer.raw_model) == weights_digest(
        reference.trainer.raw_model)
    # A static run draws other batches: the option is in effect.
    static = build_training(small_config(tiny_store, tmp_path / "static", val_studies=[],
                                         **SIZES))
    static.trainer.fit()
    assert static.trainer._batches_digest.hexdigest() != \
        reference.trainer._batches_digest.hexdigest()


# --------------------------------------------------------------------------- 4. triplets


def test_compute_loss_returns_the_triplets_it_used():
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(60, 4), dim=1)
    labels = torch.arange(60) % 3
    studies = torch.arange(60) % 4
    desc = np.zeros((3, 3), dtype=bool)
    x = torch.randn(60, 5)
    config = LossConfig(margin=0.5, triplet_loss_weight=1.0)
    loss, metrics, mined = compute_loss(emb, x, x, labels, studies, desc, config,
                                        generator=gen, return_triplets=True)
    assert mined.anchor.numel() > 1
    assert (labels[mined.anchor] == labels[mined.positive]).all()
    assert (studies[mined.anchor] != studies[mined.positive]).all()
    again, _ = triplet_loss(emb, mined.anchor, mined.positive, mined.negative, 0.5)
    torch.testing.assert_close(again, metrics["triplet_loss"])


def read_triplets(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_triplet_files_hold_the_triplets_the_loss_used(tiny_store, tmp_path):
    folder = tmp_path / "triplets"
    run = build_training(small_config(tiny_store, tmp_path / "run", track_triplets=str(folder),
                                      track_triplets_above_step=2, **SIZES))
    objective, used = run.objective, {}

    def step(model, batch, ctx):
        out = objective(model, batch, ctx)
        if not ctx.training:
            return out
        mined, studies = objective.last_triplets
        codes = [mined.labels[mined.anchor], studies[mined.anchor],
                 mined.labels[mined.positive], studies[mined.positive],
                 mined.labels[mined.negative], studies[mined.negative]]
        used[ctx.step] = [c.tolist() for c in codes]
        return out

    run.trainer.step_fn = step
    run.fit()  # 2 epochs x 3 steps: steps 0..5
    assert sorted(p.name for p in folder.iterdir()) == [
        f"train_triplets.{s}.csv.gz" for s in (3, 4, 5)]
    names, studies = run.selection.int2label, run.selection.studies
    for s in (3, 4, 5):
        frame = read_triplets(triplet_file(folder, s))
        assert tuple(frame.columns) == COLUMNS
        expect = {column: [(studies if column.endswith("studies") else names)[i] for i in codes]
                  for column, codes in zip(COLUMNS, used[s])}
        assert frame.to_dict("list") == expect
        assert len(frame) > 1


class TwoRanks:
    """An accelerator stand-in for rank 0 of two: the other rank contributes ``other``."""

    num_processes, is_main_process = 2, True

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.longest = None

    def pad_across_processes(self, tensor, dim=0):
        self.longest = max(tensor.shape[0], self.other.shape[0])
        def pad(t):
            return torch.cat([t, t.new_zeros(self.longest - t.shape[0], t.shape[1])])

        self.other = pad(self.other)
        return pad(tensor)

    def gather(self, tensor):
        if tensor.ndim == 1:  # the counts
            return torch.cat([tensor, torch.tensor([int(self.other_count)])])
        return torch.cat([tensor, self.other])


def test_triplet_log_gathers_ranks_and_drops_study_columns(tmp_path):
    labels = torch.tensor([0, 1, 1, 2])
    studies = torch.tensor([0, 1, 0, 1])
    mined = (torch.tensor([1]), torch.tensor([2]), torch.tensor([0]), labels)
    other_rows = torch.tensor([[2, 1, 2, 0, 0, 1], [0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 2, 0]])
    fake = TwoRanks(other_rows)
    fake.other_count = 3
    log = TripletLog(tmp_path / "a", {0: "x", 1: "y", 2: "z"}, ["s0", "s1"], accelerator=fake)
    log.record(7, mined, studies)
    log.close()
    frame = read_triplets(triplet_file(tmp_path / "a", 7))
    assert frame.values.tolist() == [["y", "s1", "y", "s0", "x", "s0"],
                                     ["z", "s1", "z", "s0", "x", "s1"],
                                     ["x", "s0", "x", "s1", "y", "s0"],
                                     ["y", "s1", "y", "s0", "z", "s0"]]
    plain = TripletLog(tmp_path / "b", {0: "x", 1: "y", 2: "z"}, ["s0", "s1"],
                       above_step=7, with_studies=False)
    assert not plain.wants(7) and plain.wants(8)
    plain.record(8, mined, None)
    plain.close()
    frame = read_triplets(triplet_file(tmp_path / "b", 8))
    assert list(frame.columns) == ["anchor_label", "positive_label", "negative_label"]
    assert frame.values.tolist() == [["y", "y", "x"]]


# --------------------------------------------------------------------------- bin/train.py


@pytest.mark.slow
def test_train_script_with_every_feature_on_two_processes(tiny_store, tmp_path):
    """From the command line, under DDP (two gloo processes): fine-tune with frozen layers,
    dynamic weights, the first-layer L1 and triplet tracking, whose files hold both ranks'
    triplets (rank 0's draws and mining are a one-process run's, so its rows come first)."""
    from tests.conftest import NAME, small_run_flags
    from tests.test_train import run_script

    genes = [str(g) for g in CellArrStore(tiny_store).gene_symbols]
    folder = scimilarity_folder(tmp_path / "release", genes[::-1])
    features = ["--init_from", str(folder), "--freeze", "1", "--l1_layer", "first",
                "--dynamic_weights", "1", "--dynamic_weight_decay", "0.5",
                "-e", "1", "-n", "2"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29519"]
    files = {}
    for processes, run in ((1, None), (2, launcher)):
        out = tmp_path / f"p{processes}"
        run_script(small_run_flags(tiny_store, out) + features + [
            "--track_triplets", str(out / "triplets")], launcher=run, timeout=600)
        assert sorted(p.name for p in (out / "triplets").iterdir()) == [
            "train_triplets.0.csv.gz", "train_triplets.1.csv.gz"]
        # Step 0: the ranks' weights are still the same (later, gradients are averaged).
        files[processes] = read_triplets(triplet_file(out / "triplets", 0))
        model = read_model_folder(out / "models" / NAME)
        assert model.gene_order == genes[::-1]
        assert torch.equal(model.encoder_state["network.0.2.running_mean"],
                           read_model_folder(folder).encoder_state["network.0.2.running_mean"])
        hyper = model.hyperparameters
        assert (hyper["freeze"], hyper["dynamic_weights"], hyper["l1_layer"]) == (
            True, True, "first")
    one, two = files[1], files[2]
    assert tuple(two.columns) == COLUMNS and len(two) > len(one)
    assert two.iloc[:len(one)].equals(one)
