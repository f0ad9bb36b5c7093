"""Plain-Python reference for triplet mining and the ontology ASW, written from
docs/scimilarity.md §5-6.

Deliberately shaped like SCimilarity's ``TripletSelector``: loops over labels and over
anchor-positive pairs, numpy only for one pair's candidate vector. It is the oracle the tests
compare ``scimtrain.losses`` / ``scimtrain.metrics`` against, and the "loop" that
``benchmarks/triplet_mining.py`` times (the benchmark puts this folder on ``sys.path``).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def reference_distances(embeddings: np.ndarray) -> np.ndarray:
    """SCimilarity's ``pdist``: squared Euclidean distances."""
    sq = (embeddings**2).sum(axis=1)
    return -2 * embeddings @ embeddings.T + sq.reshape(1, -1) + sq.reshape(-1, 1)


def ancestors_descendants(descendant: np.ndarray) -> tuple[list[set], list[set]]:
    """Per label: the set of its strict ancestors and of its strict descendants."""
    n_labels = len(descendant)
    desc = [{j for j in range(n_labels) if descendant[i][j]} for i in range(n_labels)]
    anc = [{j for j in range(n_labels) if descendant[j][i]} for i in range(n_labels)]
    return anc, desc


def reference_mine(
    embeddings: np.ndarray,
    labels,
    studies,
    descendant: np.ndarray,
    margin: float,
    selection: str,
    rng: np.random.Generator | None = None,
    negative_labels=None,
    keep_windows: bool = True,
    dist: np.ndarray | None = None,
) -> dict:
    """Mine as docs/scimilarity.md §5 says. Returns ``triplets`` (list of (a, p, n)), ``num_hard``,
    ``num_viable`` and, if ``keep_windows``, ``windows``: {(a, p): array of the negatives the
    selection could pick}, for every pair (empty array = no triplet for that pair).
    ``dist`` overrides the distance matrix (for exact ties: two BLAS libraries may round the
    same distance differently)."""
    rng = rng or np.random.default_rng(0)
    labels = np.asarray(labels)
    negative_labels = labels if negative_labels is None else np.asarray(negative_labels)
    if dist is None:
        dist = reference_distances(np.asarray(embeddings))
    anc, desc = ancestors_descendants(np.asarray(descendant))

    triplets, windows = [], {}
    num_hard = num_viable = 0
    for label in sorted(set(labels.tolist())):
        violating = list(anc[label] | desc[label])
        label_mask = labels == label
        label_indices = np.where(label_mask)[0]
        if len(label_indices) < 2:
            continue
        negatives = np.where(~(label_mask | np.isin(negative_labels, violating)))[0]
        pairs = list(combinations(label_indices, 2))
        if studies is not None:
            pairs = [(a, p) for a, p in pairs if studies[a] != studies[p]]
        for a, p in pairs:
            v = dist[a, p] - dist[a, negatives] + margin
            num_hard += int((v > 0).sum())
            num_viable += int(v.size)
            if selection == "semihard":
                window = np.where((v > 0) & (v < margin))[0]
            elif selection == "random":
                window = np.where(v > 0)[0]
            elif selection == "hardest":
                best = int(np.argmax(v)) if v.size else -1
                window = np.array([best]) if v.size and v[best] > 0 else np.array([], int)
            else:
                raise ValueError(selection)
            if keep_windows:
                windows[(int(a), int(p))] = negatives[window]
            if window.size:
                triplets.append((int(a), int(p), int(negatives[rng.choice(window)])))
    return {"triplets": triplets, "num_hard": num_hard, "num_viable": num_viable,
            "windows": windows}


def reference_asw(embeddings: np.ndarray, labels, descendant: np.ndarray) -> float:
    """docs/scimilarity.md §6's ontology-aware silhouette, one cell and one other cell at a time."""
    labels = [int(x) for x in labels]
    dist = reference_distances(np.asarray(embeddings, dtype=np.float64))
    anc, desc = ancestors_descendants(np.asarray(descendant))
    widths = []
    for i, li in enumerate(labels):
        same, foreign = [], {}
        for j, lj in enumerate(labels):
            if i == j:
                continue
            if lj == li or lj in desc[li]:
                same.append(dist[i, j])
            elif lj not in anc[li]:
                foreign.setdefault(lj, []).append(dist[i, j])
        big = [sum(v) / len(v) for v in foreign.values() if len(v) > 1]
        if len(same) <= 1 or not big:
            continue
        a = sum(same) / (len(same) - 1)
        b = min(big)
        top = max(a, b)
        widths.append((b - a) / top if top > 0 else 0.0)
    return sum(widths) / len(widths) if widths else float("nan")


# ----------------------------------------------------------------------------- test ontologies

# A small hand-made cell ontology (label position: direct parents). 9 has two parents.
HAND_PARENTS = {
    0: [],      # cell
    1: [0],     # immune cell
    2: [1],     # T cell
    3: [2],     # CD4 T cell
    4: [2],     # CD8 T cell
    5: [1],     # B cell
    6: [0],     # epithelial cell
    7: [6],     # hepatocyte
    8: [0],     # fibroblast
    9: [3, 4],  # double-positive T cell
}


def parent_matrix(parents: dict[int, list[int]]) -> np.ndarray:
    """``[i, j]`` True when j is a direct parent of i."""
    n = len(parents)
    out = np.zeros((n, n), dtype=bool)
    for child, ps in parents.items():
        out[child, ps] = True
    return out


def descendant_matrix(parent: np.ndarray) -> np.ndarray:
    """Transitive closure: ``[i, j]`` True when j is a strict descendant of i."""
    n = len(parent)
    reach = parent.T.copy()  # reach[i, j]: i is a parent of j
    for k in range(n):
        reach |= reach[:, [k]] & reach[[k], :]
    return reach


def random_ontology(n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """A random DAG over label positions as a parent matrix: each label takes 0-2 parents
    among the earlier ones, so there are roots, chains and multi-parent labels."""
    parents = {0: []}
    for i in range(1, n_labels):
        k = int(rng.choice([0, 1, 1, 1, 2]))
        parents[i] = sorted(set(rng.choice(i, size=min(k, i), replace=False).tolist()))
    return parent_matrix(parents)
