"""The training loop: plain PyTorch on Hugging Face Accelerate, readable top to bottom.

``Trainer(model, step_fn, train_data, val_data, config).fit()`` runs, for each epoch: for each
batch: forward and loss (``step_fn``), backward, optimiser step, log; then the scheduler step,
validation and a checkpoint. The model, optimiser and scheduler go through
``accelerator.prepare``; the data shards itself (a :class:`~scimtrain.stream.CellStream` is
built with ``accelerator.process_index`` / ``num_processes``), so nothing is dispatched from
rank 0. Metrics are averaged across ranks; only the main process writes logs and files.

``step_fn(model, batch, ctx) -> (loss, metrics)`` is the only model-specific piece: any model,
loss and batch format work (see :class:`StepContext`). ``train_data`` is any iterable of
batches; when it has ``set_epoch``, ``state_dict`` and ``load_state_dict`` (as ``CellStream``
does) epochs and exact mid-epoch resume use them, otherwise the consumed batches are skipped
by iterating.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import send_to_device, set_seed
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from scimtrain import runlock
from scimtrain.checkpoint import (
    CheckpointError,
    CheckpointFolder,
    load_checkpoint,
    rng_state,
    save_best,
    save_file,
    set_rng_state,
)
from scimtrain.signals import PREEMPTION_SIGNALS


class TrainingInterrupted(Exception):
    """Training stopped on a preemption signal after writing a checkpoint.

    ``signum`` is the signal, ``checkpoint`` the folder written, ``step`` the last step.
    """

    def __init__(self, signum: int, checkpoint: Path | None, step: int) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        where = f"; checkpoint {checkpoint}" if checkpoint else " (no run folder: no checkpoint)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}{where}. "
                         "Run the same command again to continue from it.")


@dataclass(frozen=True)
class TrainerConfig:
    """Loop settings. Defaults are SCimilarity's (SPEC §5, §8).

    ``run_dir`` holds TensorBoard logs and ``checkpoints/`` (``None``: no files at all).
    ``checkpoint_every``: also checkpoint every N optimiser steps (0: at epoch ends only).
    ``resume``: ``"auto"`` (newest complete checkpoint in ``run_dir``), ``"none"``, or a
    checkpoint folder. ``cosine_annealing_tmax`` 0 or above ``max_epochs`` means ``max_epochs``.
    """

    max_epochs: int = 500
    lr: float = 0.005
    weight_decay: float = 0.01
    cosine_annealing_tmax: int = 0
    mixed_precision: str = "no"
    seed: int = 0
    run_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    validate_every: int = 1
    best_metric: str = "evaluation_metric"
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, not "
                             f"{self.mixed_precision!r}")
        for name in ("max_epochs", "validate_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.checkpoint_every < 0 or self.cosine_annealing_tmax < 0:
            raise ValueError("lr must be > 0; checkpoint_every and cosine_annealing_tmax >= 0")

    def tmax(self) -> int:
        t = self.cosine_annealing_tmax
        return self.max_epochs if t == 0 or t > self.max_epochs else t


class SectionTimer:
    """Wall time per named section of a step (CUDA work is synchronised at section ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = {}


@dataclass
class StepContext:
    """What a step function may use besides the model and the batch.

    ``training``: a training step (else validation/test, under ``torch.no_grad``); ``lr``: the
    scheduler's current learning rate; ``generator``: this process's random stream for the loss
    (mining); ``timer``: ``with ctx.timer("forward"): ...`` adds a section to the step-time
    breakdown; ``raw_model``: the model without DDP/mixed-precision wrappers.
    """

    training: bool
    lr: float
    generator: torch.Generator
    timer: SectionTimer
    raw_model: nn.Module
    epoch: int
    step: int


StepFn = Callable[[nn.Module, Any, StepContext], "tuple[torch.Tensor, Mapping[str, Any]]"]


@dataclass
class TrainerState:
    """Counters that a checkpoint restores."""

    epoch: int = 0
    step: int = 0
    consumed: int = 0
    best: float = math.inf
    history: list[dict] = field(default_factory=list)


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None) -> Accelerator:
    """An Accelerator that forms one process group on CPU-only machines too.

    Without CUDA, ``Accelerator()`` in processes started by ``accelerate launch --multi_gpu``
    reports ``DistributedType.NO`` and one process each: unrelated runs writing the same files.
    ``cpu=True`` makes them one MULTI_CPU (gloo) group. The scheduler steps once per epoch, so
    it is not stepped with the optimiser.
    """
    if cpu is None:
        cpu = not torch.cuda.is_available()
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision and \
            PartialState().num_processes == 1:
        # Accelerate keeps one state per process; a second Trainer in the same (single)
        # process may ask for another precision, which Accelerate would refuse.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       step_scheduler_with_optimizer=False)


