"""The training core (raytl.modeling.loop), without Ray: one epoch's step and evaluation on plain batches,
against closed forms and scikit-learn; the best-epoch rule both programs share."""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss

import raytl
from raytl.modeling import loop
from raytl.modeling.classifier import LinearHead
from raytl.modeling.loop import RowLosses
from raytl.modeling.probe import ProbeObjective

PACKAGE = pathlib.Path(raytl.__file__).parent


def _probe(dim: int, classes: int, l2: float = 0.0, weights=None, svm: bool = False):
    head = LinearHead(torch.zeros(dim), torch.ones(dim), classes)
    weights = torch.ones(classes) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return head, ProbeObjective(head, head, weights, svm, l2)


def _batches(x: np.ndarray, y: np.ndarray, size: int):
    return [
        (torch.from_numpy(x[i : i + size]), torch.from_numpy(y[i : i + size])) for i in range(0, len(y), size)
    ]


def test_evaluate_is_scikit_learns_weighted_log_loss_and_accuracy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, 50)
    head, objective = _probe(4, 3, weights=[1.0, 2.0, 0.5])
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)))
        head.linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        probabilities = torch.softmax(head(torch.from_numpy(x)), 1).numpy()
    metrics = loop.evaluate(head, objective, _batches(x, y, 16), torch.device("cpu"))
    class_weight = np.array([1.0, 2.0, 0.5])[y]
    assert metrics.loss == pytest.approx(log_loss(y, probabilities, sample_weight=class_weight), rel=1e-5)
    assert metrics.accuracy == pytest.approx(accuracy_score(y, probabilities.argmax(1)))
    assert metrics.failed == 0


def test_one_step_is_the_gradient_of_the_weighted_mean_loss_plus_the_l2_penalty():
    """One batch, SGD: W <- W - lr (sum_i w_i (p_i - e_yi) x_i^T / sum_i w_i + l2 W), in closed form."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), np.array([0, 1, 2, 1, 0, 2, 2, 1])
    head, objective = _probe(3, 3, l2=0.3, weights=[1.0, 3.0, 0.5])
    w0 = rng.normal(size=(3, 3)).astype(np.float32)
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(w0))
    p = torch.softmax(torch.from_numpy(x @ w0.T), 1).numpy()
    weight = np.array([1.0, 3.0, 0.5])[y][:, None]
    gradient = ((p - np.eye(3)[y]) * weight).T @ x / weight.sum() + 0.3 * w0
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    metrics = loop.train_one_epoch(
        head, objective, optimizer, _batches(x, y, 8), torch.device("cpu"), penalty=objective.penalty
    )
    np.testing.assert_allclose(head.linear.weight.detach().numpy(), w0 - 0.1 * gradient, rtol=1e-5, atol=1e-6)
    assert metrics.loss == pytest.approx(
        log_loss(y, p, sample_weight=weight[:, 0]), rel=1e-5
    )  # before the step


def test_rows_that_failed_to_decode_weigh_nothing_and_count_as_failed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    ok = torch.tensor([True, True, False, True])
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    sums = RowLosses(loss, logits, y, ok.float(), ok).sums()
    metrics = loop.EpochMetrics.of(sums)
    assert metrics.loss == pytest.approx(float(loss[ok].mean()))
    assert metrics.accuracy == pytest.approx(2 / 3) and metrics.failed == 1
    empty = loop.EpochMetrics.of(torch.zeros(5, dtype=torch.float64))
    assert math.isnan(empty.loss) and math.isnan(empty.accuracy)


def test_training_epochs_separate_separable_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    x = (rng.normal(size=(200, 2)) + 3 * np.eye(2)[y]).astype(np.float32)
    head, objective = _probe(2, 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = [
        loop.train_one_epoch(head, objective, optimizer, _batches(x, y, 32), torch.device("cpu")).loss
        for _ in range(10)
    ]
    assert losses[-1] < losses[0] / 3
    reference = LogisticRegression().fit(x, y).score(x, y)
    assert (
        loop.evaluate(head, objective, _batches(x, y, 64), torch.device("cpu")).accuracy >= reference - 0.01
    )


def test_selection_keeps_the_best_epochs_weights_and_survives_a_checkpoint():
    selection = loop.Selection(by_accuracy=True)
    weights = {"w": torch.zeros(2)}
    for epoch, (loss, accuracy) in enumerate([(1.0, 0.5), (0.8, 0.7), (0.9, 0.7), (2.0, 0.6)]):
        weights["w"] += 1
        selection.offer({"epoch": epoch, "val_loss": loss, "val_accuracy": accuracy}, lambda: weights)
    assert (selection.epoch, selection.stale) == (1, 2)
    assert selection.weights is not None and selection.weights["w"].tolist() == [2.0, 2.0]  # a copy
    restored = loop.Selection.restore(True, selection.state())
    assert (restored.best, restored.epoch, restored.stale) == (selection.best, 1, 2)
    assert restored.weights is not None and restored.weights["w"].tolist() == [2.0, 2.0]
    assert not restored.offer({"epoch": 4, "val_loss": 0.8 + 1e-9, "val_accuracy": 0.7 - 1e-9})  # noise
    assert restored.offer(
        {"epoch": 5, "val_loss": 0.7, "val_accuracy": 0.7}
    )  # the same accuracy, a lower loss


def test_one_training_core():
    """train_one_epoch and evaluate are defined once in raytl (here), and both Ray Train programs step
    through them; no MODEL_DIR file name is spelt outside raytl.modeling.model_dir."""
    from raytl.modeling.model_dir import WRITTEN

    names = {n for n in WRITTEN if "." in n} | {"head.pt", "state.pt"}
    defined: dict[str, list[str]] = {"train_one_epoch": [], "evaluate": []}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in defined:
                defined[node.name].append(path.name)
            if isinstance(node, ast.Constant) and node.value in names and path.name != "model_dir.py":
                pytest.fail(f"{path.name} spells {node.value!r}: take it from raytl.modeling.model_dir")
    assert defined == {"train_one_epoch": ["loop.py"], "evaluate": ["loop.py"]}
