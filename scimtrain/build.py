"""Assemble a training run from a :class:`~scimtrain.config.TrainingConfig`.

``build_training(config)`` does what ``bin/train.py`` does before training: open the store,
run the selection, build the streams (sharded by rank), the model, the objective and the
:class:`~scimtrain.trainer.Trainer`. The returned :class:`TrainingRun` exposes every piece, so
that a user can replace one (``run.trainer.step_fn = my_step``) and then call ``run.fit()``,
which trains, writes the model folder and runs the test pass.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from scimtrain import __version__, determinism
from scimtrain.cache import CacheError, TrainingCache
from scimtrain.checkpoint import BEST_WEIGHTS, load_file
from scimtrain.columns import LABEL_INT, WEIGHT
from scimtrain.config import FIELDS, ConfigError, TrainingConfig
from scimtrain.dynamic_sampling import DynamicCellStream
from scimtrain.finetune import (
    check_architecture,
    freeze_encoder,
    load_pretrained,
    trainable_parameters,
)
from scimtrain.losses import LossConfig
from scimtrain.model import EncoderDecoder
from scimtrain.model_folder import read_model_folder, write_model_folder
from scimtrain.objective import MetricLearningObjective
from scimtrain.ontology import CellOntology
from scimtrain.selection import Selection, SelectionConfig, select_cells
from scimtrain.source import CellSource
from scimtrain.store import CellArrStore
from scimtrain.stream import CellStream, CellTable, StreamConfig
from scimtrain.trainer import Trainer, TrainerConfig, make_accelerator
from scimtrain.triplet_log import TripletLog


class OutputError(ValueError):
    """An output folder that cannot be written; the message names it and the fix."""


@dataclass
class TrainingRun:
    """Everything a run is made of; :meth:`fit` runs it.

    ``train_data`` / ``val_data`` / ``test_data`` are :class:`~scimtrain.stream.CellStream` s
    (``val_data`` and ``test_data`` are None without validation cells); ``objective`` is the
    SCimilarity step function the ``trainer`` calls (``trainer.step_fn``, replaceable).
    """

    config: TrainingConfig
    accelerator: Accelerator
    store: CellSource
    ontology: CellOntology
    selection: Selection
    model: EncoderDecoder
    objective: MetricLearningObjective
    train_data: CellStream
    val_data: CellStream | None
    test_data: CellStream | None
    trainer: Trainer

    @property
    def name(self) -> str:
        return self.config.model_name

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_folder) / self.name

    @property
    def run_dir(self) -> Path:
        return run_dir(self.config)

    @property
    def test_file(self) -> Path:
        return test_file(self.config)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self) -> dict[str, float] | None:
        """Train, write the model folder (and ``best/``), run the test pass and write its
        JSON; returns the test metrics (None without validation cells).

        A model folder that already exists is not trained again; if its test JSON is
        missing, the test pass runs on its weights and writes it.
        """
        if self.model_dir.exists():
            read_model_folder(self.model_dir).load_into(self.trainer.raw_model)
            self.trainer.state.epoch = self.config.max_epochs  # as after training: same draw
            if self.is_main:
                print(f"model folder {self.model_dir} exists: running its test pass only")
        else:
            self.trainer.fit()
            self.objective.close()  # the tracked triplets' files are complete
            if self.is_main:
                self._write_models()
            self.accelerator.wait_for_everyone()
        if self.test_data is None:
            if self.is_main:
                print("no validation cells: no validation and no test pass (pass "
                      "--val_studies)")
            return None
        metrics = self.trainer.test(self.test_data)
        if self.is_main:
            self.test_file.parent.mkdir(parents=True, exist_ok=True)
            self.test_file.write_text(json.dumps(metrics, indent=2))
            print(f"model: {self.model_dir}\ntest metrics: {self.test_file}")
        self.accelerator.wait_for_everyone()
        return metrics

    def _write_models(self) -> None:
        """The model folder with the last weights, and ``best/`` with the best validated."""
        sel, cfg = self.selection, self.config
        common = dict(gene_order=sel.gene_order, int2label=sel.int2label,
                      hyperparameters=hyperparameters(cfg),
                      metadata={"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                "store": self.store.uri, "counts": self.store.counts_uri,
                                "scimtrain": __version__, "weights": "last epoch",
                                "label_ids": sel.label_ids, "run_dir": str(self.run_dir),
                                "command": sys.argv},
                      train_cells=sel.train, val_cells=sel.val)
        model = self.trainer.raw_model
        write_model_folder(self.model_dir, model.encoder, model.decoder, **common)
        best = self.run_dir / BEST_WEIGHTS
        if best.exists():
            net = _new_model(cfg, len(sel.gene_order))
            net.load_state_dict(load_file(best))
            meta = dict(common["metadata"], weights="best validation evaluation_metric")
            write_model_folder(self.model_dir / "best", net.encoder, net.decoder,
                               **{**common, "metadata": meta})


def run_dir(config: TrainingConfig) -> Path:
    """``{log_folder}/{model_name}/{suffix}``: logs, checkpoints, best weights."""
    return Path(config.log_folder) / config.model_name / config.suffix


def test_file(config: TrainingConfig) -> Path:
    """``{result_folder}/{model_name}/{model_name}.test.json``."""
    return Path(config.result_folder) / config.model_name / f"{config.model_name}.test.json"


def check_output_folders(config: TrainingConfig) -> None:
    """Make the output folders now, so a path under a regular file fails before training.

    Raises:
        OutputError: naming the flag and the folder that cannot be made.
    """
    for flag, folder in (("--model_folder", Path(config.model_folder)),
                         ("--result_folder", test_file(config).parent),
                         ("--log_folder", run_dir(config))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"{flag}: cannot make the folder {folder}: a part of that path "
                              "is a file; choose another folder") from None
        except OSError as exc:
            raise OutputError(f"{flag}: cannot make the folder {folder}: {exc.strerror}"
                              ) from None
        if not os.access(folder, os.W_OK):
            raise OutputError(f"{flag}: the folder {folder} is not writable")


def build_training(config: TrainingConfig, *, accelerator: Accelerator | None = None,
                   store_uri: str | None = None) -> TrainingRun:
    """Open the store, select the cells and build every piece of the run.

    Args:
        config: the run's settings.
        accelerator: default :func:`~scimtrain.trainer.make_accelerator` (``config.cpu``).
        store_uri: the CellArr store to use when the config names no data (``tiledb``,
            ``soma``, ``census``); the CLI passes the demo store.

    Raises:
        StoreError, SelectionError, SamplingError, OutputError: bad input, with the fix.
    """
    store = open_source(config, store_uri)
    config = with_source_defaults(config, store)
    if config.deterministic:  # before any CUDA work: cuBLAS reads its setting once
        determinism.configure(True)
    accelerator = accelerator or make_accelerator(config.mixed_precision,
                                                  cpu=True if config.cpu else None)
    if accelerator.is_main_process:
        check_output_folders(config)
    ontology = CellOntology.from_spec(config.ontology)
    pretrained = read_model_folder(config.init_from) if config.init_from else None
    if pretrained is not None:  # before the selection, which can take long
        check_architecture(pretrained, config.latent_dim, config.hidden_dim)
    chosen = selection_config(config)
    if pretrained is not None and not config.gene_order:
        # The folder's genes, matched to the store's as a gene-order file would be.
        chosen = replace(chosen, gene_order=list(pretrained.gene_order))
    with warnings.catch_warnings():
        if not accelerator.is_main_process:  # say it once
            warnings.simplefilter("ignore")
        selection = select_cells(store, chosen, ontology)
    if accelerator.is_main_process:
        print(selection.summary())
    rank, world = accelerator.process_index, accelerator.num_processes
    stream = stream_config(config)
    cache = training_cache(config, store, selection, accelerator, stream.target_sum)
    # Cache rows are the training cells, then the validation cells.
    on_train = {"cache": cache, "cache_offset": 0}
    on_val = {"cache": cache, "cache_offset": len(selection.train)}
    if config.dynamic_weights:
        train = DynamicCellStream(store, CellTable.from_frame(selection.train),
                                  selection.gene_indices, stream, rank, world,
                                  decay=config.dynamic_weight_decay, **on_train)
    else:
        train = CellStream(store, CellTable.from_frame(selection.train),
                           selection.gene_indices, stream, rank, world, **on_train)
    val = test = None
    if len(selection.val) > 0 and config.val_batches > 0:
        val_config = replace(stream, batch_size=min(config.batch_size, len(selection.val)),
                             n_batches=config.val_batches, seed=config.seed + 1)
        val_cells = CellTable.from_frame(selection.val)
        val = CellStream(store, val_cells, selection.gene_indices, val_config, rank, world,
                         **on_val)
        test = CellStream(store, val_cells, selection.gene_indices,
                          replace(val_config, mode="full"), rank, world, **on_val)
    torch.manual_seed(config.seed)
    model = _new_model(config, len(selection.gene_order))
    optimizer = None
    if pretrained is not None:
        load_pretrained(model, pretrained, selection.gene_order)
        if config.freeze:
            freeze_encoder(model.encoder)
            optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.lr,
                                          weight_decay=config.l2)
    triplet_log = None
    if config.track_triplets:
        triplet_log = TripletLog(config.track_triplets, selection.int2label, selection.studies,
                                 above_step=config.track_triplets_above_step,
                                 with_studies=bool(config.cross), accelerator=accelerator)
    objective = MetricLearningObjective(
        ontology.descendant_matrix(selection.label_ids),
        LossConfig(margin=config.margin, triplet_loss_weight=config.triplet_loss_weight,
                   negative_selection=config.negative_selection,
                   sample_across_studies=bool(config.cross),
                   perturb_labels=bool(config.perturb),
                   perturb_labels_fraction=config.perturb_fraction),
        l1=config.l1,
        parent=ontology.parent_matrix(selection.label_ids) if config.perturb else None,
        l1_layer=config.l1_layer, triplet_log=triplet_log)
    trainer = Trainer(
        model, objective, train, val,
        TrainerConfig(max_epochs=config.max_epochs, lr=config.lr, weight_decay=config.l2,
                      cosine_annealing_tmax=config.cosine_annealing_tmax,
                      mixed_precision=config.mixed_precision, seed=config.seed,
                      run_dir=str(run_dir(config)), checkpoint_every=config.checkpoint_every,
                      keep_checkpoints=config.keep_checkpoints, resume=config.resume,
                      progress=not config.no_progress),
        accelerator=accelerator, optimizer=optimizer,
        hparams={**hyperparameters(config), **data_signature(config, store, selection)})
    return TrainingRun(config=config, accelerator=accelerator, store=store, ontology=ontology,
                       selection=selection, model=model, objective=objective,
                       train_data=train, val_data=val, test_data=test, trainer=trainer)


def open_source(config: TrainingConfig, store_uri: str | None = None) -> CellSource:
    """The data ``config`` names: a Census release, a SOMA experiment, or a CellArr store
    (``config.tiledb``, else ``store_uri``).

    Raises:
        ValueError: the config names no data and no ``store_uri`` is given.
        StoreError: the source cannot be opened (the message says why and what to pass).
    """
    options = {"gene_column": config.gene_column} if config.gene_column else {}
    if config.soma or config.census:
        from scimtrain.soma import SomaSource, census_source

        options.update(measurement=config.soma_measurement, layer=config.soma_layer)
        if config.census:
            return census_source(config.census, config.census_organism, **options)
        return SomaSource(config.soma, **options)
    uri = config.tiledb or store_uri
    if uri is None:
        raise ValueError("the config names no data: set tiledb, soma or census (bin/train.py "
                         "builds a demo store when none is given)")
    return CellArrStore(uri, counts=config.counts_location, **options)


def with_source_defaults(config: TrainingConfig, source: CellSource) -> TrainingConfig:
    """``config`` with the column fields it leaves ``None`` set to the source's defaults."""
    unset = {name: value for name, value in source.columns_default.items()
             if name in FIELDS and getattr(config, name) is None}
    return config.replace(**unset) if unset else config


