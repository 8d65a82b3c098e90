"""Metrics from a confusion matrix equal scikit-learn's."""

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from raytl.modeling.metrics import confusion, report


def test_report_matches_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 5, 400))
    y_pred[y_pred == 4] = 3  # class 4 is never predicted: precision 0 by zero_division=0
    matrix = confusion(y_true, y_pred, 5)
    assert np.array_equal(matrix, confusion_matrix(y_true, y_pred, labels=range(5)))
    got = report(matrix, list("abcde"))
    assert got["accuracy"] == accuracy_score(y_true, y_pred)
    assert np.isclose(got["macro_f1"], f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    for i, name in enumerate("abcde"):
        c = got["per_class"][name]
        assert (
            np.allclose([c["precision"], c["recall"], c["f1"]], [p[i], r[i], f[i]]) and c["support"] == s[i]
        )
    assert got["samples"] == 400 and got["classes"] == list("abcde")
