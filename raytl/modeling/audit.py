"""What `raytl audit` finds in embeddings, Ray-free: out-of-fold probe probabilities and confident learning
(cleanlab) for label issues; a partition of the normalised embeddings into cells (FAISS k-means) and, in each
cell, every row's nearest neighbours (FAISS exact inner-product search) for near-duplicates; the duplicate
groups (connected components of the pairs above the threshold).

Normalised: centred on the mean embedding, then of unit length, so that the inner product is the cosine
of the embeddings' deviations from the mean. Pooled ReLU features share a large common component (any two
VGG16 pool5 embeddings have a raw cosine near 0.8 or more); without it, the similarity measures what
images have in common with every image."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from raytl.modeling.select import hashed

# Near-duplicates: a cell of the partition holds about this many rows (each queried against the rows of
# its PROBES nearest cells); up to EXACT_ROWS rows are one cell, an exact search of every pair.
CELL_ROWS = 2_000
EXACT_ROWS = 20_000
PROBES = 2
# Label issues without --l2: the probe's penalty, times 1/n_train, chosen by the out-of-fold log loss.
L2_TIMES_N = (1.0, 10.0, 100.0)
SAMPLE_PER_CELL = 64  # k-means learns the cells from this many sampled rows a cell (at most MAX_SAMPLE)
MAX_SAMPLE = 100_000
HISTOGRAM_BINS = 100  # of every row's nearest-neighbour similarity, over [-1, 1]


# --- label issues ---------------------------------------------------------------------------------------


def folds(paths: Sequence[str], seed: int, k: int) -> np.ndarray:
    """Each path's fold in 0..k-1, by its seeded hash (select.hashed): stable across runs and processes."""
    return np.minimum((hashed(paths, seed) * k).astype(np.int64), k - 1)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """The mean negative log probability of the given labels (clipped at 1e-15, as scikit-learn's)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)).mean())


def spread(probs: np.ndarray, present: np.ndarray, classes: int) -> np.ndarray:
    """Probabilities over the `present` classes of a fold's fit -> over all classes (0 for the absent)."""
    out = np.zeros((len(probs), classes))
    out[:, present] = probs
    return out


@dataclass(frozen=True)
class Issues:
    """The rows cleanlab flags, most suspicious first: index, given and suggested class, self-confidence."""

    rows: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    self_confidence: np.ndarray


def label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate") -> Issues:
    """Confident learning (cleanlab.filter.find_label_issues, by `filter_by`) on out-of-fold
    probabilities, ranked by self-confidence (the probability of the given label), lowest first."""
    from cleanlab.filter import find_label_issues

    rows = find_label_issues(
        labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    rows = np.asarray(rows, dtype=np.int64)
    return Issues(rows, labels[rows], probs[rows].argmax(axis=1), probs[rows, labels[rows]])


# --- near-duplicates ------------------------------------------------------------------------------------


def unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows centred on `mean` and scaled to unit length (a row equal to the mean stays zero), float32."""
    y = np.asarray(x, np.float32) - mean.astype(np.float32)
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return np.divide(y, norms, out=np.zeros_like(y), where=norms > 0)


def cell_count(rows: int) -> int:
    return 1 if rows <= EXACT_ROWS else max(2, round(rows / CELL_ROWS))


def centroids(sample: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """(cells, D) unit centroids: spherical k-means (FAISS) of the normalised sample; one cell: its mean."""
    if cells == 1:
        return np.zeros((1, sample.shape[1]), np.float32)
    import faiss

    kmeans = faiss.Kmeans(sample.shape[1], cells, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    assert kmeans.centroids is not None
    return np.asarray(kmeans.centroids)


def nearest_cells(x: np.ndarray, centres: np.ndarray, probes: int) -> np.ndarray:
    """(N, min(probes, cells)) the nearest cells of each normalised row, nearest first."""
    if len(centres) == 1:
        return np.zeros((len(x), 1), np.int64)
    import faiss

    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(np.ascontiguousarray(centres, np.float32))
    _, cells = index.search(np.ascontiguousarray(x, np.float32), min(probes, len(centres)))
    return cells


def neighbours(members: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar members (inner product; FAISS exact search): (similarity, index)
    arrays of shape (Q, min(k, M)), most similar first."""
    import faiss

    index = faiss.IndexFlatIP(members.shape[1])
    index.add(np.ascontiguousarray(members, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), min(k, len(members)))


def cell_pairs(
    x: np.ndarray, paths: np.ndarray, member: np.ndarray, k: int, threshold: float
) -> tuple[list[tuple[str, str, float]], np.ndarray]:
    """In one cell: the rows that live there (`member`) and those that only look into it, each queried
    against the members for its k most similar. Returns the pairs (path, path, similarity) at or above the
    threshold, each once, lower path first; and each member's nearest other member's similarity (NaN for a
    member alone)."""
    inside = np.flatnonzero(member)
    if len(inside) == 0:
        return [], np.zeros(0)
    sims, found = neighbours(x[inside], x, k + 1)  # + 1: a member finds itself
    other = np.where(found >= 0, inside[np.maximum(found, 0)], -1)
    itself = other == np.arange(len(x))[:, None]
    queries, columns = np.nonzero((sims >= threshold) & (other >= 0) & ~itself)
    pairs: dict[tuple[str, str], float] = {}
    for q, c in zip(queries.tolist(), columns.tolist(), strict=True):
        a, b = paths[q], paths[other[q, c]]
        if a == b:  # the same image in EMBEDDINGS and in --val
            continue
        key = (a, b) if a < b else (b, a)
        pairs[key] = max(pairs.get(key, -1.0), float(sims[q, c]))
    others = ~itself[inside] & (other[inside] >= 0)
    first = others.argmax(axis=1)
    nearest = np.where(others.any(axis=1), sims[inside][np.arange(len(inside)), first], np.nan)
    return [(a, b, s) for (a, b), s in pairs.items()], nearest


def histogram(similarities: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(similarities[~np.isnan(similarities)], bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return counts


@dataclass
class Groups:
    """Connected components of the duplicate pairs (union-find over paths): memory in the pairs only."""

    parent: dict[str, str] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)  # each path's highest similarity to another

    def add(self, pairs: Iterable[tuple[str, str, float]]) -> None:
        for a, b, s in pairs:
            for p in (a, b):
                self.parent.setdefault(p, p)
                self.best[p] = max(self.best.get(p, -1.0), s)
            ra, rb = self._root(a), self._root(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def _root(self, p: str) -> str:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def groups(self) -> list[list[str]]:
        """Each group's paths, sorted; the groups largest first (then by their first path)."""
        found: dict[str, list[str]] = {}
        for p in self.parent:
            found.setdefault(self._root(p), []).append(p)
        return sorted((sorted(g) for g in found.values()), key=lambda g: (-len(g), g[0]))


def keeper(paths: Sequence[str], sides: Sequence[str]) -> int:
    """The member of a duplicate group that `--exclude` keeps: the first training row, else the first."""
    return next((i for i, side in enumerate(sides) if side == "train"), 0)
