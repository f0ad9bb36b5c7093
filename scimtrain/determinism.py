"""Bitwise-reproducible training: what holds by default, and what ``--deterministic`` adds.

CPU, by default
    Two runs of the same command on the same machine, software and torch thread count
    (``OMP_NUM_THREADS``, or torch's default of one thread per core) end with the same weights
    bit for bit, and a resumed run continues bitwise as the uninterrupted one did. Every
    kernel of the step (the Linear layers' MKL/oneDNN products, BatchNorm, PReLU, dropout, the
    reductions of the MSE and L1 terms, AdamW, the compiled miner) splits its work among the
    threads in a fixed way, so a fixed thread count gives fixed results. A different thread
    count may change the last bits of sums (the reductions split differently) and so, after a
    few steps, the weights: resume with the thread count the run started with.

    The one kernel that did not hold (issue 17) was the backward of ``embeddings[anchor]`` in
    the triplet loss: advanced indexing's backward is ``index_put_(accumulate=True)``, which
    with more than one thread and at least 32,768 gradient elements (triplets x latent
    size) adds floats with atomic compare-and-swap in the order the threads happen to arrive.
    The loss now gathers with ``index_select``, whose backward (``index_add_``) adds the rows
    in index order: the same bits every run for any thread count, and faster (no contention
    on the batch's rows).

CUDA, by default
    Not bitwise reproducible. The triplet gather's backward (``index_add_`` on CUDA) and the
    ontology ASW's per-label sums (validation only, but they choose the best checkpoint) add
    with ``atomicAdd``, so float sums depend on the order the GPU threads arrive; and cuBLAS
    is reproducible only with a fixed workspace configuration (NVIDIA's cuBLAS
    documentation, "Results reproducibility"; PyTorch's reproducibility notes). Two runs
    agree to rounding at first, then drift apart as the differences grow.

CUDA with ``--deterministic`` (:func:`configure` ``(True)``)
    * ``torch.use_deterministic_algorithms(True)``: ``index_add_``/``index_select`` backward
      and ``index_put_(accumulate=True)`` switch to deterministic (sort-based) kernels; an op
      that has no deterministic kernel raises a ``RuntimeError`` naming itself instead of
      silently differing (scimtrain's step uses none of those torch lists: the miner's sums
      are of integers, its sorts stable, its scatters min/max); tensors from ``torch.empty``
      are filled with NaN.
    * ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set): cuBLAS gets fixed workspaces
      and so fixed reductions (CUDA >= 10.2). It is read when the first cuBLAS handle is made:
      configure before any CUDA work. Without it, torch in deterministic mode refuses cuBLAS
      calls with a ``RuntimeError``.
    * ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``: where torch
      uses cuDNN (BatchNorm may), its kernels are chosen by rule, not by timing.

    Then two runs on the same GPU model, driver, CUDA, cuBLAS and torch versions should end
    bitwise equal: that is what torch and NVIDIA document; scimtrain's tests check the CPU
    guarantee only (no GPU in CI). Across GPU models or library versions no bitwise guarantee
    holds on any backend.

CPU with ``--deterministic``
    Not needed for reproducibility (see above). It sets the same flags: an
    ``index_put_(accumulate=True)`` then runs single-threaded and ``torch.empty`` fills
    with NaN.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["CUBLAS_WORKSPACE", "configure"]

# One of the two settings NVIDIA documents for reproducible cuBLAS (":16:8" uses less memory,
# ":4096:8" is faster); torch's deterministic mode accepts either.
CUBLAS_WORKSPACE = ":4096:8"


def configure(deterministic: bool) -> dict[str, object]:
    """Turn bitwise-reproducible kernels on (``True``) or back to torch's defaults (``False``).

    Call it once at the start of a run, before any CUDA work (cuBLAS reads its workspace
    setting when its first handle is made). It changes process-wide torch settings and, when
    turning on, sets ``CUBLAS_WORKSPACE_CONFIG`` if the environment does not already.

    Args:
        deterministic: True for the reproducible settings described in this module's
            docstring; False for torch's defaults (the environment variable is left as is).

    Returns:
        The settings now in effect (for logging): ``deterministic``, ``cublas_workspace``
        (the variable's value or None) and ``cudnn_deterministic``.
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    if deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # A cuBLAS handle made before this point keeps its default workspace.
            warnings.warn(
                "scimtrain.determinism.configure(True) was called after CUDA started: set "
                f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment, or configure "
                "before any CUDA work, for reproducible cuBLAS results", stacklevel=2)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False  # timing-based choice: not reproducible
    return {"deterministic": deterministic,
            "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_deterministic": torch.backends.cudnn.deterministic}
