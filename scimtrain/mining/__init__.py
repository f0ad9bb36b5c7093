"""Ontology-aware triplet mining without a per-pair loop.

Same pairs, candidates, hard/viable counts and selection windows as SCimilarity's loop, in a
few passes over the batch's distance matrix and O(pairs) steps; no sort of the matrix.

For a pair (a, p) with d = D[a,p] and t = d + margin, a candidate negative x of anchor a is
hard when x < t and in the semihard window when also x > d. Those pair thresholds are the
row's *boundaries*; a candidate's *interval* is its row's offset plus the number of
boundaries below it. A pair's hard candidates then fill the row's intervals up to t's, its
window the intervals after (the float after) d's up to t's, so with the candidates lined up
interval after interval both are one run, and a uniform pick inside it is one index.

Modules, each with one concern:

* ``dispatch``: ``mine_triplets``: checks the inputs, picks the path;
* ``cpu_path``: the CPU path, compiled loops (numba), one anchor row at a time;
* ``torch_path``: the same steps as torch tensor operations (CUDA), a block of rows at a time,
  with ``batch`` (pairs, candidate table), ``bins`` (exact intervals without sorting) and
  ``segments`` (tensor operations on values grouped row after row);
* ``checks``: input checks (and the uniform draw) shared with ``losses`` and ``metrics``;
* ``distances``: the squared distance matrix, as SCimilarity's ``pdist``.

Both paths line candidates up by (interval, column), so given the same distances they pick
the same negatives for the same generator numbers: the picks do not depend on the path, the
threads, the block size or the bucket counts.
"""

from .checks import SELECTIONS
from .dispatch import mine_triplets
from .distances import squared_distances

__all__ = ["SELECTIONS", "mine_triplets", "squared_distances"]
