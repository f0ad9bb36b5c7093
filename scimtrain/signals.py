"""The preemption signals: what a cluster sends before it kills a job (SLURM sends SIGTERM to
every process of the job, loader workers included; some schedulers send SIGUSR1 ahead).

The training process handles them (:class:`scimtrain.trainer.Trainer` finishes its step,
checkpoints and exits); its loader workers ignore them and are stopped by the training process
itself, so that a worker dying of the signal mid-step does not end the run in an error before
its checkpoint.
"""

from __future__ import annotations

import signal

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def ignore_preemption() -> None:
    """In a helper process (a loader worker): leave the preemption signals to the training
    process, which stops this one when it is done."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
