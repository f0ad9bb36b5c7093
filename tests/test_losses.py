"""Vectorised mining and losses against the plain-Python reference (docs/scimilarity.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scimtrain import mining
from scimtrain.losses import (
    LossConfig,
    compute_loss,
    l1_penalty,
    mine_triplets,
    mixed_loss,
    perturb_labels,
    reconstruction_loss,
    squared_distances,
    triplet_loss,
)
from scimtrain.mining import cpu_path, dispatch, distances, segments, torch_path
from scimtrain.model import Encoder
from tests.reference_impl import (
    HAND_PARENTS,
    descendant_matrix,
    parent_matrix,
    random_ontology,
    reference_distances,
    reference_mine,
)

HAND_PARENT = parent_matrix(HAND_PARENTS)
HAND_DESC = descendant_matrix(HAND_PARENT)


def make_batch(seed: int, n: int = 120, n_labels: int | None = None, n_studies: int = 3,
               dim: int = 6, ontology: str = "hand"):
    """Clustered unit embeddings (float64, so rounding never decides a comparison)."""
    rng = np.random.default_rng(seed)
    if ontology == "hand":
        parent = HAND_PARENT
    else:
        parent = random_ontology(n_labels or 15, rng)
    desc = descendant_matrix(parent)
    n_labels = len(parent)
    used = rng.choice(n_labels, size=min(n_labels, 7), replace=False)
    labels = rng.choice(used, size=n)
    centres = rng.normal(size=(n_labels, dim))
    emb = centres[labels] + rng.normal(scale=1.0, size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    studies = rng.integers(0, n_studies, size=n)
    return emb, labels, studies, desc, parent


def run_both(seed, selection, margin, use_studies, ontology="hand", negative_labels=None):
    emb, labels, studies, desc, _ = make_batch(seed, ontology=ontology)
    st = studies if use_studies else None
    ref = reference_mine(emb, labels, st, desc, margin, selection, negative_labels=negative_labels)
    gen = torch.Generator().manual_seed(seed)
    a, p, n, hard, viable = mine_triplets(
        torch.from_numpy(emb), torch.from_numpy(labels),
        None if st is None else torch.from_numpy(st), desc,
        margin=margin, selection=selection, generator=gen,
        negative_labels=None if negative_labels is None else torch.from_numpy(negative_labels),
        dummy_triplet=False,
    )
    got = list(zip(a.tolist(), p.tolist(), n.tolist()))
    return emb, ref, got, hard, viable


CASES = [
    (seed, margin, use_studies, ontology)
    for seed in range(4)
    for margin in (0.05, 0.5)
    for use_studies in (True, False)
    for ontology in ("hand", "random")
]


@pytest.mark.parametrize("seed,margin,use_studies,ontology", CASES)
def test_hardest_matches_reference(seed, margin, use_studies, ontology):
    _, ref, got, hard, viable = run_both(seed, "hardest", margin, use_studies, ontology)
    assert sorted(got) == sorted(ref["triplets"])
    assert (hard, viable) == (ref["num_hard"], ref["num_viable"])


@pytest.mark.parametrize("selection", ["semihard", "random"])
@pytest.mark.parametrize("seed,margin,use_studies,ontology", CASES)
def test_sampled_negatives_lie_in_their_window(selection, seed, margin, use_studies, ontology):
    emb, ref, got, hard, viable = run_both(seed, selection, margin, use_studies, ontology)
    assert (hard, viable) == (ref["num_hard"], ref["num_viable"])
    ref_pairs = {pair for pair, window in ref["windows"].items() if window.size}
    assert {(a, p) for a, p, _ in got} == ref_pairs
    assert len(got) == len(ref_pairs)  # one triplet per pair
    dist = reference_distances(emb)
    for a, p, n in got:
        assert n in set(ref["windows"][(a, p)].tolist())
        v = dist[a, p] - dist[a, n] + margin
        assert v > 0 and (selection == "random" or v < margin)
    assert ref_pairs, "test batch too easy: no triplets at all"


@pytest.mark.parametrize("seed", range(3))
def test_negative_labels_exclude_by_original_labels(seed):
    emb, labels, studies, desc, parent = make_batch(seed)
    perturbed = perturb_labels(torch.from_numpy(labels), parent, 0.5,
                               torch.Generator().manual_seed(seed)).numpy()
    assert (perturbed != labels).any()
    ref = reference_mine(emb, perturbed, studies, desc, 0.5, "hardest", negative_labels=labels)
    a, p, n, hard, viable = mine_triplets(
        torch.from_numpy(emb), torch.from_numpy(perturbed), torch.from_numpy(studies), desc,
        margin=0.5, selection="hardest", negative_labels=torch.from_numpy(labels),
        dummy_triplet=False,
    )
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist())) == sorted(ref["triplets"])
    assert (hard, viable) == (ref["num_hard"], ref["num_viable"])


def test_pair_rules():
    # Labels: 3 = CD4 T, 2 = its parent T cell, 5 = B cell, 7 = hepatocyte.
    labels = torch.tensor([3, 3, 3, 2, 5, 7])
    studies = torch.tensor([0, 0, 1, 0, 0, 0])
    emb = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    gen = torch.Generator().manual_seed(0)
    a, p, n, _, viable = mine_triplets(emb, labels, studies, HAND_DESC, margin=10.0,
                                       selection="random", generator=gen)
    # Only cross-study same-label pairs, anchor first; T cell (ancestor) never a negative.
    assert sorted(zip(a.tolist(), p.tolist())) == [(0, 2), (1, 2)]
    assert set(n.tolist()) <= {4, 5}
    assert viable == 2 * 2
    a, p, n, _, viable = mine_triplets(emb, labels, None, HAND_DESC, margin=10.0,
                                       selection="random", generator=gen)
    assert sorted(zip(a.tolist(), p.tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_same_seed_same_triplets_and_chunking_does_not_matter():
    emb, labels, studies, desc, _ = make_batch(7, n=200)
    args = (torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(studies), desc)
    runs = [mine_triplets(*args, margin=0.5, selection="semihard",
                          generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    runs += [_mine_with("torch", emb, labels, studies, desc, "semihard", 0.5, 11,
                        dummy_triplet=True, chunk_elements=ce) for ce in (1 << 22, 3000, 450)]
    for other in runs[1:]:
        assert _same(runs[0], other)
    different = mine_triplets(*args, margin=0.5, selection="semihard",
                              generator=torch.Generator().manual_seed(12))
    assert not torch.equal(runs[0][2], different[2])


@pytest.mark.parametrize("backend", ["cpu", "torch", "torch-blocks"])
def test_duplicate_cells_fill_buckets(backend):
    # Few distinct points: every distance is shared by many cells, so buckets are crowded,
    # ties are everywhere and (torch path) sub-blocks split at small chunk sizes.
    rng = np.random.default_rng(5)
    points = rng.normal(size=(6, 4))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    emb = points[rng.integers(0, 6, size=150)]
    labels = rng.choice([2, 3, 5, 7, 8], size=150)
    studies = rng.integers(0, 3, size=150)
    args = (torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(studies), HAND_DESC)
    dist = squared_distances(args[0]).numpy()  # the very values the miner compares
    for selection in ("hardest", "semihard", "random"):
        ref = reference_mine(emb, labels, studies, HAND_DESC, 0.3, selection, dist=dist)
        if backend == "cpu":
            a, p, n, hard, viable = mine_triplets(*args, margin=0.3, selection=selection,
                                                  generator=torch.Generator().manual_seed(0),
                                                  dummy_triplet=False)
        else:
            a, p, n, hard, viable = _mine_with(
                "torch", emb, labels, studies, HAND_DESC, selection, 0.3,
                chunk_elements=600 if backend == "torch-blocks" else 1 << 22)
        assert (hard, viable) == (ref["num_hard"], ref["num_viable"])
        got = list(zip(a.tolist(), p.tolist(), n.tolist()))
        if selection == "hardest":
            assert sorted(got) == sorted(ref["triplets"])
        assert {(x, y) for x, y, _ in got} == {k for k, w in ref["windows"].items() if w.size}
        assert all(z in set(ref["windows"][(x, y)].tolist()) for x, y, z in got)


def test_far_from_unit_embeddings_stay_exact():
    # Squared distances up to ~2e6 (float32 steps of 0.125) with a margin of 50: 253
    # buckets over a row's threshold range would be finer than float32 resolves there.
    emb, labels, studies, desc, _ = make_batch(6)
    e = torch.from_numpy(emb * 700.0).float()
    dist = squared_distances(e).double().numpy()
    for selection in ("hardest", "semihard"):
        ref = reference_mine(None, labels, studies, desc, 50.0, selection, dist=dist)
        a, p, n, hard, viable = mine_triplets(e, torch.from_numpy(labels),
                                              torch.from_numpy(studies), desc, margin=50.0,
                                              selection=selection, dummy_triplet=False)
        assert (hard, viable) == (ref["num_hard"], ref["num_viable"])
        got = list(zip(a.tolist(), p.tolist(), n.tolist()))
        assert {(x, y) for x, y, _ in got} == {k for k, w in ref["windows"].items() if w.size}
        assert all(z in set(ref["windows"][(x, y)].tolist()) for x, y, z in got)


def test_half_precision_embeddings_are_mined():
    emb, labels, studies, desc, _ = make_batch(0)
    a, _, _, _, viable = mine_triplets(
        torch.from_numpy(emb).half(), torch.from_numpy(labels), torch.from_numpy(studies), desc,
        margin=0.5, selection="semihard", generator=torch.Generator().manual_seed(0))
    assert a.numel() > 1 and viable > 0


def test_float32_embeddings_match_float64_hardest():
    emb, labels, studies, desc, _ = make_batch(3)
    ref = reference_mine(emb, labels, studies, desc, 0.5, "hardest")
    a, p, n, hard, viable = mine_triplets(
        torch.from_numpy(emb).float(), torch.from_numpy(labels), torch.from_numpy(studies),
        torch.from_numpy(desc), margin=0.5, selection="hardest")
    got = set(zip(a.tolist(), p.tolist(), n.tolist()))
    # float32 may flip a near-tie; demand near-total agreement.
    assert len(got & set(ref["triplets"])) >= 0.98 * len(ref["triplets"])
    assert abs(hard - ref["num_hard"]) <= 0.01 * ref["num_hard"] and viable == ref["num_viable"]


def test_no_triplet_gives_dummy_or_nothing():
    emb = torch.nn.functional.normalize(torch.randn(5, 3), dim=1).requires_grad_()
    labels = torch.tensor([3, 3, 2, 2, 9])  # only related labels: no candidate negatives
    a, p, n, hard, viable = mine_triplets(emb, labels, None, HAND_DESC, margin=0.05,
                                          selection="semihard")
    assert (a.tolist(), p.tolist(), n.tolist(), hard, viable) == ([0], [0], [0], 0, 0)
    mean, per = triplet_loss(emb, a, p, n, 0.05)
    assert torch.allclose(mean, torch.tensor(0.05), atol=1e-6)
    a, p, n, _, _ = mine_triplets(emb, labels, None, HAND_DESC, margin=0.05,
                                  selection="semihard", dummy_triplet=False)
    assert a.numel() == p.numel() == n.numel() == 0
    mean, per = triplet_loss(emb, a, p, n, 0.05)
    assert mean.item() == 0.0 and per.numel() == 0
    mean.backward()  # still part of the graph
    assert torch.count_nonzero(emb.grad) == 0


def test_gradients_reach_only_selected_embeddings():
    emb_np, labels, studies, desc, _ = make_batch(1, n=80)
    emb = torch.from_numpy(emb_np).requires_grad_()
    a, p, n, _, _ = mine_triplets(emb, torch.from_numpy(labels), torch.from_numpy(studies), desc,
                                  margin=0.5, selection="hardest")
    assert not a.requires_grad
    mean, per = triplet_loss(emb, a, p, n, 0.5)
    mean.backward()
    touched = set(torch.cat([a, p, n]).tolist())
    rows_with_grad = set(emb.grad.abs().sum(dim=1).nonzero().squeeze(1).tolist())
    assert rows_with_grad and rows_with_grad <= touched
    active = per > 0
    assert set(a[active].tolist()) <= rows_with_grad


def test_triplet_loss_matches_formula():
    emb = torch.randn(10, 4, dtype=torch.float64)
    a, p, n = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    mean, per = triplet_loss(emb, a, p, n, 0.3)
    expect = ((emb[a] - emb[p]).norm(dim=1) - (emb[a] - emb[n]).norm(dim=1) + 0.3).clamp_min(0)
    assert torch.allclose(per, expect, atol=1e-5)
    assert torch.allclose(mean, expect.mean(), atol=1e-5)


def test_perturb_labels_only_moves_to_parents_in_batch():
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _trial in range(20):
        labels = torch.from_numpy(rng.choice([1, 2, 3, 4, 7, 9, 8], size=60))
        out = perturb_labels(labels, HAND_PARENT, 0.5, gen)
        assert labels.shape == out.shape and out.dtype == torch.long
        in_batch = set(labels.tolist())
        for old, new in zip(labels.tolist(), out.tolist()):
            if new != old:
                assert new in in_batch and HAND_DESC[new, old]  # an ancestor present in the batch
        # 9 (parents 3, 4) and 7 (parent 6 absent) / 8 (parent 0 absent): only 9, 1-4 can move.
        moved = {old for old, new in zip(labels.tolist(), out.tolist()) if new != old}
        assert moved <= {2, 3, 4, 9}
    # One level only when every cell is drawn at most once in expectation; direct parents:
    labels = torch.tensor([3, 4, 2])
    out = perturb_labels(labels, HAND_PARENT, 1 / 3, torch.Generator().manual_seed(1))
    changed = [(o, n) for o, n in zip(labels.tolist(), out.tolist()) if o != n]
    assert all(HAND_PARENT[o, n] for o, n in changed)
    assert torch.equal(perturb_labels(labels, HAND_PARENT, 0.0), labels)


def test_perturb_labels_seeded_and_both_parents_reachable():
    labels = torch.tensor([9] * 200 + [3, 4])
    a = perturb_labels(labels, HAND_PARENT, 0.5, torch.Generator().manual_seed(5))
    b = perturb_labels(labels, HAND_PARENT, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # Cells of 9 move to 3 or 4 (uniform); drawn twice, a 3/4 could climb to 2, absent here.
    assert set(a[:200].tolist()) == {3, 4, 9}


def test_bad_inputs_name_the_argument():
    emb = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 1, 2])
    with pytest.raises(ValueError, match="selection"):
        mine_triplets(emb, labels, None, HAND_DESC, margin=0.1, selection="easy")
    with pytest.raises(ValueError, match="margin"):
        mine_triplets(emb, labels, None, HAND_DESC, margin=0.0, selection="hardest")
    with pytest.raises(ValueError, match="labels"):
        mine_triplets(emb, labels[:3], None, HAND_DESC, margin=0.1, selection="hardest")
    with pytest.raises(ValueError, match="labels"):
        mine_triplets(emb, torch.tensor([0, 1, 1, 10]), None, HAND_DESC, margin=0.1,
                      selection="hardest")
    with pytest.raises(TypeError, match="labels"):
        mine_triplets(emb, labels.float(), None, HAND_DESC, margin=0.1, selection="hardest")
    with pytest.raises(ValueError, match="studies"):
        mine_triplets(emb, labels, torch.tensor([0, 1]), HAND_DESC, margin=0.1,
                      selection="hardest")
    with pytest.raises(ValueError, match="descendant"):
        mine_triplets(emb, labels, None, HAND_DESC[:3], margin=0.1, selection="hardest")
    with pytest.raises(ValueError, match="embeddings"):
        mine_triplets(emb[0], labels, None, HAND_DESC, margin=0.1, selection="hardest")
    with pytest.raises(ValueError, match="negative_selection"):
        LossConfig(negative_selection="hard")
    with pytest.raises(ValueError, match="triplet_loss_weight"):
        LossConfig(triplet_loss_weight=2.0)
    with pytest.raises(ValueError, match="reconstruction"):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_mixed_loss_and_l1():
    t, m = torch.tensor(2.0), torch.tensor(4.0)
    assert mixed_loss(t, m, 0.0) is m and mixed_loss(t, m, 1.0) is t
    assert torch.isclose(mixed_loss(t, m, 0.25), torch.tensor(0.25 * 2 + 0.75 * 4))
    enc = Encoder(7, latent_dim=3, hidden_dim=[5, 4])
    first, last = enc.network[0][1], enc.network[-1]
    for layer, linear in (("first", first), ("last", last)):
        expect = 1e-4 * 0.005 * (linear.weight.abs().sum() + linear.bias.abs().sum())
        got = l1_penalty(enc, 1e-4, 0.005, layer=layer)
        assert torch.isclose(got, expect)
        got.backward()
        other = last if linear is first else first
        assert linear.weight.grad is not None and other.weight.grad is None
        enc.zero_grad(set_to_none=True)
    # SCimilarity's code penalises the bottleneck: the default
    assert torch.equal(l1_penalty(enc, 1e-4, 0.005), l1_penalty(enc, 1e-4, 0.005, "last"))
    assert l1_penalty(enc, 0.0, 0.005).item() == 0.0


def test_compute_loss_metrics():
    emb_np, labels, studies, desc, parent = make_batch(2, n=100)
    x = torch.randn(100, 12)
    recon = torch.randn(100, 12, requires_grad=True)
    emb = torch.from_numpy(emb_np).float().requires_grad_()
    lab, st = torch.from_numpy(labels), torch.from_numpy(studies)
    for w in (0.0, 0.001, 1.0):
        cfg = LossConfig(margin=0.5, triplet_loss_weight=w)
        loss, m = compute_loss(emb, recon, x, lab, st, torch.from_numpy(desc), cfg,
                               generator=torch.Generator().manual_seed(0))
        assert set(m) == {"loss", "triplet_loss", "mse", "hard_triplets", "num_nonzero_loss",
                          "num_hard_triplets", "num_viable_triplets"}
        assert all(v.ndim == 0 and not v.requires_grad for v in m.values())
        assert torch.isclose(m["mse"], ((recon - x) ** 2).mean())
        assert torch.isclose(m["loss"], w * m["triplet_loss"] + (1 - w) * m["mse"])
        assert torch.isclose(m["hard_triplets"], m["num_hard_triplets"] / m["num_viable_triplets"])
        assert 0 < m["num_nonzero_loss"] <= m["num_hard_triplets"]
        loss.backward()
    ref = reference_mine(emb_np, labels, studies, desc, 0.5, "hardest")
    assert m["num_viable_triplets"].item() == ref["num_viable"]
    # Validation passes studies=None: more pairs, so more viable triplets.
    _, m_val = compute_loss(emb, recon, x, lab, None, desc, LossConfig(margin=0.5))
    assert m_val["num_viable_triplets"] > m["num_viable_triplets"]
    # Perturbation needs the parent matrix and stays seeded.
    cfg = LossConfig(margin=0.5, perturb_labels=True)
    with pytest.raises(ValueError, match="parent"):
        compute_loss(emb, recon, x, lab, st, desc, cfg)
    runs = [compute_loss(emb, recon, x, lab, st, desc, cfg, parent=parent,
                         generator=torch.Generator().manual_seed(3))[1] for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _mine_with(path, emb, labels, studies, desc, selection, margin, seed=0, negative_labels=None,
               dummy_triplet=False, **kwargs):
    """Mine on the compiled CPU path (``path="cpu"``, ``threads`` optional) or the torch path
    (``path="torch"``, which CUDA runs; ``chunk_elements``, ``buckets``, ``per_bound``)."""
    lab = torch.as_tensor(labels)
    args = (torch.as_tensor(emb), lab, lab if negative_labels is None else
            torch.as_tensor(negative_labels), None if studies is None else
            torch.as_tensor(studies), torch.as_tensor(desc).bool(), margin, selection,
            torch.Generator().manual_seed(seed))
    if path == "cpu":
        return cpu_path.mine(*args, dummy_triplet=dummy_triplet, **kwargs)
    return torch_path.mine(*args, dummy_triplet=dummy_triplet, **kwargs)


def _same(x, y):
    return all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(x, y))


@pytest.mark.parametrize("selection", ["semihard", "random", "hardest"])
@pytest.mark.parametrize("seed", range(3))
def test_backends_threads_and_blocks_agree(selection, seed):
    # The torch path is the code CUDA runs; on the CPU it must pick exactly what the compiled
    # CPU path picks, and neither may depend on threads or block size.
    emb, labels, studies, desc, parent = make_batch(seed, n=300, ontology="random", dim=4)
    for st in (studies, None):
        base = _mine_with("cpu", emb, labels, st, desc, selection, 0.5, seed, threads=1)
        assert base[0].numel() > 0
        for ops, kw in [("cpu", {"threads": 2}), ("cpu", {"threads": 5}),
                        ("torch", {}), ("torch", {"chunk_elements": 2000})]:
            assert _same(base, _mine_with(ops, emb, labels, st, desc, selection, 0.5, seed,
                                          **kw)), (ops, kw)
    perturbed = perturb_labels(torch.from_numpy(labels), parent, 0.5,
                               torch.Generator().manual_seed(seed)).numpy()
    runs = [_mine_with(ops, emb, perturbed, studies, desc, selection, 0.5, seed,
                       negative_labels=labels) for ops in ("cpu", "torch")]
    assert _same(*runs)


@pytest.mark.parametrize("buckets", [3, 8])
@pytest.mark.parametrize("selection", ["semihard", "random", "hardest"])
def test_bucket_resolution_changes_nothing(buckets, selection):
    # Few buckets per row (torch path): most values share a bucket with several boundaries,
    # so every count comes from the exact comparisons; the picks must still be the same.
    emb, labels, studies, desc, _ = make_batch(8, n=200)
    ref = reference_mine(emb, labels, studies, desc, 0.5, selection)
    cpu = _mine_with("cpu", emb, labels, studies, desc, selection, 0.5)
    coarse = _mine_with("torch", emb, labels, studies, desc, selection, 0.5,
                        buckets=buckets, per_bound=0)
    assert _same(cpu, coarse)
    assert (cpu[3], cpu[4]) == (ref["num_hard"], ref["num_viable"])


def test_group_is_a_stable_counting_sort():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, size=1000)
    expect_order = np.argsort(keys, kind="stable")
    expect_starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=53))])
    values = rng.normal(size=1000).astype(np.float32)
    out, starts = segments.group(torch.from_numpy(keys), 53, torch.from_numpy(values))
    np.testing.assert_array_equal(out.numpy(), values[expect_order])
    np.testing.assert_array_equal(starts.numpy(), expect_starts)
    out, starts = segments.group(torch.from_numpy(keys[:0]), 5,
                                         torch.from_numpy(values[:0]))
    assert out.numel() == 0 and starts.tolist() == [0] * 6


def test_margin_below_the_distances_rounding_step():
    # d + margin rounds to d in float32: every semihard window (d, d + margin) is empty, and
    # the paths must say so rather than read a negative-sized run.
    emb, labels, studies, desc, _ = make_batch(3, n=150)
    emb = (emb * 3.0).astype(np.float32)
    for selection in ("semihard", "random", "hardest"):
        cpu = _mine_with("cpu", emb, labels, studies, desc, selection, 1e-9)
        assert _same(cpu, _mine_with("torch", emb, labels, studies, desc, selection,
                                     1e-9))
        if selection == "semihard":
            assert cpu[0].numel() == 0


@pytest.mark.parametrize("dtype, exponent", [(np.float64, -537), (np.float32, -74)])
def test_subnormal_distances_and_margin(dtype, exponent):
    # Embeddings on a grid of 2^exponent: squared distances are small multiples of the
    # smallest subnormal, and so is the margin. The rows' threshold spans are then subnormal
    # (once a segfault of the compiled path); both paths must still agree with the reference.
    rng = np.random.default_rng(0)
    emb = (rng.integers(0, 6, size=(40, 1)) * 2.0**exponent).astype(dtype)
    labels = rng.integers(0, 3, size=40)
    desc = np.zeros((3, 3), bool)
    margin = float(3 * np.finfo(dtype).smallest_subnormal)
    dist = squared_distances(torch.from_numpy(emb)).numpy()  # (BLAS may flush subnormals)
    assert 0 < dist[dist > 0].min() < np.finfo(dtype).tiny
    for selection in ("semihard", "random", "hardest"):
        ref = reference_mine(emb, labels, None, desc, margin, selection, dist=dist)
        cpu = _mine_with("cpu", emb, labels, None, desc, selection, margin)
        assert _same(cpu, _mine_with("torch", emb, labels, None, desc, selection,
                                     margin))
        assert (cpu[3], cpu[4]) == (ref["num_hard"], ref["num_viable"])
        got = set(zip(*(t.tolist() for t in cpu[:3])))
        assert {(a, p) for a, p, _ in got} == {k for k, w in ref["windows"].items() if len(w)}
        for a, p, n in got:
            assert n in ref["windows"][(a, p)]


@pytest.mark.parametrize("n", [255, 256, 301])
def test_squared_distances_mirror_their_upper_half(n):
    emb = torch.from_numpy(make_batch(1, n=n, dim=5)[0])
    dist = squared_distances(emb)
    np.testing.assert_allclose(dist.numpy(), reference_distances(emb.numpy()), atol=1e-12)
    if n >= distances.HALVES_FROM:
        h = n // 2
        assert torch.equal(dist[h:, :h], dist[:h, h:].T)


@pytest.mark.parametrize("dtype, int_dtype", [(np.float32, np.int32), (np.float64, np.int64)])
def test_cpu_step_up_is_nextafter(dtype, int_dtype):
    info = np.finfo(dtype)
    edge = [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny, -info.tiny,
            1.0, -1.0, 1.9999999, -2.5e-8, info.max / 2, -info.max]
    values = np.concatenate([np.array(edge, dtype),
                             np.random.default_rng(0).normal(size=1000).astype(dtype)])
    stepped = values.copy()
    cpu_path._step_up(stepped, np.zeros(0, int_dtype))
    expected = np.nextafter(values, dtype(np.inf))
    assert np.array_equal(stepped.view(int_dtype), expected.view(int_dtype))


def test_cpu_row_blocks_cover_every_row_once():
    pair_start = np.concatenate([[0], np.cumsum([50, 0, 0, 3, 400, 1, 0, 7] * 20)])
    for blocks in (1, 2, 7, 16, 500):
        edges = cpu_path._row_blocks(pair_start, blocks)
        assert edges[0] == 0 and edges[-1] == 160 and len(edges) - 1 <= blocks
        assert (np.diff(edges) > 0).all()


def test_cpu_miner_variable_routes_the_cpu_to_either_path(monkeypatch):
    emb, labels, studies, desc, _ = make_batch(2, n=150)
    args = (torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(studies), desc)

    def mine(name):
        monkeypatch.setenv(dispatch.CPU_MINER_ENV, name)
        return mine_triplets(*args, margin=0.5, selection="semihard",
                             generator=torch.Generator().manual_seed(0))

    compiled = mine("compiled")
    monkeypatch.setattr(cpu_path, "mine", lambda *a, **k: pytest.fail("compiled path ran"))
    assert _same(compiled, mine("torch"))
    with pytest.raises(ValueError, match=dispatch.CPU_MINER_ENV):
        mine("numba")


def test_hardest_takes_the_lowest_index_among_equal_distances():
    # Cells 2, 3 and 4 are the same point: equally close to anchor 0.
    pts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0]],
                       dtype=torch.float64)
    labels = torch.tensor([2, 2, 5, 7, 8, 6])
    for ops in ("cpu", "torch"):
        a, p, n, _, _ = _mine_with(ops, pts, labels, None, HAND_DESC, "hardest", 1.0)
        assert (a.tolist(), p.tolist(), n.tolist()) == ([0], [1], [2])


def test_non_finite_embeddings_are_refused():
    emb = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    labels = torch.tensor([3, 3, 5, 5, 7, 7])
    for bad in (float("nan"), float("inf"), 1e30):
        e = emb.clone()
        e[2, 1] = bad
        with pytest.raises(ValueError, match="finite"):
            mine_triplets(e, labels, None, HAND_DESC, margin=0.1, selection="semihard")


def test_losses_reexports_the_miner():
    from scimtrain import losses

    assert losses.mine_triplets is mining.mine_triplets
    assert losses.squared_distances is mining.squared_distances


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    emb, labels, studies, desc, parent = make_batch(4, n=300)
    cpu = mine_triplets(torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(studies),
                        desc, margin=0.5, selection="hardest")
    gpu = mine_triplets(torch.from_numpy(emb).cuda(), torch.from_numpy(labels).cuda(),
                        torch.from_numpy(studies).cuda(), torch.from_numpy(desc).cuda(),
                        margin=0.5, selection="hardest")
    assert all(torch.equal(torch.as_tensor(c), torch.as_tensor(g).cpu()) for c, g in zip(cpu, gpu))
    ref = reference_mine(emb, labels, studies, desc, 0.5, "semihard")
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        a, p, n, hard, viable = mine_triplets(
            torch.from_numpy(emb).cuda(), torch.from_numpy(labels).cuda(),
            torch.from_numpy(studies).cuda(), desc, margin=0.5, selection="semihard",
            generator=gen)
        assert a.is_cuda and (hard, viable) == (ref["num_hard"], ref["num_viable"])
        for t in zip(a.tolist(), p.tolist(), n.tolist()):
            assert t[2] in set(ref["windows"][t[:2]].tolist())
    out = perturb_labels(torch.from_numpy(labels).cuda(), parent, 0.5,
                         torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda
