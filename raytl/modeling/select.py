"""Which unlabelled rows to label next, Ray-free: each row's score for a strategy, the streamed best-N
candidate set the driver keeps, and the selections made on it.

- random: a seeded hash of the path (the same on every run);
- typical (cold start, TypiClust): k-means of the candidates and the labelled rows into labelled + budget
  clusters, the most typical row (the inverse mean distance to its nearest neighbours in its cluster) of
  each cluster without a labelled row, largest clusters first;
- kcenter (cold start): greedy k-center coverage of the candidates, each pick the row farthest from the
  labelled rows and those picked before;
- margin / entropy (with a model): the smallest gap between the two most probable classes, the largest
  entropy of the class probabilities (an SVM's margins through a softmax);
- margin-diverse: the 10 x budget smallest-margin rows clustered into `budget` clusters, the smallest margin
  of each, so that a batch is not N copies of one confusing image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raytl.config import Strategy

NEIGHBOURS = 20  # typicality: the mean distance to this many nearest neighbours in the cluster
DIVERSE_POOL = 10  # margin-diverse: clusters drawn from the budget x this many most uncertain rows
COLD_CANDIDATES = 20_000  # typical and kcenter: a seeded sample of at least this many unlabelled rows
COVERED = 20_000  # and of at most this many labelled rows (what the labels cover already)
NEAR_CENTRE = 1_000  # typical on a larger pool: each cluster's rows this near its centre, over the whole pool


def hashed(paths: Sequence[str], seed: int) -> np.ndarray:
    """A seeded, stable number in [0, 1) per path."""
    salt = f"select\0{seed}\0".encode()
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + p.encode(), digest_size=8).digest(), "big") for p in paths),
        dtype=np.uint64,
        count=len(paths),
    )
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def probabilities(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def uncertainty(logits: np.ndarray, strategy: Strategy) -> np.ndarray:
    """Higher is more worth a label: 1 - (p1 - p2) for the margins, the entropy for entropy."""
    p = probabilities(logits.astype(np.float64))
    if strategy == Strategy.ENTROPY:
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    top = np.sort(p, axis=1)[:, -2:]
    return 1.0 - (top[:, 1] - top[:, 0])


@dataclass
class Best:
    """The n highest-scored rows seen so far (ties: the lower path hash), with their embeddings."""

    n: int
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tie: np.ndarray = field(default_factory=lambda: np.zeros(0))
    path: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    x: np.ndarray | None = None
    seen: int = 0

    def add(self, score: np.ndarray, tie: np.ndarray, path: np.ndarray, x: np.ndarray) -> None:
        self.seen += len(score)
        both = (
            np.concatenate([self.score, score]),
            np.concatenate([self.tie, tie]),
            np.concatenate([self.path, path]),
            x if self.x is None else np.concatenate([self.x, x]),
        )
        keep = np.lexsort((both[1], -both[0]))[: self.n]
        self.score, self.tie, self.path, self.x = (a[keep] for a in both)


def _kmeans(x: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(each row's cluster, the clusters' centres)."""
    from sklearn.cluster import KMeans

    fitted = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(x)
    return fitted.labels_, fitted.cluster_centers_


@dataclass
class Clusters:
    """TypiClust's clusters: k-means of the candidates and the labelled rows (`covered`) into
    len(covered) + budget clusters; which of them hold a labelled row; each candidate's cluster."""

    centres: np.ndarray
    taken: set[int]
    own: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, budget: int, seed: int, covered: np.ndarray | None = None) -> Clusters:
        held = 0 if covered is None else len(covered)
        both = x if covered is None or not held else np.concatenate([covered, x])
        labels, centres = _kmeans(both, min(len(both), held + budget), seed)
        return cls(centres, set(labels[:held].tolist()), labels[held:])


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's nearest centre, its distance to it), in chunks that bound the distance matrix."""
    cluster, distance = np.zeros(len(x), np.int64), np.zeros(len(x))
    squares = (centres**2).sum(axis=1)
    for start in range(0, len(x), 8192):
        chunk = x[start : start + 8192]
        d2 = (chunk**2).sum(axis=1)[:, None] - 2.0 * chunk @ centres.T + squares[None]  # |x - c|^2
        cluster[start : start + 8192] = d2.argmin(axis=1)
        distance[start : start + 8192] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return cluster, distance


