"""The scimtrain side of the peer runs: export the cells once as h5ad, run each peer's script
in its own virtual environment, read back its result line.

A peer's virtual environment is ``VENV_DIR/<peer>`` (``VENV_DIR/annbatch``,
``VENV_DIR/bionemo-scdl``; README "Loader" says how to make them). The export and the peers'
converted copies live in ``DATA_DIR/<key>``, the key naming the store, its counts array's
fragments, the cells and the gene order, so a rerun on the same selection converts nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tiledb

from scimtrain.store import CellArrStore

HERE = Path(__file__).resolve().parent
SCRIPTS = {"annbatch": "annbatch_peer.py", "bionemo-scdl": "scdl_peer.py"}
ALIASES = {"annbatch": "annbatch", "scdl": "bionemo-scdl", "bionemo-scdl": "bionemo-scdl"}
RESULT_PREFIX = "PEER_RESULT "
EXPORT_CHUNK = 16_000  # cells read and appended at a time (bounds the export's memory)


@dataclass(frozen=True)
class PeerResult:
    """One peer's run: ``cells_per_s`` of dense log-normalised batches, conversion seconds
    (None when its converted copy was reused) and whatever else its script reported."""

    name: str
    cells_per_s: float
    convert_s: float | None
    fields: dict


def peer_names(spec: str) -> list[str]:
    """``"annbatch,scdl"`` -> ``["annbatch", "bionemo-scdl"]``; unknown names are an error."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ALIASES]
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {', '.join(unknown)}; choose from "
                         "annbatch, scdl (bionemo-scdl)")
    return list(dict.fromkeys(ALIASES[n] for n in names))


def venv_python(venv_dir: Path, name: str) -> Path:
    """The peer's interpreter; a clear error naming the setup command when it is missing."""
    python = venv_dir / name / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"--peer-venv-dir: no {python}; create it as README 'Loader' says "
                         f"(python3.12 -m venv {venv_dir / name} && ...)")
    return python


def data_key(store: CellArrStore, cells: np.ndarray, gene_indices: np.ndarray) -> str:
    """Names what an export was made from: store path, counts fragments, cells, genes."""
    digest = hashlib.sha1()
    digest.update(os.path.abspath(store.uri).encode())
    fragments = tiledb.array_fragments(store.counts_uri)
    digest.update(json.dumps(sorted(os.path.basename(f) for f in fragments.uri)).encode())
    digest.update(np.ascontiguousarray(cells, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(gene_indices, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def export_h5ad(store: CellArrStore, cells: np.ndarray, gene_indices: np.ndarray,
                gene_names: list[str], path: Path) -> float | None:
    """Writes ``cells`` (store rows, in this order) x ``gene_indices`` (model order) as raw
    float32 counts in a CSR h5ad at ``path``, chunk by chunk; seconds taken, or None when a
    complete export is already there. Written aside and renamed, so a file at ``path`` is
    always complete."""
    import anndata as ad  # the ingest extra; only the peer runs need it
    import h5py

    if path.exists():
        return None
    start = time.perf_counter()
    partial = path.with_suffix(".partial.h5ad")
    obs = pd.DataFrame(index=pd.Index([str(c) for c in cells], name="cell_index"))
    var = pd.DataFrame(index=pd.Index(gene_names, name="gene"))
    first = _read(store, cells[:EXPORT_CHUNK], gene_indices)
    ad.AnnData(X=first, obs=obs.iloc[: first.shape[0]], var=var).write_h5ad(partial)
    with h5py.File(partial, "r+") as f:
        x = ad.io.sparse_dataset(f["X"])
        for lo in range(EXPORT_CHUNK, cells.size, EXPORT_CHUNK):
            x.append(_read(store, cells[lo:lo + EXPORT_CHUNK], gene_indices))
        del f["obs"]
        ad.io.write_elem(f, "obs", obs)
    partial.rename(path)
    return time.perf_counter() - start


def _read(store: CellArrStore, cells: np.ndarray, gene_indices: np.ndarray):
    rows = store.read_rows(cells)[:, gene_indices]
    rows.sort_indices()
    return rows.astype(np.float32)


def run_peer(name: str, python: Path, h5ad: Path, work: Path, *, batch_size: int,
             batches: int, workers: int, seed: int, target_sum: float) -> PeerResult:
    """Runs one peer's script in its environment and parses its result line."""
    command = [str(python), str(HERE / SCRIPTS[name]), "--h5ad", str(h5ad), "--work", str(work),
               "--batch-size", str(batch_size), "--batches", str(batches),
               "--workers", str(workers), "--seed", str(seed), "--target-sum", str(target_sum)]
    # The peer's own environment only: scimtrain's PYTHONPATH/site would mix the two.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"peer {name} failed (exit {done.returncode}); its output is above")
    fields = json.loads(lines[-1][len(RESULT_PREFIX):])
    return PeerResult(name, float(fields["cells_per_s"]), fields.get("convert_s"), fields)
