"""Which unlabelled rows to label next, Ray-free: each row's score for a strategy, the streamed best-N
candidate set the driver keeps, and the selections made on it.

- random: a seeded hash of the path (the same on every run);
- typical (cold start, TypiClust): k-means of the candidates into `budget` clusters, the most typical row of
  each (the inverse mean distance to its nearest neighbours in its cluster), largest clusters first;
- kcenter (cold start): greedy k-center coverage of the candidates, each pick the row farthest from those
  picked before;
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
COLD_CANDIDATES = 20_000  # typical and kcenter work on a seeded sample of the pool of at least this many


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


def _kmeans(x: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit_predict(x)


def typical(x: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, typicality): the most typical row of each of `budget` k-means clusters, largest first."""
    from sklearn.neighbors import NearestNeighbors

    labels = _kmeans(x, budget, seed)
    sizes = np.bincount(labels, minlength=budget)
    picks, scores = [], []
    for cluster in sorted(range(budget), key=lambda c: (-sizes[c], c)):
        rows = np.flatnonzero(labels == cluster)
        if len(rows) == 0:
            continue
        k = min(NEIGHBOURS, len(rows) - 1)
        if k == 0:
            picks.append(rows[0])
            scores.append(0.0)
            continue
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x[rows]).kneighbors(x[rows])
        mean = distances[:, 1:].mean(axis=1)  # the first neighbour is the row itself
        best = int(np.argmin(mean))
        picks.append(rows[best])
        scores.append(1.0 / (mean[best] + 1e-12))
    return np.array(picks, dtype=np.int64), np.array(scores)


def kcenter(x: np.ndarray, budget: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, distance to the nearest earlier pick): greedy k-center from row `first`."""
    picks, scores = [first], [np.inf]
    nearest = np.linalg.norm(x - x[first], axis=1)
    for _ in range(budget - 1):
        row = int(np.argmax(nearest))
        picks.append(row)
        scores.append(float(nearest[row]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[row], axis=1))
    return np.array(picks, dtype=np.int64), np.array(scores)


def diverse(x: np.ndarray, score: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, score): the highest-scored row of each of `budget` k-means clusters, best first."""
    labels = _kmeans(x, budget, seed)
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