@dataclass
class NearCentre:
    """Streamed over every unlabelled row: each cluster's size and its `n` rows nearest the centre (ties: the
    lower path hash), with their embeddings: the rows typicality is judged among on a pool too large for the
    driver to cluster whole."""

    clusters: int
    n: int
    sizes: np.ndarray = field(init=False)
    keep: Best = field(init=False)
    cluster: np.ndarray = field(init=False)  # the kept rows' clusters

    def __post_init__(self) -> None:
        self.sizes = np.zeros(self.clusters, np.int64)
        self.keep = Best(0)
        self.cluster = np.zeros(0, np.int64)

    def add(
        self, cluster: np.ndarray, distance: np.ndarray, tie: np.ndarray, path: np.ndarray, x: np.ndarray
    ) -> None:
        self.sizes += np.bincount(cluster, minlength=self.clusters)
        keep = self.keep
        keep.seen += len(cluster)
        own = self._nearest(cluster, distance, tie)  # the batch's own first: what the merge sorts stays small
        cluster, distance, tie, path, x = cluster[own], distance[own], tie[own], path[own], x[own]
        both = (
            np.concatenate([self.cluster, cluster]),
            np.concatenate([keep.score, distance]),
            np.concatenate([keep.tie, tie]),
            np.concatenate([keep.path, path]),
            x if keep.x is None else np.concatenate([keep.x, x]),
        )
        chosen = self._nearest(*both[:3])
        self.cluster = both[0][chosen]
        keep.score, keep.tie, keep.path, keep.x = (a[chosen] for a in both[1:])

    def _nearest(self, cluster: np.ndarray, distance: np.ndarray, tie: np.ndarray) -> np.ndarray:
        """Indices of each cluster's `n` rows nearest its centre (ties: the lower hash)."""
        order = np.lexsort((tie, distance, cluster))  # by cluster, then nearest, then hash
        rank = np.arange(len(order)) - np.searchsorted(cluster[order], cluster[order])
        return order[rank < self.n]


def typical(
    x: np.ndarray, budget: int, seed: int, covered: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, typicality): TypiClust over the candidates themselves (`Clusters.fit`, then
    `most_typical` with the candidates' own cluster sizes)."""
    clusters = Clusters.fit(x, budget, seed, covered)
    sizes = np.bincount(clusters.own, minlength=len(clusters.centres))
    return most_typical(x, clusters.own, sizes, clusters.taken, budget)


def most_typical(
    x: np.ndarray, own: np.ndarray, sizes: np.ndarray, taken: set[int], budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, typicality): of the clusters that hold no labelled row (`taken`), largest first
    (`sizes`), the most typical row of `x` in each (`own`: its cluster; the lowest mean distance to its
    nearest neighbours in the cluster)."""
    from sklearn.neighbors import NearestNeighbors

    order = sorted(range(len(sizes)), key=lambda c: (c in taken, -sizes[c], c))  # uncovered, largest first
    picks: list[int] = []
    scores: list[float] = []
    for cluster in order:
        rows = np.flatnonzero(own == cluster)
        if len(picks) == budget:
            break
        if len(rows) == 0:
            continue
        k = min(NEIGHBOURS, len(rows) - 1)
        if k == 0:
            picks.append(int(rows[0]))
            scores.append(0.0)
            continue
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x[rows]).kneighbors(x[rows])
        mean = distances[:, 1:].mean(axis=1)  # the first neighbour is the row itself
        best = int(np.argmin(mean))
        picks.append(int(rows[best]))
        scores.append(1.0 / (mean[best] + 1e-12))
    if len(picks) < budget:  # more picks than clusters with candidates: the nearest-to-centre rest
        rest = [i for i in range(len(x)) if i not in set(picks)][: budget - len(picks)]
        picks += rest
        scores += [0.0] * len(rest)
    return np.array(picks, dtype=np.int64), np.array(scores)


def kcenter(
    x: np.ndarray, budget: int, first: int, covered: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, distance to the nearest labelled row or earlier pick): greedy k-center coverage, from
    the labelled rows (`covered`) or, with none, from row `first`."""
    picks: list[int] = []
    scores: list[float] = []
    if covered is not None and len(covered):
        nearest = np.full(len(x), np.inf)
        for chunk in np.array_split(covered, max(1, len(covered) // 1024)):
            nearest = np.minimum(nearest, np.sqrt(((x[:, None, :] - chunk[None]) ** 2).sum(-1)).min(axis=1))
    else:
        picks, scores = [first], [np.inf]
        nearest = np.linalg.norm(x - x[first], axis=1)
    while len(picks) < budget:
        row = int(np.argmax(nearest))
        picks.append(row)
        scores.append(float(nearest[row]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[row], axis=1))
    return np.array(picks, dtype=np.int64), np.array(scores)


def diverse(x: np.ndarray, score: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, score): the highest-scored row of each of `budget` k-means clusters, best first."""
    labels, _ = _kmeans(x, budget, seed)
    picks = [int(np.flatnonzero(labels == c)[np.argmax(score[labels == c])]) for c in np.unique(labels)]
    order = sorted(picks, key=lambda i: -score[i])
    return np.array(order, dtype=np.int64), score[order]


def candidates(strategy: Strategy, budget: int) -> int:
    """How many best-scored rows the driver keeps for the strategy (typical and kcenter: a seeded sample)."""
    if strategy in (Strategy.TYPICAL, Strategy.KCENTER):
        return max(COLD_CANDIDATES, DIVERSE_POOL * budget)
    if strategy == Strategy.MARGIN_DIVERSE:
        return DIVERSE_POOL * budget
    return budget