def training_cache(config: TrainingConfig, store: CellSource, selection: Selection,
                   accelerator: Accelerator, target_sum: float) -> TrainingCache | None:
    """The run's training cache (``config.cache == "auto"``), or None to stream from the source.

    One process per node builds it (the others wait, then map the same files); a cache that
    cannot be made (disk space, permissions) is reported in one line and the run streams
    from the source (slowly: a SOMA experiment is read cell by cell), whose batches are the
    same bit for bit. ``target_sum`` is the streams' normalisation, which the cache's values
    are stored with.
    """
    if config.cache == "off":
        return None
    cells = np.concatenate([selection.train.index.to_numpy(np.int64),
                            selection.val.index.to_numpy(np.int64)])
    local_main = accelerator.is_local_main_process
    # The error is handled inside the block: Accelerate's "first" does not release the other
    # ranks when the block raises.
    with accelerator.local_main_process_first():
        try:
            return TrainingCache.ensure(
                store, cells, selection.gene_indices, config.cache_dir,
                target_sum=target_sum,
                progress=local_main and not config.no_progress,
                announce=print if local_main else (lambda _: None))
        except CacheError as exc:
            if local_main:
                print(f"training cache: {exc}; streaming from {store.uri} instead (--cache "
                      "off silences this)")
            return None


