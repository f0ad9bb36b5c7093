"""``bin/train.py`` / ``scimtrain-train``: SCimilarity's training command on scimtrain.

Flags keep SCimilarity's names, short aliases and defaults (SPEC §8); ``--config FILE`` (JSON,
YAML or TOML, keys = long flag names) sets defaults that flags override. Without ``--tiledb``
a small synthetic demo store is built once (cached) and a small model trained on it.

The run: store → selection → streams (sharded by rank) → model → Trainer.fit → model folder
(SPEC §7, last weights; ``best/`` holds the best-by-validation ones) → test pass on the
validation split → ``{result_folder}/{model_name}/{model_name}.test.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from scimtrain import __version__
from scimtrain.checkpoint import load_file, write_model_folder
from scimtrain.losses import LossConfig
from scimtrain.model import EncoderDecoder
from scimtrain.objective import MetricLearningObjective
from scimtrain.ontology import CellOntology
from scimtrain.selection import Selection, SelectionConfig, select_cells
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig
from scimtrain.trainer import Trainer, TrainerConfig, make_accelerator

# Settings the demo (no --tiledb) uses unless given: trains in about a minute on 2 cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "batch_size": 256, "n_batches": 20, "max_epochs": 12, "latent_dim": 64,
    "hidden_dim": [256, 256], "val_studies": ["study_06", "study_07"], "val_batches": 4,
    "num_workers": 2, "checkpoint_every": 50, "suffix": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every SCimilarity flag keeps its meaning, default and short alias."""
    p = argparse.ArgumentParser(
        prog="scimtrain-train",
        description="Train a SCimilarity-style cell embedding on a CellArr TileDB store. "
                    "Without --tiledb, trains a small model on a synthetic demo store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="JSON, YAML or TOML file of defaults (keys: long flag names)")
    data = p.add_argument_group("data")
    data.add_argument("--tiledb", metavar="STORE", help="store folder or TileDB URI "
                      "(default: build and use the demo store)")
    data.add_argument("--counts_location", default=None,
                      help="counts array under the store (default: counts or assays/counts)")
    data.add_argument("--label_id_column", default="cellTypeOntologyID")
    data.add_argument("--study_column", default="datasetID")
    data.add_argument("--sample_column", default="sampleID")
    data.add_argument("--gene_order", metavar="FILE", help="one gene symbol per line")
    data.add_argument("--filter_condition", default=None,
                      help="TileDB query condition selecting cells (default: SCimilarity's QC "
                           "filter on the label column)")
    data.add_argument("--val_studies", nargs="*", default=[], metavar="STUDY")
    data.add_argument("--val_studies_file", metavar="FILE", help="one study per line")
    data.add_argument("--exclude_studies", nargs="*", default=[], metavar="STUDY")
    data.add_argument("--exclude_studies_file", metavar="FILE", help="one study per line")
    data.add_argument("--exclude_samples_file", metavar="FILE",
                      help="tab-separated study and sample, one pair per line")
    data.add_argument("--ontology", default="default",
                      help="'default' (shipped CL snapshot), 'none' (plain labels) or an "
                           "OBO/JSON file")
    model = p.add_argument_group("model and loss")
    model.add_argument("-m", "--margin", type=float, default=0.05)
    model.add_argument("-w", "--triplet_loss_weight", type=float, default=0.001)
    model.add_argument("-t", "--negative_selection", default="semihard",
                       choices=["semihard", "hardest", "random"])
    model.add_argument("--latent_dim", type=int, default=128)
    model.add_argument("--hidden_dim", type=int, nargs="+", default=[1024, 1024, 1024])
    model.add_argument("--input_dropout", type=float, default=0.4)
    model.add_argument("--dropout", type=float, default=0.5)
    model.add_argument("--l1", type=float, default=1e-4)
    model.add_argument("--l2", type=float, default=0.01)
    model.add_argument("--cross", type=int, default=1, choices=[0, 1],
                       help="1: positive pairs come from different studies")
    model.add_argument("--perturb", type=int, default=0, choices=[0, 1],
                       help="1: perturb labels to ontology parents before mining")
    model.add_argument("--perturb_fraction", type=float, default=0.5)
    train = p.add_argument_group("training")
    train.add_argument("-b", "--batch_size", type=int, default=1000)
    train.add_argument("-e", "--max_epochs", type=int, default=500)
    train.add_argument("-n", "--n_batches", type=int, default=100, help="batches per epoch")
    train.add_argument("--val_batches", type=int, default=10,
                       help="validation batches per epoch")
    train.add_argument("-l", "--lr", type=float, default=0.005)
    train.add_argument("--cosine_annealing_tmax", type=int, default=0,
                       help="0 or more than max_epochs: max_epochs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    train.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    train.add_argument("--checkpoint_every", type=int, default=0,
                       help="also checkpoint every N steps (0: at epoch ends only)")
    train.add_argument("--keep_checkpoints", type=int, default=2)
    train.add_argument("--resume", default="auto",
                       help="auto (newest checkpoint of this run), none, or a checkpoint folder")
    loader = p.add_argument_group("loader")
    loader.add_argument("--num_workers", type=int, default=8,
                        help="DataLoader workers per process (capped at the CPU cores)")
    loader.add_argument("--pool_batches", type=int, default=StreamConfig.pool_batches,
                        help="batches read together in one sorted TileDB query")
    loader.add_argument("--prefetch_pools", type=int, default=StreamConfig.prefetch_pools,
                        help="pools read ahead per worker")
    loader.add_argument("--tiledb_threads", type=int, default=None,
                        help="TileDB threads per reading process (default: 1 per worker, "
                             "TileDB's own choice without workers)")
    loader.add_argument("--tiledb_memory_mb", type=int, default=StreamConfig.tiledb_memory_mb,
                        help="TileDB memory budget per reading process")
    loader.add_argument("--sparse_batches", action="store_true",
                        help="move batches as CSR and densify on the device")
    out = p.add_argument_group("output")
    out.add_argument("--suffix", default="version_0")
    out.add_argument("--model_folder", default="models")
    out.add_argument("--result_folder", default="results")
    out.add_argument("--log_folder", default="logs")
    out.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags over config file over demo defaults over SCimilarity defaults."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    file_values = read_config(first.config, parser) if first.config else {}
    if not first.tiledb and not file_values.get("tiledb"):
        parser.set_defaults(**DEMO_DEFAULTS)
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a JSON/YAML/TOML config file; unknown keys are an error naming them."""
    suffix = Path(path).suffix.lower()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc}")
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            parser.error(f"--config {path}: use a .json, .yaml/.yml or .toml file")
    except Exception as exc:  # a syntax error in the file
        parser.error(f"--config {path} is not valid {suffix[1:]}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path} has unknown keys {unknown}; valid keys are the long flag "
                     f"names: {sorted(known)}")
    return values


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject values that would fail later, naming the flag."""
    positive = ["batch_size", "max_epochs", "n_batches", "latent_dim", "pool_batches",
                "keep_checkpoints", "tiledb_memory_mb"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.margin <= 0:
        parser.error(f"--margin must be > 0, got {args.margin}")
    if not 0 <= args.triplet_loss_weight <= 1:
        parser.error(f"--triplet_loss_weight must be in [0, 1], got {args.triplet_loss_weight}")
    for name in ("dropout", "input_dropout"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.lr <= 0 or args.l1 < 0 or args.l2 < 0:
        parser.error("--lr must be > 0, --l1 and --l2 >= 0")
    if min(args.hidden_dim) < 1:
        parser.error(f"--hidden_dim sizes must be positive, got {args.hidden_dim}")
    if args.num_workers < 0 or args.val_batches < 0 or args.checkpoint_every < 0:
        parser.error("--num_workers, --val_batches and --checkpoint_every must be >= 0")
    for name in ("gene_order", "val_studies_file", "exclude_studies_file",
                 "exclude_samples_file"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name} {path}: no such file")


def model_name(args: argparse.Namespace) -> str:
    """SCimilarity's ``model_{batch}_{margin}_{latent}_{n_hidden}_{triplet_weight}_{suffix}``."""
    return (f"model_{args.batch_size}_{args.margin}_{args.latent_dim}_{len(args.hidden_dim)}_"
            f"{args.triplet_loss_weight}_{args.suffix}")


def _lines(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def selection_config(args: argparse.Namespace) -> SelectionConfig:
    pairs = []
    for line in _lines(args.exclude_samples_file):
        fields = line.split("\t")
        if len(fields) != 2:
            raise SystemExit(f"--exclude_samples_file {args.exclude_samples_file}: expected "
                             f"'study<TAB>sample' per line, got {line!r}")
        pairs.append((fields[0], fields[1]))
    return SelectionConfig(
        label_column=args.label_id_column, study_column=args.study_column,
        sample_column=args.sample_column, filter_condition=args.filter_condition,
        exclude_studies=tuple(args.exclude_studies) + tuple(_lines(args.exclude_studies_file)),
        exclude_samples=tuple(pairs),
        val_studies=tuple(args.val_studies) + tuple(_lines(args.val_studies_file)),
        gene_order=args.gene_order)


def demo_store() -> str:
    """The demo store, built once under ``$SCIMTRAIN_CACHE`` (default ~/.cache/scimtrain)."""
    from scimtrain.synthetic import SIMULATION_VERSION, SyntheticConfig, make_synthetic_store

    cache = Path(os.environ.get("SCIMTRAIN_CACHE", Path.home() / ".cache" / "scimtrain"))
    uri = cache / f"demo-store-v{SIMULATION_VERSION}"
    if not uri.exists():
        print(f"building the demo store at {uri} (once)")
        tmp = cache / f".{uri.name}.{os.getpid()}"
        # Built aside and renamed: an interrupted build never looks like a finished store.
        make_synthetic_store(tmp, SyntheticConfig(n_cells=20_000, n_genes=2_000), overwrite=True)
        try:
            os.replace(tmp, uri)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(uri)


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """SPEC §7's hyperparameters.json."""
    return {
        "latent_dim": args.latent_dim, "hidden_dim": list(args.hidden_dim),
        "dropout": args.dropout, "input_dropout": args.input_dropout, "margin": args.margin,
        "triplet_loss_weight": args.triplet_loss_weight,
        "negative_selection": args.negative_selection,
        "sample_across_studies": bool(args.cross), "perturb_labels": bool(args.perturb),
        "perturb_labels_fraction": args.perturb_fraction, "lr": args.lr,
        "l1_lambda": args.l1, "l2_lambda": args.l2, "batch_size": args.batch_size,
        "max_epochs": args.max_epochs,
    }


def run(args: argparse.Namespace) -> dict[str, float] | None:
    """Train as the arguments say; returns the test metrics (None without validation)."""
    name = model_name(args)
    model_dir = Path(args.model_folder) / name
    if model_dir.exists():
        print(f"model folder {model_dir} already exists: nothing to train (remove it or "
              "change --suffix to train again)")
        return None
    accelerator = make_accelerator(args.mixed_precision, cpu=True if args.cpu else None)
    with accelerator.main_process_first():  # the main process builds the demo store once
        store_uri = args.tiledb or demo_store()
    store = CellArrStore(store_uri, counts=args.counts_location)
    ontology = CellOntology.from_spec(args.ontology)
    with warnings.catch_warnings():
        if not accelerator.is_main_process:  # say it once
            warnings.simplefilter("ignore")
        selection = select_cells(store, selection_config(args), ontology)
    if accelerator.is_main_process:
        print(selection.summary())
    rank, world = accelerator.process_index, accelerator.num_processes
    workers = min(args.num_workers, os.cpu_count() or 1)
    stream = StreamConfig(batch_size=args.batch_size, n_batches=args.n_batches, seed=args.seed,
                          pool_batches=args.pool_batches, prefetch_pools=args.prefetch_pools,
                          num_workers=workers, output="csr" if args.sparse_batches else "dense",
                          tiledb_threads=args.tiledb_threads,
                          tiledb_memory_mb=args.tiledb_memory_mb)
    train = CellStream(store, CellTable.from_frame(selection.train), selection.gene_indices,
                       stream, rank, world)
    has_val = len(selection.val) > 0 and args.val_batches > 0
    val = test = None
    if has_val:
        val_batch = min(args.batch_size, len(selection.val))
        val_config = replace(stream, batch_size=val_batch, n_batches=args.val_batches,
                             seed=args.seed + 1)
        val = CellStream(store, CellTable.from_frame(selection.val), selection.gene_indices,
                         val_config, rank, world)
        test = CellStream(store, CellTable.from_frame(selection.val), selection.gene_indices,
                          replace(val_config, mode="full"), rank, world)
    torch.manual_seed(args.seed)
    net = EncoderDecoder(len(selection.gene_order), latent_dim=args.latent_dim,
                         hidden_dim=args.hidden_dim, dropout=args.dropout,
                         input_dropout=args.input_dropout)
    objective = MetricLearningObjective(
        ontology.descendant_matrix(selection.label_ids),
        LossConfig(margin=args.margin, triplet_loss_weight=args.triplet_loss_weight,
                   negative_selection=args.negative_selection,
                   sample_across_studies=bool(args.cross), perturb_labels=bool(args.perturb),
                   perturb_labels_fraction=args.perturb_fraction),
        l1=args.l1, parent=ontology.parent_matrix(selection.label_ids) if args.perturb else None)
    run_dir = Path(args.log_folder) / name / args.suffix
    trainer = Trainer(
        net, objective, train, val,
        TrainerConfig(max_epochs=args.max_epochs, lr=args.lr, weight_decay=args.l2,
                      cosine_annealing_tmax=args.cosine_annealing_tmax,
                      mixed_precision=args.mixed_precision, seed=args.seed,
                      run_dir=str(run_dir), checkpoint_every=args.checkpoint_every,
                      keep_checkpoints=args.keep_checkpoints, resume=args.resume,
                      progress=not args.no_progress),
        accelerator=accelerator,
        hparams={**hyperparameters(args), "store": store_uri, "n_genes":
                 len(selection.gene_order), "n_labels": selection.n_labels,
                 "n_batches": args.n_batches, "gene_order": args.gene_order or ""})
    trainer.fit()
    if accelerator.is_main_process:
        _write_models(model_dir, trainer, selection, args, store, run_dir)
    if test is None:
        if accelerator.is_main_process:
            print("no validation cells: no validation and no test pass (pass --val_studies)")
        return None
    metrics = trainer.test(test)
    if accelerator.is_main_process:
        result_dir = Path(args.result_folder) / name
        result_dir.mkdir(parents=True, exist_ok=True)
        (result_dir / f"{name}.test.json").write_text(json.dumps(metrics, indent=2))
        print(f"model: {model_dir}\ntest metrics: {result_dir / (name + '.test.json')}")
    accelerator.wait_for_everyone()
    return metrics


def _write_models(model_dir: Path, trainer: Trainer, selection: Selection,
                  args: argparse.Namespace, store: CellArrStore, run_dir: Path) -> None:
    """The model folder with the last weights, and ``best/`` with the best validated ones."""
    common = dict(gene_order=selection.gene_order, int2label=selection.int2label,
                  hyperparameters=hyperparameters(args),
                  metadata={"date": datetime.datetime.now().isoformat(timespec="seconds"),
                            "store": store.uri, "counts": store.counts_uri,
                            "scimtrain": __version__, "weights": "last epoch",
                            "label_ids": selection.label_ids, "run_dir": str(run_dir),
                            "command": sys.argv},
                  train_cells=selection.train, val_cells=selection.val)
    model = trainer.raw_model
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    write_model_folder(model_dir, model.encoder, model.decoder, **common)
    best = run_dir / "best_model.pt"
    if best.exists():
        net = EncoderDecoder(len(selection.gene_order), latent_dim=args.latent_dim,
                             hidden_dim=args.hidden_dim)
        net.load_state_dict(load_file(best))
        best_meta = dict(common["metadata"], weights="best validation evaluation_metric")
        write_model_folder(model_dir / "best", net.encoder, net.decoder,
                           **{**common, "metadata": best_meta})


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    run(parse_args(argv))

