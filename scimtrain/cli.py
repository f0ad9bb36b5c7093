"""``bin/train.py`` / ``scimtrain-train``: SCimilarity's training command on scimtrain.

Flags keep SCimilarity's names, short aliases and defaults; they are generated from
:class:`~scimtrain.config.TrainingConfig`, and ``--config FILE`` (JSON, YAML or TOML, keys =
long flag names) sets defaults that flags override. Without ``--tiledb`` a small synthetic
demo store is built once (cached) and a small model trained on it.

A mistake in the input (a store, a selection, a checkpoint, a config value) ends in one line
saying what to fix and exit status 2; ``--debug`` shows the traceback. A preemption signal
(SIGTERM, SIGUSR1) ends the run after a checkpoint, with status 128 + the signal number.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Sequence

from scimtrain.atomic import temporary_sibling, written_aside
from scimtrain.build import OutputError, build_training, test_file
from scimtrain.cache import CacheError
from scimtrain.checkpoint import CheckpointError
from scimtrain.config import SOURCES, ConfigError, TrainingConfig, parse_args
from scimtrain.h5ad import IngestError
from scimtrain.model_folder import ModelFolderError
from scimtrain.ontology import OntologyFileError, UnknownTermError
from scimtrain.runlock import RunLockedError
from scimtrain.sampling import SamplingError
from scimtrain.selection import SelectionError
from scimtrain.store import StoreError
from scimtrain.trainer import TrainingInterrupted, make_accelerator

# The package's own error kinds: each message names the input and the fix, so the user sees
# that line, not a traceback.
USER_ERRORS = (StoreError, SelectionError, SamplingError, CheckpointError, IngestError,
               ConfigError, OutputError, RunLockedError, ModelFolderError, OntologyFileError,
               UnknownTermError, CacheError)


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              line: str | None = None) -> str:
    return f"scimtrain-train: warning: {message}\n"


def demo_store() -> str:
    """The demo store, built once under ``$SCIMTRAIN_CACHE`` (default ~/.cache/scimtrain)."""
    from scimtrain.synthetic import SIMULATION_VERSION, SyntheticConfig, make_synthetic_store

    cache = Path(os.environ.get("SCIMTRAIN_CACHE", Path.home() / ".cache" / "scimtrain"))
    uri = cache / f"demo-store-v{SIMULATION_VERSION}"
    _remove_stale_builds(cache, f"{temporary_sibling(uri).name}.")
    if not uri.exists():
        print(f"building the demo store at {uri} (once)")
        try:
            # Built aside and renamed: an interrupted build never looks like a finished store.
            with written_aside(uri, tag=str(os.getpid())) as tmp:
                make_synthetic_store(tmp, SyntheticConfig(n_cells=20_000, n_genes=2_000),
                                     overwrite=True)
        except OSError:
            if not uri.exists():  # else another process finished first
                raise
    return str(uri)


def _remove_stale_builds(folder: Path, prefix: str) -> None:
    """Remove ``{prefix}{pid}`` folders whose building process is gone (killed builds)."""
    if not folder.is_dir():
        return
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def run(config: TrainingConfig) -> dict[str, float] | None:
    """Train as the config says; returns the test metrics (None without validation)."""
    model_dir = Path(config.model_folder) / config.model_name
    if model_dir.exists() and (test_file(config).exists() or not (
            config.val_studies or config.val_studies_file)):
        print(f"model folder {model_dir} already exists: nothing to train (remove it or "
              "change --suffix to train again)")
        return None
    accelerator = make_accelerator(config.mixed_precision, cpu=True if config.cpu else None)
    store_uri = None
    if not any(getattr(config, name) for name in SOURCES):
        with accelerator.main_process_first():  # the main process builds the demo store once
            store_uri = demo_store()
    return build_training(config, accelerator=accelerator, store_uri=store_uri).fit()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line and a non-zero status for a mistake in the input."""
    warnings.formatwarning = _one_line  # notes for the user, not for a debugger
    config = parse_args(argv)
    try:
        run(config)
    except TrainingInterrupted as exc:
        print(f"scimtrain-train: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except USER_ERRORS as exc:
        if config.debug:
            raise
        print(f"scimtrain-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("scimtrain-train: interrupted; run the same command again to continue from the "
              "last checkpoint", file=sys.stderr)
        sys.exit(130)