def _new_model(config: TrainingConfig, n_genes: int) -> EncoderDecoder:
    return EncoderDecoder(n_genes, latent_dim=config.latent_dim, hidden_dim=config.hidden_dim,
                          dropout=config.dropout, input_dropout=config.input_dropout)


def _lines(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip()]


def selection_config(config: TrainingConfig) -> SelectionConfig:
    """The selection's inputs, files read (a malformed samples file is a ConfigError)."""
    pairs = []
    for line in _lines(config.exclude_samples_file):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ConfigError(f"--exclude_samples_file {config.exclude_samples_file}: expected "
                             f"'study<TAB>sample' per line, got {line!r}")
        pairs.append((fields[0], fields[1]))
    return SelectionConfig(
        label_column=config.label_id_column, study_column=config.study_column,
        sample_column=config.sample_column, filter_condition=config.filter_condition,
        exclude_studies=tuple(config.exclude_studies) + tuple(
            _lines(config.exclude_studies_file)),
        exclude_samples=tuple(pairs),
        val_studies=tuple(config.val_studies) + tuple(_lines(config.val_studies_file)),
        val_min_studies=config.val_min_studies, gene_order=config.gene_order,
        allow_unknown_labels=config.allow_unknown_labels)


def stream_config(config: TrainingConfig) -> StreamConfig:
    """The loader settings (workers capped at the CPU cores)."""
    return StreamConfig(
        batch_size=config.batch_size, n_batches=config.n_batches, seed=config.seed,
        pool_batches=config.pool_batches, prefetch_pools=config.prefetch_pools,
        num_workers=min(config.num_workers, os.cpu_count() or 1),
        multiprocessing_context=config.worker_start_method,
        output="csr" if config.sparse_batches else "dense",
        tiledb_threads=config.tiledb_threads, tiledb_memory_mb=config.tiledb_memory_mb)


