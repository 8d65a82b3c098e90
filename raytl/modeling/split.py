"""A seeded, stratified train/validation split that needs no shuffle and no gathering of rows.

Each row falls in one of 1024 bins by a hash of (seed, path). One pass counts rows per (label, bin);
each class then sends its lowest bins to validation until it holds round(fraction * n_class) rows (at
least one row for classes with two or more). Any worker decides a row's side from its path alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from raytl.errors import DatasetError

BINS = 1024


def bins(paths: Sequence[str], seed: int) -> np.ndarray:
    """The hash bin of each path, stable across processes and runs."""
    salt = f"{seed}\0".encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(salt + p.encode(), digest_size=8).digest(), "big") >> 54
            for p in paths
        ),
        dtype=np.int64,
        count=len(paths),
    )


def thresholds(histograms: dict[str, np.ndarray], fraction: float) -> dict[str, int]:
    """Per class, the bin below which rows go to validation."""
    out = {}
    for label, hist in histograms.items():
        n = int(hist.sum())
        target = max(1, round(fraction * n)) if n >= 2 else 0
        cumulative = np.concatenate([[0], np.cumsum(hist)])
        out[label] = int(np.searchsorted(cumulative, target, side="left")) if target else 0
    return out


def in_validation(labels: Sequence[str], row_bins: np.ndarray, limits: dict[str, int]) -> np.ndarray:
    """Boolean mask: which rows belong to the validation split."""
    limit = np.array([limits.get(label, 0) for label in labels], dtype=np.int64)
    return row_bins < limit


# --- whether a labelled dataset can train a classifier: the same sentences for `train` and `finetune` --


def check_classes(what: str, classes: Sequence[str]) -> None:
    """`what` (EMBEDDINGS or SOURCE, and its URI) must hold two classes or more."""
    if not classes:
        raise DatasetError(f"{what} holds no labelled rows; a classifier needs two classes.")
    if len(classes) < 2:
        raise DatasetError(f"{what} has a single class ({classes[0]!r}); a classifier needs two.")


def check_val_labels(what: str, val_labels: Iterable[str], classes: Sequence[str]) -> None:
    """--val may hold only labels that `what` trains."""
    unknown = sorted(set(val_labels) - set(classes))
    if unknown:
        raise DatasetError(f"--val has labels that {what} does not: {', '.join(map(repr, unknown[:5]))}.")


def check_sides(classes: Sequence[str], train: dict[str, int], val: dict[str, int], unit: str) -> None:
    """The split leaves validation `unit`s (rows, images) and training ones for every class."""
    if sum(val.values()) == 0:
        raise DatasetError("the validation split is empty: give --val or a larger --val-fraction.")
    empty = [c for c in classes if train.get(c, 0) == 0]
    if empty:
        raise DatasetError(f"class {empty[0]!r} has no training {unit} left after the validation split.")
