"""Cluster counts, labels and sizes per configuration, and the time to reach k clusters.

Two counts (docs/metrics.md):

* ``"graph"``: connected components of the ε-graph ‖x_i − x_j‖ ≤ ε (Euclidean distance, ε in the
  units of x — on the unit sphere for extracted trajectories, see ``count_clusters``; the clusters
  of bounded-confidence / Hegselmann–Krause opinion dynamics). Found with a k-d tree over grid cells,
  so the cost grows with the number of occupied cells, not with the number of close pairs (collapsed
  clusters cost O(n log n), not O(n²)).
* ``"gram"``: the count of Geshkovski et al. (arXiv 2312.10794): with u_i = x_i/‖x_i‖,
  B_ij = 1[⟨u_i, u_j⟩ > 1 − ε] and the count is rank(B), the numerical rank with numpy's default
  tolerance (max|λ(B)| · n · machine-ε, from the eigenvalues of the symmetric B). Here ε is a
  cosine gap: ⟨u_i, u_j⟩ > 1 − ε ⇔ ‖u_i − u_j‖ < √(2ε). When B is a disjoint union of all-ones
  blocks (well-separated clusters) its rank is the number of blocks; otherwise it is only a
  rank-type count (e.g. a chain of overlapping neighbourhoods can have rank > 1).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from analysis._layout import POINTS, check_positive, per_item

METHODS = ("graph", "gram")


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Labels of the connected components of the undirected graph on n nodes with edges (m, 2)."""
    adj = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(adj, directed=False)[1]


#: from this many dimensions on, at most DIRECT_MAX_POINTS points are linked pair by pair (k-d tree
#: over the points themselves): the grid's cells (side ε/(4√d)) then hold one point each, and
#: np.unique over d-long keys was most of the cost (128 tokens of SmolLM2, d = 576: 6.3 → 1.8 ms)
DIRECT_MIN_DIM, DIRECT_MAX_POINTS = 16, 4096


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """The same partition, its parts numbered by first appearance (the first point has label 0)."""
    _, order, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(order))[inverse.ravel()]


def _graph_labels(x: np.ndarray, eps: float) -> np.ndarray:
    """Components of ‖x_i − x_j‖ ≤ ε, numbered by first appearance (particle 0 has label 0).

    Points are binned into grid cells of side δ/√d, δ = ε/4: a cell's points lie within δ < ε of
    each other, so each cell is a clique, represented by its first point. Representatives within ε
    are an edge of the ε-graph. A cell with several points may also reach a cell whose
    representative lies in (ε, ε + 2δ] (never farther): those members are compared directly.
    Few points in many dimensions (DIRECT_MIN_DIM, DIRECT_MAX_POINTS) skip the grid.
    """
    n, d = x.shape
    if d >= DIRECT_MIN_DIM and n <= DIRECT_MAX_POINTS:
        edges = cKDTree(x).query_pairs(eps, output_type="ndarray").reshape(-1, 2)
        return _first_appearance(_components(n, edges))
    delta = eps / 4
    keys = np.floor(x / (delta / np.sqrt(d)))
    _, first, cell = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    cell, reps, size = cell.ravel(), x[first], np.bincount(cell.ravel())
    tree = cKDTree(reps)
    edges = tree.query_pairs(eps, output_type="ndarray").reshape(-1, 2)
    labels = _components(len(reps), edges)
    multi = np.flatnonzero(size > 1)
    band = cKDTree(reps[multi]).sparse_distance_matrix(tree, eps + 2 * delta, output_type="ndarray")
    a, b = multi[band["i"]], band["j"]
    keep = (band["v"] > eps) & (labels[a] != labels[b]) & ((size[b] == 1) | (a < b))
    members = np.split(np.argsort(cell, kind="stable"), np.cumsum(size)[:-1])
    linked = [(i, j) for i, j in zip(a[keep], b[keep]) if cdist(x[members[i]], x[members[j]]).min() <= eps]
    if linked:
        labels = _components(len(reps), np.concatenate([edges, np.array(linked)]))
    return _first_appearance(labels[cell])