def hyperparameters(config: TrainingConfig) -> dict[str, Any]:
    """The model folder's ``hyperparameters.json`` (SCimilarity's keys)."""
    return {
        "latent_dim": config.latent_dim, "hidden_dim": list(config.hidden_dim),
        "dropout": config.dropout, "input_dropout": config.input_dropout,
        "margin": config.margin, "triplet_loss_weight": config.triplet_loss_weight,
        "negative_selection": config.negative_selection,
        "sample_across_studies": bool(config.cross), "perturb_labels": bool(config.perturb),
        "perturb_labels_fraction": config.perturb_fraction, "lr": config.lr,
        "l1_lambda": config.l1, "l2_lambda": config.l2, "batch_size": config.batch_size,
        "max_epochs": config.max_epochs,
        # scimtrain's (docs/scimilarity.md §9): the L1 penalty's Linear; how training began
        "l1_layer": config.l1_layer, "init_from": config.init_from,
        "freeze": bool(config.freeze), "dynamic_weights": bool(config.dynamic_weights),
        "dynamic_weight_decay": config.dynamic_weight_decay,
    }


def data_signature(config: TrainingConfig, store: CellSource,
                   selection: Selection) -> dict[str, Any]:
    """What decides the data a run trains on; a resumed run must match it exactly.

    The settings as given, and a digest of the selection they produced (cells, weights,
    label integers, gene order), which also changes when the store's content does.
    """
    digest = hashlib.sha256()
    for frame in (selection.train, selection.val):
        digest.update(frame.index.to_numpy(np.int64).tobytes())
        digest.update(frame[WEIGHT].to_numpy(np.float64).tobytes())
        digest.update(frame[LABEL_INT].to_numpy(np.int64).tobytes())
    digest.update("\n".join(selection.gene_order).encode())
    keys = ("counts_location", "label_id_column", "study_column", "sample_column",
            "filter_condition", "val_studies", "val_studies_file", "val_min_studies",
            "exclude_studies", "exclude_studies_file", "exclude_samples_file", "ontology",
            "gene_order", "batch_size", "n_batches", "val_batches", "seed")
    if store.kind == "soma":  # which counts (a SOMA source's only; earlier runs lack them)
        keys += ("soma_measurement", "soma_layer")
    return {"store": store.uri, **{k: getattr(config, k) for k in keys},
            "n_genes": len(selection.gene_order), "n_labels": selection.n_labels,
            "selection_sha256": digest.hexdigest()}
