"""``TrainingConfig``: every setting of a training run, as one validated dataclass.

Field names are the long flag names of ``bin/train.py`` and defaults are the flags' defaults
(SCimilarity's, see docs/scimilarity.md). The command line is generated from the fields
(:func:`build_parser`), and config files (JSON, YAML, TOML; keys = field names) go through the
same per-field conversion (:func:`coerce`), so a value means the same wherever it comes from:
a scalar where a list is expected is a one-element list, ``"false"`` is False, ``64.7`` is not
an integer. A bad value raises :class:`ConfigError` (a ``ValueError``) naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from scimtrain.columns import (
    CENSUS_COLUMNS,
    GENE_SYMBOL_COLUMN,
    LABEL_COLUMN,
    SAMPLE_COLUMN,
    STUDY_COLUMN,
)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the field (and the file) and the fix."""


def _opt(default: Any, help: str = "", *, group: str = "training", short: str | None = None,
         choices: Sequence[Any] | None = None, metavar: str | None = None,
         at_least: float | None = None, below: float | None = None,
         at_most: float | None = None, file: bool = False) -> Any:
    """A dataclass field carrying its flag's help, short alias, choices and bounds."""
    meta = {"help": help, "group": group, "short": short, "choices": choices,
            "metavar": metavar, "at_least": at_least, "below": below, "at_most": at_most,
            "file": file}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    """Everything a training run needs to know; see ``bin/train.py --help`` for each field.

    The data is one of ``tiledb`` (a CellArr store), ``soma`` (a SOMA experiment) or
    ``census`` (a CELLxGENE Census release); with none, the built-in synthetic demo store (with
    :data:`DEMO_DEFAULTS` applied by the command line). Column fields left ``None`` take the
    source's defaults (SCimilarity's names for a CellArr store, the Census's for SOMA).
    Construct it directly from Python, from a mapping (:meth:`from_mapping`), or from a file
    (:meth:`from_file`); every value is checked.
    """

    # data
    tiledb: str | None = _opt(None, "CellArr store folder or TileDB URI (default without "
                              "--soma/--census: the demo store)", group="data", metavar="STORE")
    soma: str | None = _opt(None, "SOMA experiment folder or URI (s3://...) instead of --tiledb",
                            group="data", metavar="EXPERIMENT")
    census: str | None = _opt(
        None, "CELLxGENE Census release (e.g. 2025-01-30 or stable) instead of --tiledb; needs "
        "network access and the soma extra", group="data", metavar="VERSION")
    census_organism: str = _opt("homo_sapiens", "the Census experiment (with --census)",
                                group="data")
    soma_measurement: str = _opt("RNA", "measurement holding genes and counts (SOMA)",
                                 group="data")
    soma_layer: str = _opt("raw", "X layer of raw counts (SOMA)", group="data")
    counts_location: str | None = _opt(
        None, "counts array under the store (default: counts or assays/counts)", group="data")
    label_id_column: str | None = _opt(
        None, f"cell label column (default: {LABEL_COLUMN}; SOMA: "
        f"{CENSUS_COLUMNS['label_id_column']})", group="data")
    study_column: str | None = _opt(
        None, f"study column (default: {STUDY_COLUMN}; SOMA: {CENSUS_COLUMNS['study_column']})",
        group="data")
    sample_column: str | None = _opt(
        None, f"sample column (default: {SAMPLE_COLUMN}; SOMA: "
        f"{CENSUS_COLUMNS['sample_column']})", group="data")
    gene_column: str | None = _opt(
        None, f"gene symbol column of the gene annotation (default: {GENE_SYMBOL_COLUMN}; "
        f"SOMA: var's {CENSUS_COLUMNS['gene_column']})", group="data")
    gene_order: str | None = _opt(None, "one gene symbol per line", group="data",
                                  metavar="FILE", file=True)
    filter_condition: str | None = _opt(
        None, "TileDB query condition selecting cells (default: SCimilarity's QC filter on "
        "the label column)", group="data")
    val_studies: list[str] = _opt([], "validation (and test) studies", group="data",
                                  metavar="STUDY")
    val_studies_file: str | None = _opt(None, "one study per line", group="data",
                                        metavar="FILE", file=True)
    val_min_studies: int = _opt(
        2, "labels must be seen in this many validation studies to stay in validation "
        "(SCimilarity: 2; 1 keeps a single validation study)", group="data", at_least=1)
    exclude_studies: list[str] = _opt([], group="data", metavar="STUDY")
    exclude_studies_file: str | None = _opt(None, "one study per line", group="data",
                                            metavar="FILE", file=True)
    exclude_samples_file: str | None = _opt(
        None, "tab-separated study and sample, one pair per line", group="data",
        metavar="FILE", file=True)
    ontology: str = _opt("default", "'default' (shipped CL snapshot), 'none' (plain labels) "
                         "or an OBO/JSON file", group="data")
    allow_unknown_labels: bool = _opt(
        False, "train even when labels unknown to the ontology drop most cells", group="data")
    # model and loss
    margin: float = _opt(0.05, group="model and loss", short="-m")
    triplet_loss_weight: float = _opt(0.001, group="model and loss", short="-w", at_least=0,
                                      at_most=1)
    negative_selection: str = _opt("semihard", group="model and loss", short="-t",
                                   choices=("semihard", "hardest", "random"))
    latent_dim: int = _opt(128, group="model and loss", at_least=1)
    hidden_dim: list[int] = _opt([1024, 1024, 1024], group="model and loss", at_least=1)
    input_dropout: float = _opt(0.4, group="model and loss", at_least=0, below=1)
    dropout: float = _opt(0.5, group="model and loss", at_least=0, below=1)
    l1: float = _opt(1e-4, group="model and loss", at_least=0)
    l2: float = _opt(0.01, group="model and loss", at_least=0)
    cross: int = _opt(1, "1: positive pairs come from different studies",
                      group="model and loss", choices=(0, 1))
    perturb: int = _opt(0, "1: perturb labels to ontology parents before mining",
                        group="model and loss", choices=(0, 1))
    perturb_fraction: float = _opt(0.5, group="model and loss", at_least=0)
    # training
    batch_size: int = _opt(1000, short="-b", at_least=1)
    max_epochs: int = _opt(500, short="-e", at_least=1)
    n_batches: int = _opt(100, "batches per epoch", short="-n", at_least=1)
    val_batches: int = _opt(10, "validation batches per epoch", at_least=0)
    lr: float = _opt(0.005, short="-l")
    cosine_annealing_tmax: int = _opt(0, "0 or more than max_epochs: max_epochs", at_least=0)
    seed: int = _opt(0)
    mixed_precision: str = _opt("no", choices=("no", "bf16", "fp16"))
    cpu: bool = _opt(False, "train on the CPU even with a GPU")
    deterministic: bool = _opt(
        False, "bitwise-reproducible kernels where the default ones are not (see README)")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: at epoch ends only)",
                                 at_least=0)
    keep_checkpoints: int = _opt(2, at_least=1)
    resume: str = _opt("auto", "auto (newest checkpoint of this run), none, or a checkpoint "
                       "folder")
    # loader
    num_workers: int = _opt(8, "DataLoader workers per process (capped at the CPU cores)",
                            group="loader", at_least=0)
    pool_batches: int = _opt(16, "batches read together in one sorted TileDB query",
                             group="loader", at_least=1)
    prefetch_pools: int = _opt(1, "pools read ahead per worker", group="loader", at_least=0)
    tiledb_threads: int | None = _opt(
        None, "TileDB threads per reading process (default: 1 per worker, TileDB's own "
        "choice without workers)", group="loader", at_least=1)
    tiledb_memory_mb: int = _opt(256, "TileDB memory budget per reading process",
                                 group="loader", at_least=1)
    sparse_batches: bool = _opt(False, "move batches as CSR and densify on the device",
                                group="loader")
    cache: str = _opt(
        "auto", "auto: train from a local memory-mapped copy of the selected cells, built once "
        "and reused (falls back to TileDB when it cannot be made); off: stream from TileDB",
        group="loader", choices=("auto", "off"))
    cache_dir: str | None = _opt(
        None, "where training caches live (default: $SCIMTRAIN_CACHE/training-cache or "
        "~/.cache/scimtrain/training-cache)", group="loader")
    worker_start_method: str | None = _opt(
        None, "how loader workers start (default: the platform's, fork on Linux)",
        group="loader", choices=("fork", "spawn", "forkserver"))
    # output
    suffix: str = _opt("version_0", group="output")
    model_folder: str = _opt("models", group="output")
    result_folder: str = _opt("results", group="output")
    log_folder: str = _opt("logs", group="output")
    no_progress: bool = _opt(False, "no progress bar", group="output")
    debug: bool = _opt(False, "show tracebacks for errors in the input", group="output")
    # SCimilarity's optional training features (docs/scimilarity.md §9, issue 14)
    l1_layer: str = _opt(
        "last", "encoder Linear the L1 penalty applies to: last (the bottleneck, what "
        "SCimilarity's code penalises) or first (gene-level sparsity)",
        group="optional features", choices=("last", "first"))
    init_from: str | None = _opt(
        None, "start from this model folder's encoder and decoder (scimtrain's or "
        "SCimilarity's release layout); its gene order unless --gene_order is given",
        group="optional features", metavar="MODEL_FOLDER")
    freeze: int = _opt(
        0, "1 (with --init_from): freeze every encoder Linear and BatchNorm (statistics too) "
        "except the bottleneck Linear", group="optional features", choices=(0, 1))
    dynamic_weights: int = _opt(
        0, "1: after each batch the drawn cells' sampling weights are multiplied by "
        "--dynamic_weight_decay (floor 0.01), per rank", group="optional features",
        choices=(0, 1))
    dynamic_weight_decay: float = _opt(
        0.5, "factor on a drawn cell's sampling weight (with --dynamic_weights 1)",
        group="optional features", at_least=0, at_most=1)
    track_triplets: str | None = _opt(
        None, "write each training step's mined triplets to DIR/train_triplets.{step}.csv.gz",
        group="optional features", metavar="DIR")
    track_triplets_above_step: int = _opt(
        -1, "track only the steps above this one (steps count from 0)",
        group="optional features")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        sources = [f"--{name}" for name in SOURCES if getattr(self, name)]
        if len(sources) > 1:
            raise ConfigError(f"{' and '.join(sources)} each name the training data: give one")
        if self.counts_location and (self.soma or self.census):
            raise ConfigError("counts_location is a CellArr store's (--tiledb); a SOMA source's "
                              "counts are --soma_measurement / --soma_layer")
        if self.margin <= 0:
            raise ConfigError(f"margin must be > 0, got {self.margin}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.hidden_dim:
            raise ConfigError("hidden_dim needs at least one size, e.g. [1024, 1024, 1024]")
        if self.freeze and not self.init_from:
            raise ConfigError("freeze 1 freezes the layers of a loaded model: give --init_from "
                              "MODEL_FOLDER too")
        if self.resume not in ("auto", "none") and not os.path.isdir(self.resume):
            raise ConfigError(f"resume {self.resume!r}: give auto, none, or an existing "
                              "checkpoint folder")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> TrainingConfig:
        """A config from a mapping of field names to values; unknown keys are an error."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}; valid keys are the long "
                              f"flag names: {sorted(FIELDS)}")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainingConfig:
        """A config from a JSON, YAML or TOML file (keys = field names)."""
        return cls.from_mapping(read_config_file(path), source=f"config file {path}")

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ derived

    @property
    def model_name(self) -> str:
        """SCimilarity's model folder name.

        ``model_{batch}_{margin}_{latent}_{n_hidden}_{triplet_weight}_{suffix}``.
        """
        return (f"model_{self.batch_size}_{self.margin}_{self.latent_dim}_"
                f"{len(self.hidden_dim)}_{self.triplet_loss_weight}_{self.suffix}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELDS: dict[str, Any] = {f.name: f for f in fields(TrainingConfig)}
# The fields naming the training data: at most one is set.
SOURCES = ("tiledb", "soma", "census")
_HINTS = typing.get_type_hints(TrainingConfig)

# Settings the demo (no --tiledb) uses unless given: trains in about a minute on 2 cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "batch_size": 256, "n_batches": 20, "max_epochs": 12, "latent_dim": 64,
    "hidden_dim": [256, 256], "val_studies": ["study_06", "study_07"], "val_batches": 4,
    "num_workers": 2, "checkpoint_every": 50, "suffix": "demo",
}


# --------------------------------------------------------------------------- conversion


def _base(name: str) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _scalar(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a study named 2019 in YAML
    raise ConfigError(f"{name} must be a string, got {value!r}")


def coerce(name: str, value: Any) -> Any:
    """Convert ``value`` to field ``name``'s type and check its choices and bounds.

    Raises:
        ConfigError: naming the field, the value and what is expected.
    """
    meta = FIELDS[name].metadata
    kind, is_list, optional = _base(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty (null)")
    if is_list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = [_scalar(name, kind, v) for v in items]
    else:
        if isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"{name} takes one value, got {value!r}")
        out = _scalar(name, kind, value)
    for v in out if is_list else [out]:
        _check_bounds(name, v, meta)
    if meta["file"] and out and not os.path.isfile(out):
        raise ConfigError(f"{name} {out}: no such file")
    return out


def _check_bounds(name: str, v: Any, meta: Mapping[str, Any]) -> None:
    if meta["choices"] is not None and v not in meta["choices"]:
        raise ConfigError(f"{name} must be one of {list(meta['choices'])}, got {v!r}")
    if meta["at_least"] is not None and v < meta["at_least"]:
        raise ConfigError(f"{name} must be at least {meta['at_least']:g}, got {v}")
    if meta["at_most"] is not None and v > meta["at_most"]:
        raise ConfigError(f"{name} must be at most {meta['at_most']:g}, got {v}")
    if meta["below"] is not None and not v < meta["below"]:
        raise ConfigError(f"{name} must be below {meta['below']:g}, got {v}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a JSON, YAML or TOML file (values not yet converted)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path}: use a .json, .yaml/.yml or .toml file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # a syntax error in the file
        raise ConfigError(f"config file {path} is not valid {suffix[1:]}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    return values


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    """``bin/train.py``'s flags, one per :class:`TrainingConfig` field, plus ``--config``."""
    p = _Parser(
        prog="scimtrain-train",
        description="Train a SCimilarity-style cell embedding on a CellArr TileDB store "
                    "or a SOMA experiment (--soma, --census). Without either, trains a small "
                    "model on a synthetic demo store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="JSON, YAML or TOML file of defaults (keys: long flag names)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        flags = [meta["short"]] if meta["short"] else []
        flags.append(f"--{name}")
        kind, is_list, _ = _base(name)
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"help": meta["help"] or " ", "default": default}
        if kind is bool:
            group.add_argument(*flags, action="store_true", **kwargs)
            continue
        kwargs["type"] = _arg_type(name, kind)
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if is_list:
            kwargs["nargs"] = "+" if name == "hidden_dim" else "*"
        group.add_argument(*flags, **kwargs)
    return p


def _arg_type(name: str, kind: type):
    def convert(text: str) -> Any:
        try:
            return _scalar(name, kind, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def parse_args(argv: Sequence[str] | None = None) -> TrainingConfig:
    """Flags over config file over demo defaults over SCimilarity defaults.

    Exits with a one-line usage error naming the flag or the file's key on bad input.
    """
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    file_values: dict[str, Any] = {}
    if first.config:
        try:
            file_values = TrainingConfig.from_file(first.config).to_dict()
            explicit = read_config_file(first.config)
            file_values = {k: file_values[k] for k in explicit}
        except ConfigError as exc:
            parser.error(str(exc))
    if not any(getattr(first, name) or file_values.get(name) for name in SOURCES):
        parser.set_defaults(**DEMO_DEFAULTS)
    parser.set_defaults(**file_values)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return TrainingConfig(**args)
    except ConfigError as exc:
        parser.error(str(exc))