def _gram_count(x: np.ndarray, eps: float) -> int:
    """rank of B_ij = 1[⟨u_i, u_j⟩ > 1 − ε], u_i = x_i/‖x_i‖ (numpy's matrix_rank tolerance)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(norms > 0, norms, 1.0)
    lam = np.abs(np.linalg.eigvalsh((u @ u.T > 1 - eps).astype(float)))
    return int(np.sum(lam > lam.max() * len(x) * np.finfo(float).eps))


def _cluster_args(shape, arguments):
    arguments["eps"] = check_positive("eps", arguments["eps"])
    if arguments.get("method", "graph") not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {arguments['method']!r}")


@per_item(POINTS, dtype=int, check=_cluster_args)
def count_clusters(
    x: np.ndarray | xr.DataArray | xr.Dataset, eps: float, method: str = "graph", *,
    sphere: bool | None = None,
) -> int | xr.DataArray:
    """Number of clusters of each configuration.

    * ``method="graph"``: connected components of the graph with edges ‖x_i − x_j‖ ≤ ε;
    * ``method="gram"``: rank of B_ij = 1[⟨u_i, u_j⟩ > 1 − ε], u_i = x_i/‖x_i‖ (Geshkovski,
      Letrouit, Polyanskiy, Rigollet 2023, arXiv 2312.10794).

    ``sphere`` (default: True for extracted trajectories, whose item axis is "token"; False otherwise)
    first divides each token by its norm, so ε is a distance on the unit sphere and a positive
    rescaling of any token changes nothing. Padding tokens (``token_mask``) are left out; a
    configuration without tokens has 0 clusters.
    """
    if len(x) == 0:
        return 0
    if method == "graph":
        return int(_graph_labels(x, eps).max()) + 1
    return _gram_count(x, eps)


def _eps_only(shape, arguments):
    arguments["eps"] = check_positive("eps", arguments["eps"])


@per_item(POINTS, item_dims=(0,), dtype=int, check=_eps_only)
def cluster_labels(
    x: np.ndarray | xr.DataArray | xr.Dataset, eps: float, *, sphere: bool | None = None,
) -> np.ndarray | xr.DataArray:
    """Component label c_i of each particle in the ε-graph ‖x_i − x_j‖ ≤ ε (i ~ j ⇒ c_i = c_j,
    transitively), numbered 0, 1, … by first appearance in particle order; −1 for padding tokens.
    ``sphere`` as in ``count_clusters``."""
    return _graph_labels(x, eps) if len(x) else np.zeros(0, int)


@per_item(POINTS, item_dims=(0,), dtype=int, fill=0, packed=True, check=_eps_only)
def _sizes(x, eps, *, sphere=None):
    return -np.sort(-np.bincount(_graph_labels(x, eps), minlength=len(x))) if len(x) else np.zeros(0, int)


def cluster_sizes(
    x: np.ndarray | xr.DataArray | xr.Dataset, eps: float, *, sphere: bool | None = None, token_mask=None,
) -> xr.DataArray:
    """Sizes m_a = |{i : c_i = a}| of the ε-graph components (``cluster_labels``), largest first,
    along a "cluster" axis padded with 0 up to the largest count over the leading axes (a single
    configuration gives a 1-D DataArray).
    ``sphere`` and ``token_mask`` as in ``count_clusters``. Finding the largest count computes the
    sizes (a lazy input is evaluated)."""
    sizes = _sizes(x, eps, sphere=sphere, token_mask=token_mask)
    item = sizes.dims[-1]
    sizes = sizes.drop_vars([c for c in sizes.coords if item in sizes[c].dims]).rename({item: "cluster"})
    return sizes.isel(cluster=slice(0, int((sizes > 0).sum("cluster").max()))).rename("cluster_sizes")


def time_to_clusters(
    x: np.ndarray | xr.DataArray | xr.Dataset, k: int, eps: float, method: str = "graph", *,
    sphere: bool | None = None, token_mask=None,
) -> float | xr.DataArray:
    """First coordinate t of the "time" (else "layer") axis with count_clusters(x(t)) ≤ k; NaN if never.

    Uses the axis' coordinate values (e.g. time = step · dt) or, without a coordinate, the index;
    returns a float, or a DataArray over the other leading axes (e.g. "sample").
    ``sphere`` and ``token_mask`` as in ``count_clusters``.
    """
    if isinstance(k, (bool, str)) or not float(k).is_integer() or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    counts = count_clusters(x, eps, method=method, sphere=sphere, token_mask=token_mask)
    axis = next((d for d in ("time", "layer") if isinstance(counts, xr.DataArray) and d in counts.dims), None)
    if axis is None:
        raise ValueError("x: needs a trajectory with a 'time' or 'layer' axis")
    first = counts[axis].where(counts <= k).min(axis)
    return first.item() if first.ndim == 0 else first.rename("time_to_clusters")


def time_to_consensus(
    x: np.ndarray | xr.DataArray | xr.Dataset, eps: float, method: str = "graph", *,
    sphere: bool | None = None, token_mask=None,
) -> float | xr.DataArray:
    """time_to_clusters(x, 1, eps, method): first time/layer with a single cluster; NaN if never."""
    return time_to_clusters(x, 1, eps, method=method, sphere=sphere, token_mask=token_mask)