class Trainer:
    """Fit a model with ``step_fn`` on ``train_data``; validate on ``val_data``.

    Args:
        model: any ``nn.Module``.
        step_fn: ``(model, batch, ctx) -> (loss, metrics)``; ``metrics`` maps names to floats or
            0-d tensors; a ``"cells"`` entry, if any, is used for the cells/s figure.
        train_data: an iterable of batches (each epoch iterates it once).
        val_data: optional iterable of validation batches.
        config: loop settings.
        accelerator: build data shards with it before passing; default :func:`make_accelerator`.
        optimizer, scheduler: default AdamW(lr, weight_decay) and per-epoch CosineAnnealingLR.
        hparams: recorded in TensorBoard.
    """

    def __init__(self, model: nn.Module, step_fn: StepFn, train_data: Iterable,
                 val_data: Iterable | None = None, config: TrainerConfig = TrainerConfig(), *,
                 accelerator: Accelerator | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.accelerator = accelerator or make_accelerator(config.mixed_precision)
        set_seed(config.seed)  # the same initial weights on every rank
        self.train_data, self.val_data, self.step_fn = train_data, val_data, step_fn
        optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=config.lr,
                                                   weight_decay=config.weight_decay)
        scheduler = scheduler or torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.tmax())
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler)
        self.device = self.accelerator.device
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + rank)
        self.state = TrainerState()
        self.hparams = dict(hparams or {})
        self.run_dir = Path(config.run_dir) if config.run_dir else None
        self.checkpoints = (CheckpointFolder(self.run_dir / "checkpoints",
                                             config.keep_checkpoints) if self.run_dir else None)
        self.writer: SummaryWriter | None = None
        self.timer = SectionTimer(self.device)
        self._batches_digest = hashlib.sha256()
        self._pending: list[dict[str, Any]] = []
        self._signal: int | None = None
        self._stop_agreed = False

    # ------------------------------------------------------------------ the loop

    @property
    def raw_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self) -> list[dict]:
        """Train to ``max_epochs``; returns the validation history (one dict per validation).

        Raises:
            runlock.RunLockedError: another live run trains in the same run folder.
            TrainingInterrupted: a preemption signal (SIGTERM, SIGUSR1) arrived; the step in
                progress was finished and a checkpoint written.
        """
        if self.run_dir and self.is_main:
            runlock.acquire(self.run_dir)
        try:
            with self._preemption_handlers():
                return self._fit()
        finally:
            for data in (self.train_data, self.val_data):  # stops streams' persistent workers
                getattr(data, "close", lambda: None)()
            self._close_writer()
            if self.run_dir and self.is_main:
                runlock.release(self.run_dir)

    def _fit(self) -> list[dict]:
        self._resume()
        cfg, state = self.config, self.state
        steps_per_epoch = _length(self.train_data)
        self._open_writer()
        bar = tqdm(total=cfg.max_epochs * steps_per_epoch if steps_per_epoch else None,
                   initial=state.step, disable=not (cfg.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        with bar:
            while state.epoch < cfg.max_epochs:
                bar.set_description(f"epoch {state.epoch}")
                self.model.train()
                # A checkpoint taken on an epoch's last step resumes at the epoch's end.
                finished = steps_per_epoch is not None and state.consumed >= steps_per_epoch
                batches = () if finished else self._batches(self.train_data, state.epoch,
                                                            state.consumed)
                for batch, waited in batches:
                    self._pending.append(self._train_step(batch, waited))
                    state.step += 1
                    state.consumed += 1
                    bar.update()
                    if state.step % cfg.log_every == 0 or state.consumed == steps_per_epoch:
                        self._flush(bar)
                    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    self._stop_if_signalled()
                self._flush(bar)
                self.scheduler.step()
                state.epoch += 1
                state.consumed = 0
                if self.val_data is not None and state.epoch % cfg.validate_every == 0:
                    self._record_validation(self.validate(state.epoch - 1))
                self.save_checkpoint()
                self._stop_if_signalled()
        self.accelerator.wait_for_everyone()
        return state.history

    def _train_step(self, batch: Any, waited: float) -> dict[str, Any]:
        """One optimiser step; its metrics stay on the device (see :meth:`_flush`)."""
        self.timer.reset()
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        ctx = self._context(training=True, lr=lr)
        # The prepared model runs its forward under autocast and returns float32; the loss and
        # the mining stay in float32.
        loss, metrics = self.step_fn(self.model, batch, ctx)
        with self.timer("backward"):
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        values = {"loss": loss.detach(), **metrics, "lr": lr}
        step_time = time.perf_counter() - started + waited
        values.update({f"time/{k}": v for k, v in self.timer.seconds.items()})
        values.update({"time/data_wait": waited, "time/step": step_time})
        cells = values.pop("cells", None)
        if cells is not None:
            values["cells_per_s"] = float(cells) * self.accelerator.num_processes / step_time
        return {"step": self.state.step + 1, **values}

    def _flush(self, bar: tqdm | None = None) -> None:
        """Log the pending steps' metrics: one device transfer and one collective for all of
        them (and the ranks' preemption flags, so that every rank stops at the same step)."""
        pending, self._pending = self._pending, []
        if not pending and self.accelerator.num_processes == 1:
            return
        names = sorted({k for values in pending for k in values if k != "step"})
        table = _metric_table(pending, names, self.device)
        flag = torch.tensor([[float(self._signal is not None)]], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            # One collective: the metrics' mean and the number of signalled ranks.
            both = torch.cat([table.reshape(-1), flag.reshape(-1)]).to(self.device)
            world = self.accelerator.num_processes
            both = self.accelerator.reduce(both, reduction="sum") / world
            table, flag = both[:-1].reshape(table.shape), both[-1:] * world
        table, flag = table.cpu(), flag.cpu()
        self._stop_agreed = flag.item() > 0
        for values, row in zip(pending, table.tolist()):
            metrics = dict(zip(names, row))
            self._log("train", metrics, values["step"])
        if pending and bar is not None:
            last = dict(zip(names, table[-1].tolist()))
            bar.set_postfix(loss=f"{last['loss']:.4g}",
                            cells_s=f"{last.get('cells_per_s', 0):,.0f}")

    @contextmanager
    def _preemption_handlers(self) -> Iterator[None]:
        """While training, SIGTERM/SIGUSR1 only raise a flag that the loop acts on."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, _frame: Any) -> None:
            self._signal = signum

        previous = {s: signal.signal(s, note) for s in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_if_signalled(self) -> None:
        """After a step: when a preemption signal arrived, checkpoint and stop. With several
        ranks the decision is the one all ranks reached at the last flush."""
        if self.accelerator.num_processes > 1:
            if not self._stop_agreed:
                return
        elif self._signal is None:
            return
        self._flush()
        path = self.save_checkpoint()
        raise TrainingInterrupted(self._signal or PREEMPTION_SIGNALS[0], path, self.state.step)

    @torch.no_grad()
    def validate(self, epoch: int | None = None, data: Iterable | None = None) -> dict[str, float]:
        """Average ``step_fn``'s metrics over ``data`` (default: the validation data), in eval
        mode, across ranks. ``epoch`` selects the validation draw (default: current epoch)."""
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("no validation data was given to the Trainer")
        epoch = self.state.epoch if epoch is None else epoch
        self.model.eval()
        # Validation has its own random stream so it never shifts the training one.
        generator = torch.Generator(device=self.device).manual_seed(
            self.config.seed + 1_000_003 * (epoch + 1) + self.accelerator.process_index)
        totals: dict[str, float] = {}
        count = 0
        for batch, _ in self._batches(data, epoch, 0):
            ctx = self._context(training=False, lr=self.scheduler.get_last_lr()[0],
                                generator=generator)
            _, metrics = self.step_fn(self.model, batch, ctx)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            count += 1
        totals.pop("cells", None)
        means = {k: v / max(count, 1) for k, v in totals.items()}
        self.model.train()
        return self._reduce(means)

    def test(self, data: Iterable | None = None) -> dict[str, float]:
        """The test pass: :meth:`validate` on ``data`` (default: the validation data)."""
        return self.validate(self.state.epoch, data)

    # ------------------------------------------------------------------ pieces

    def _context(self, training: bool, lr: float,
                 generator: torch.Generator | None = None) -> StepContext:
        return StepContext(training=training, lr=lr, generator=generator or self.generator,
                           timer=self.timer, raw_model=self.raw_model,
                           epoch=self.state.epoch, step=self.state.step)

    def _batches(self, data: Iterable, epoch: int, start: int) -> Iterator[tuple[Any, float]]:
        """Batches of ``epoch`` from position ``start``, on the device, with the wait time."""
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)  # a stateful stream keeps its resumed position in that epoch
        if hasattr(data, "load_state_dict") or not start:
            iterator = iter(data)
        else:  # plain data: skip what this epoch already consumed
            iterator = itertools.islice(iter(data), start, None)
        while True:
            began = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if data is self.train_data:  # on the host, before the transfer: no device sync
                self._batches_digest.update(_fingerprint(batch))
            batch = send_to_device(batch, self.device, non_blocking=True)
            batch = _densify(batch)
            yield batch, time.perf_counter() - began

    def _reduce(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Mean of each metric across ranks, as floats (one collective for all of them)."""
        names = sorted(metrics)
        values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64,
                              device=self.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def _record_validation(self, metrics: dict[str, float]) -> None:
        state = self.state
        state.history.append({"epoch": state.epoch - 1, "step": state.step, **metrics})
        self._log("val", metrics, state.step)
        score = metrics.get(self.config.best_metric)
        if score is not None and score < state.best:
            state.best = score
            if self.run_dir and self.is_main:
                save_best(self.run_dir, self.raw_model.state_dict())

    def _open_writer(self) -> None:
        if self.run_dir and self.is_main and self.writer is None:
            self.writer = SummaryWriter(log_dir=str(self.run_dir))
            hparams = {**asdict(self.config), **self.hparams}
            self.writer.add_text("hyperparameters", "\n".join(
                f"    {k}: {v}" for k, v in sorted(hparams.items())))

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def _log(self, split: str, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            tag = name if name.startswith("time/") else f"{split}/{name}"
            self.writer.add_scalar(tag, value, step)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (all ranks must call it)."""
        if self.checkpoints is None:
            return None
        acc, step = self.accelerator, self.state.step
        if acc.is_main_process:
            tmp = self.checkpoints.begin(step)
        acc.wait_for_everyone()
        tmp = self.checkpoints.temporary(step)
        data_state = (self.train_data.state_dict() if hasattr(self.train_data, "state_dict")
                      else None)
        save_file({"rng": rng_state(self.generator), "data": data_state,
                   # Evidence that ranks agree on the weights and differ in their data.
                   "weights_sha256": weights_digest(self.raw_model),
                   "batches_sha256": self._batches_digest.hexdigest(),
                   "process_index": acc.process_index, "num_processes": acc.num_processes,
                   "distributed_type": str(acc.distributed_type)},
                  tmp / f"rank-{acc.process_index}.pt")
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            save_file({
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "state": asdict(self.state),
                "world_size": acc.num_processes,
                "torch_threads": torch.get_num_threads(),
                "signature": self._signature(),
            }, tmp / "trainer.pt")
            path = self.checkpoints.commit(step)
        acc.wait_for_everyone()
        return path or self.checkpoints.path(step)

    def _signature(self) -> dict:
        """Settings a resumed run must share with the checkpoint's run: the loop's and every
        entry of ``hparams`` (the data settings among them), as plain JSON values."""
        cfg = self.config
        loop = {"seed": cfg.seed, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "max_epochs": cfg.max_epochs, "tmax": cfg.tmax(),
                "mixed_precision": cfg.mixed_precision}
        return json.loads(json.dumps({**loop, **self.hparams}, default=str))

    def _resume(self) -> None:
        resume = self.config.resume
        if resume == "none" or (resume == "auto" and self.checkpoints is None):
            return
        acc = self.accelerator
        if resume == "auto":
            found = self.checkpoints.load_latest(acc.process_index)
            if found is None:
                return
            path, shared, own = found
        else:
            path = Path(resume)
            shared, own = load_checkpoint(path, acc.process_index)
        if shared["world_size"] != acc.num_processes:
            raise CheckpointError(
                f"checkpoint {path} was written by {shared['world_size']} processes; this run "
                f"has {acc.num_processes}. Resume with the same number of processes or start "
                "over with --resume none")
        threads = shared.get("torch_threads")
        if threads is not None and threads != torch.get_num_threads() and self.device.type == "cpu":
            warnings.warn(
                f"checkpoint {path} was written with {threads} torch threads, this run has "
                f"{torch.get_num_threads()}: it continues, but not bit for bit as the "
                f"uninterrupted run would (set OMP_NUM_THREADS={threads} for that)",
                stacklevel=2)
        now = self._signature()
        differ = {k: (v, now.get(k)) for k, v in shared["signature"].items() if now.get(k) != v}
        if differ:
            listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                               for k, (a, b) in sorted(differ.items()))
            raise CheckpointError(
                f"checkpoint {path} belongs to a run with other settings ({listed}); use the "
                "same settings, another --suffix, or --resume none")
        self.raw_model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        if acc.scaler is not None and shared["scaler"] is not None:
            acc.scaler.load_state_dict(shared["scaler"])
        self.state = TrainerState(**shared["state"])
        if own["data"] is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(own["data"])
        set_rng_state(own["rng"], self.generator)
        if self.is_main:
            print(f"resumed from {path} (epoch {self.state.epoch}, step {self.state.step})")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters: equal on every rank when gradients are in sync.

    Buffers (BatchNorm running statistics) are left out: each rank updates its own in its
    forward pass, and DDP copies rank 0's to the others at the start of the next one.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(batch: Any) -> bytes:
    """A cheap identity of a batch: its integer tensors (labels, studies), or its size."""
    if isinstance(batch, (tuple, list)):
        parts = [t for t in batch if isinstance(t, torch.Tensor)
                 and not torch.is_floating_point(t) and t.layout == torch.strided]
        if parts:
            return b"".join(t.detach().cpu().numpy().tobytes() for t in parts)
    return repr(getattr(batch, "shape", type(batch))).encode()


def _metric_table(pending: list[dict[str, Any]], names: list[str],
                  device: torch.device) -> torch.Tensor:
    """Steps × metrics, float64, on the CPU, with one transfer from the device: values that
    are device tensors are stacked there first; host numbers never go to the device."""
    on_device = [n for n in names if any(isinstance(v.get(n), torch.Tensor) for v in pending)]
    table = torch.full((len(pending), len(names)), math.nan, dtype=torch.float64)
    if on_device and pending:
        stacked = torch.stack([torch.stack([
            v[n].detach().reshape(()).to(torch.float64) if isinstance(v.get(n), torch.Tensor)
            else torch.tensor(float(v.get(n, math.nan)), dtype=torch.float64, device=device)
            for n in on_device]) for v in pending]).cpu()
        for j, n in enumerate(on_device):
            table[:, names.index(n)] = stacked[:, j]
    for i, values in enumerate(pending):
        for j, n in enumerate(names):
            if n not in on_device and n in values:
                table[i, j] = float(values[n])
    return table


def _length(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _densify(batch: Any) -> Any:
    """Sparse CSR inputs (``StreamConfig(output="csr")``) become dense on the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to_dense() if batch.layout == torch.sparse_csr else batch
    if isinstance(batch, tuple):
        items = [_densify(item) for item in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [_densify(item) for item in batch]
    return batch
