"""SCimilarity's training objective as a Trainer step function.

``MetricLearningObjective(descendant, loss_config, l1)`` is called by the Trainer as
``step_fn(model, batch, ctx)`` with a :class:`~scimtrain.stream.Batch`: it runs the
encoder/decoder, mines triplets and mixes the triplet and reconstruction losses
(docs/scimilarity.md §5), adds the L1 penalty in training steps, and in validation/test steps
also the ontology-aware ASW, nmse and evaluation metric (§6), mined without the cross-study
rule. The triplets a training step's loss used are kept as ``last_triplets`` and, with a
:class:`~scimtrain.triplet_log.TripletLog`, written to files (§9).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from scimtrain.losses import LossConfig, MinedTriplets, compute_loss, l1_penalty
from scimtrain.metrics import evaluation_metric, nmse, ontology_asw
from scimtrain.trainer import StepContext
from scimtrain.triplet_log import TripletLog


class MetricLearningObjective:
    """Triplet + reconstruction loss with ontology-aware mining.

    Args:
        descendant: L×L bool, ``[i, j]`` True when label j is a strict descendant of label i
            (``CellOntology.descendant_matrix(selection.label_ids)``), indexed by label int.
        loss_config: margin, triplet weight, negative selection, cross-study rule, perturbation.
        l1: the L1 coefficient (scaled by the current lr).
        parent: L×L bool direct-parent matrix, needed when labels are perturbed.
        l1_layer: the encoder Linear the L1 penalty applies to: ``"last"`` (the bottleneck,
            SCimilarity's code) or ``"first"`` (see :func:`~scimtrain.losses.l1_layer`).
        triplet_log: writes the triplets of training steps (every rank must have one when
            any has: it gathers them).

    After each training step ``last_triplets`` holds ``(MinedTriplets, studies)``: the
    triplets the loss used (batch positions, mining labels) and the batch's study integers.
    """

    def __init__(self, descendant: np.ndarray, loss_config: LossConfig = LossConfig(),
                 l1: float = 1e-4, parent: np.ndarray | None = None, *,
                 l1_layer: str = "last", triplet_log: TripletLog | None = None) -> None:
        self.descendant = torch.as_tensor(np.asarray(descendant, dtype=bool))
        self.parent = None if parent is None else torch.as_tensor(np.asarray(parent, dtype=bool))
        self.loss_config = loss_config
        # docs/scimilarity.md §6: validation and test mine without the cross-study rule (and
        # unperturbed).
        self.eval_config = replace(loss_config, sample_across_studies=False,
                                   perturb_labels=False)
        self.l1 = l1
        self.l1_layer = l1_layer
        self.triplet_log = triplet_log
        self.last_triplets: tuple[MinedTriplets, torch.Tensor] | None = None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def close(self) -> None:
        """Finish writing tracked triplets (if any); call after training."""
        if self.triplet_log is not None:
            self.triplet_log.close()

    def _matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._on:
            parent = None if self.parent is None else self.parent.to(device)
            self._on[device] = (self.descendant.to(device), parent)
        return self._on[device]

    def __call__(self, model: nn.Module, batch: Any, ctx: StepContext
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        x, labels, studies = batch
        descendant, parent = self._matrices(x.device)
        with ctx.timer("forward"):
            embedding, reconstruction = model(x)
        config = self.loss_config if ctx.training else self.eval_config
        with ctx.timer("mining"):
            loss, metrics, triplets = compute_loss(
                embedding, reconstruction, x, labels, studies if ctx.training else None,
                descendant, config, parent=parent, generator=ctx.generator,
                return_triplets=True)
        metrics = dict(metrics, cells=x.shape[0])
        if ctx.training:
            self.last_triplets = (triplets, studies)
            if self.triplet_log is not None and self.triplet_log.wants(ctx.step):
                with ctx.timer("triplet_log"):
                    self.triplet_log.record(ctx.step, triplets, studies)
            if self.l1:
                penalty = l1_penalty(ctx.raw_model.encoder, self.l1, ctx.lr, self.l1_layer)
                loss = loss + penalty
                metrics["l1_penalty"] = penalty.detach()
        else:
            asw = ontology_asw(embedding.float(), labels, descendant)
            normalised = nmse(metrics["mse"], x)
            metrics.update(asw=asw, nmse=normalised,
                           evaluation_metric=evaluation_metric(asw, normalised))
        return loss, metrics
