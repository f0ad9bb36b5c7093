"""Ontology-aware ASW against the plain-Python reference; nmse; evaluation metric
(docs/scimilarity.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scimtrain.metrics import evaluation_metric, nmse, ontology_asw
from tests.reference_impl import (
    HAND_PARENTS,
    descendant_matrix,
    parent_matrix,
    random_ontology,
    reference_asw,
)

HAND_DESC = descendant_matrix(parent_matrix(HAND_PARENTS))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ontology", ["hand", "random"])
def test_asw_matches_reference(seed, ontology):
    rng = np.random.default_rng(seed)
    desc = HAND_DESC if ontology == "hand" else descendant_matrix(random_ontology(12, rng))
    n = int(rng.integers(20, 90))
    used = rng.choice(len(desc), size=7, replace=False)
    labels = rng.choice(used[:6], size=n)
    labels[-1] = used[6]  # a single-cell label: skipped itself, and never anyone's b_i
    centres = rng.normal(size=(len(desc), 5))
    emb = centres[labels] + rng.normal(size=(n, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    expect = reference_asw(emb, labels, desc)
    got = ontology_asw(torch.from_numpy(emb).float(), torch.from_numpy(labels), desc)
    assert abs(got - expect) < 1e-6
    got64 = ontology_asw(torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(desc))
    assert abs(got64 - expect) < 1e-12


def test_asw_skip_rules():
    emb = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    # Only one label: nobody has a foreign cluster.
    assert math.isnan(ontology_asw(emb, torch.full((7,), 3), HAND_DESC))
    # 8 (fibroblast) is foreign to everyone else but a single cell: 5 cells skipped for that.
    labels = torch.tensor([3, 3, 3, 5, 5, 5, 8])
    got = ontology_asw(emb, labels, HAND_DESC)
    assert abs(got - reference_asw(emb.numpy(), labels.tolist(), HAND_DESC)) < 1e-12
    # 2 (T cell) sees its descendant 3 as same-cluster; 3 ignores its ancestor 2.
    labels = torch.tensor([2, 3, 3, 5, 5, 7, 7])
    assert abs(ontology_asw(emb, labels, HAND_DESC)
               - reference_asw(emb.numpy(), labels.tolist(), HAND_DESC)) < 1e-12


def test_asw_perfect_clusters_near_one():
    labels = torch.tensor([3] * 10 + [5] * 10 + [7] * 10)
    centres = torch.eye(3, dtype=torch.float64)
    noise = 1e-3 * torch.randn(30, 3, dtype=torch.float64)
    emb = centres[torch.repeat_interleave(torch.arange(3), 10)] + noise
    assert ontology_asw(emb, labels, HAND_DESC) > 0.99


def test_nmse_and_evaluation_metric():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert nmse(torch.tensor(1.5), x) == pytest.approx(1.5 / 7.5)
    assert nmse(0.0, torch.zeros(2, 2)) == 0.0
    assert evaluation_metric(0.5, 0.2) == pytest.approx(0.45)
    assert evaluation_metric(1.0, 0.0) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_asw_on_cuda():
    rng = np.random.default_rng(0)
    labels = rng.choice([2, 3, 4, 5, 7, 8], size=200)
    emb = rng.normal(size=(200, 8))
    expect = reference_asw(emb, labels, HAND_DESC)
    got = ontology_asw(torch.from_numpy(emb).cuda(), torch.from_numpy(labels).cuda(), HAND_DESC)
    assert abs(got - expect) < 1e-9
