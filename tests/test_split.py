"""The seeded, stratified split: exact per-class counts, stable, decided from the path alone."""

import collections

import numpy as np

from raytl.modeling import split


def _split(paths, labels, fraction, seed):
    row_bins = split.bins(paths, seed)
    hists = {
        c: np.bincount(row_bins[np.array(labels) == c], minlength=split.BINS) for c in sorted(set(labels))
    }
    return split.in_validation(labels, row_bins, split.thresholds(hists, fraction))


def test_stratified_counts():
    labels = ["a"] * 700 + ["b"] * 297 + ["c"] * 3 + ["d"]
    paths = [f"s3://b/{i}.jpg" for i in range(len(labels))]
    val = _split(paths, labels, 0.2, seed=0)
    got = collections.Counter(np.array(labels)[val].tolist())
    assert got == {"a": 140, "b": 59, "c": 1}  # round(0.2 n), at least one for classes of two or more


def test_seeded_and_stable():
    labels = ["a", "b"] * 500
    paths = [f"p{i}" for i in range(1000)]
    a = _split(paths, labels, 0.3, seed=1)
    assert np.array_equal(a, _split(paths, labels, 0.3, seed=1))
    assert not np.array_equal(a, _split(paths, labels, 0.3, seed=2))
    # a worker holding any subset of rows decides the same side for each of them
    limits_from_all = split.thresholds(
        {c: np.bincount(split.bins(paths, 1)[np.array(labels) == c], minlength=split.BINS) for c in "ab"}, 0.3
    )
    subset = slice(100, 200)
    sub = split.in_validation(labels[subset], split.bins(paths[subset], 1), limits_from_all)
    assert np.array_equal(sub, a[subset])
