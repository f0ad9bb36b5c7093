"""Triplet tracking (``--track_triplets DIR``, docs/scimilarity.md §9): each training step's
mined triplets as ``DIR/train_triplets.{step}.csv.gz``.

Columns are SCimilarity's: ``anchor_label, anchor_studies, positive_label, positive_studies,
negative_label, negative_studies`` (label names; study names), the study columns only when the
cross-study rule is on. ``step`` counts from 0 (SCimilarity's ``global_step`` inside its
training step), and steps above ``above_step`` are written.

:meth:`TripletLog.record` is called by the objective on every rank with the triplets its loss
used. The step does not wait for the file: the rows are gathered to the main process as device
tensors (under DDP, ``accelerator.gather`` of tensors padded to the longest rank's, every
rank's triplets in rank order, so one file per step holds them all; the gather's size
exchange is the only synchronisation added) and a background thread copies them to the host,
names them and writes the file (under a temporary name, renamed when complete). The queue to
that thread is bounded, so a writer that falls far behind slows training down instead of
filling memory. A write that fails is raised at the next ``record`` or at :meth:`close`.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from scimtrain.atomic import written_aside
from scimtrain.losses import MinedTriplets

COLUMNS = ("anchor_label", "anchor_studies", "positive_label", "positive_studies",
           "negative_label", "negative_studies")
LABEL_COLUMNS = ("anchor_label", "positive_label", "negative_label")
_STOP = object()


def triplet_file(folder: str | os.PathLike, step: int) -> Path:
    """``{folder}/train_triplets.{step}.csv.gz``."""
    return Path(folder) / f"train_triplets.{step}.csv.gz"


class TripletLog:
    """Writes the triplets of training steps above ``above_step`` to ``folder``.

    Args:
        folder: where the files go (made if missing, by the main process).
        int2label: label integer → label name.
        studies: study names by study integer.
        above_step: write steps ``> above_step`` (-1: every step).
        with_studies: write the study columns (the cross-study rule is on).
        accelerator: gathers every rank's triplets to the main process (None: one process).
        queue_size: steps waiting for the writer before ``record`` waits.
    """

    def __init__(self, folder: str | os.PathLike, int2label: Mapping[int, str],
                 studies: Sequence[str], *, above_step: int = -1, with_studies: bool = True,
                 accelerator: Any = None, queue_size: int = 64) -> None:
        self.folder = Path(folder)
        self.above_step = int(above_step)
        self.with_studies = bool(with_studies)
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        n_labels = max(int2label) + 1 if int2label else 0
        self.label_names = np.array([int2label.get(i, "") for i in range(n_labels)],
                                    dtype=object)
        self.study_names = np.array(list(studies), dtype=object)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            atexit.register(self.close)

    def wants(self, step: int) -> bool:
        """Whether step ``step`` (from 0) is tracked."""
        return step > self.above_step

    def record(self, step: int, triplets: MinedTriplets, studies: torch.Tensor | None) -> None:
        """Queue step ``step``'s triplets (every rank calls this at the same steps)."""
        self._raise_failure()
        a, p, n, labels = triplets
        parts = [labels.index_select(0, a)]
        if self.with_studies:
            parts.append(studies.index_select(0, a))
        parts.append(labels.index_select(0, p))
        if self.with_studies:
            parts.append(studies.index_select(0, p))
        parts.append(labels.index_select(0, n))
        if self.with_studies:
            parts.append(studies.index_select(0, n))
        codes = torch.stack([t.to(torch.int64) for t in parts], dim=1)
        counts = None
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            count = torch.tensor([codes.shape[0]], dtype=torch.int64, device=codes.device)
            counts = acc.gather(count)
            codes = acc.gather(acc.pad_across_processes(codes, dim=0))
        if self.is_main:
            if self._thread is None:
                # A daemon thread never keeps the interpreter alive; atexit still drains it.
                self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                                name="triplet-log")
                self._thread.start()
            self._queue.put((step, codes.detach(), counts))

    def close(self) -> None:
        """Write what is queued and stop the writer; raise a write that failed."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join()
        self._raise_failure()

    # ------------------------------------------------------------------ the writer

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing tracked triplets to {self.folder} failed: "
                               f"{error}") from error

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so that record() never blocks forever
            try:
                self._write(*item)
            except BaseException as exc:  # reported to the training thread
                self._error = exc

    def _write(self, step: int, codes: torch.Tensor, counts: torch.Tensor | None) -> None:
        rows = codes.cpu().numpy()
        if counts is not None:  # rank r's rows are its first counts[r] of its padded block
            counts = counts.cpu().numpy()
            block = rows.shape[0] // counts.size
            rows = np.concatenate([rows[r * block:r * block + c] for r, c in enumerate(counts)])
        names = LABEL_COLUMNS if not self.with_studies else COLUMNS
        frame = pd.DataFrame({
            name: (self.study_names if name.endswith("_studies") else self.label_names)[
                rows[:, j]] for j, name in enumerate(names)})
        with written_aside(triplet_file(self.folder, step), replace=True) as tmp:
            frame.to_csv(tmp, index=False, compression="gzip")
