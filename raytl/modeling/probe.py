"""The linear probe's model code, Ray-free: its losses (multinomial logistic regression; the one-vs-rest
squared hinge of scikit-learn's LinearSVC), the objective the training core steps it with, and the
scikit-learn fit on one node that is its reference."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from raytl.config import ClassWeight, Kernel, ProbeHead, TrainConfig
from raytl.errors import ConfigError
from raytl.modeling.classifier import LinearHead, Model
from raytl.modeling.loop import RowLosses
from raytl.modeling.model_dir import ModelInfo

log = logging.getLogger(__name__)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def squared_hinge(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-rest squared hinge per row: sum over classes k of max(0, 1 - t_k m_k)^2, t_k = +1 for the
    row's class and -1 for the others (LinearSVC's loss, summed over its binary problems)."""
    target = torch.full_like(margins, -1.0)
    target[torch.arange(len(y), device=margins.device), y] = 1.0
    return torch.clamp(1.0 - target * margins, min=0.0).pow(2).sum(dim=1)


def class_weights(counts: dict[str, int], classes: list[str], mode: ClassWeight) -> list[float]:
    """Per class, its weight in the loss: 1, or n / (classes * n_class) for --class-weight balanced."""
    if mode == ClassWeight.NONE:
        return [1.0] * len(classes)
    n = sum(counts.values())
    return [n / (len(classes) * counts[c]) for c in classes]


@dataclass(frozen=True)
class ProbeObjective:
    """(x, y) batches through the head: each row weighs its class weight; the L2 penalty is `penalty`."""

    model: torch.nn.Module  # the head as the workers step it (DDP-wrapped)
    head: LinearHead  # its parameters
    weights: torch.Tensor  # per class
    svm: bool
    l2: float

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor], training: bool) -> RowLosses:
        x, y = batch
        logits = self.model(x)
        loss = squared_hinge(logits, y) if self.svm else cross_entropy(logits, y)
        return RowLosses(loss, logits, y, self.weights[y], torch.ones_like(y, dtype=torch.bool))

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.l2 * self.head.linear.weight.pow(2).sum()


# --kernel rbf keeps every training row on the driver and costs O(n^2): refused beyond this many rows.
RBF_MAX_ROWS = 50_000


def check_kernel(config: TrainConfig, rows: int) -> None:
    """--kernel rbf only for EMBEDDINGS of up to RBF_MAX_ROWS rows."""
    if config.kernel == Kernel.RBF and rows > RBF_MAX_ROWS:
        raise ConfigError(
            f"--kernel rbf fits scikit-learn's SVC on one node and does not scale past it: EMBEDDINGS has "
            f"{rows:,} rows, more than the {RBF_MAX_ROWS:,} it takes; use --kernel linear (the Ray Train "
            "SVM)."
        )


def fit_sklearn(
    x: np.ndarray, y: np.ndarray, classes: list[str], config: TrainConfig, l2: float, info: ModelInfo
) -> Model:
    """scikit-learn on the driver, standardised: LogisticRegression, LinearSVC or an RBF SVC. The
    reference, for data that fits on one node."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    n = len(y)
    scaler = StandardScaler().fit(x)
    c = 1.0 / (l2 * n) if l2 > 0 else 1e12
    balanced = "balanced" if config.class_weight == ClassWeight.BALANCED else None
    std = np.where(scaler.scale_ > 1e-12, scaler.scale_, 1.0)
    head = LinearHead(torch.from_numpy(scaler.mean_), torch.from_numpy(std), len(classes))
    if config.kernel == Kernel.RBF:
        log.warning("--kernel rbf: scikit-learn's SVC on this node only (%d rows); it does not scale out", n)
        kernel = make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", class_weight=balanced)).fit(x, y)
        return replace(Model.from_head(head, classes, info), kernel=kernel)
    if config.head == ProbeHead.SVM:
        clf: Any = LinearSVC(C=c, class_weight=balanced, max_iter=10_000, random_state=config.seed)
    else:
        clf = LogisticRegression(C=c, class_weight=balanced, max_iter=2000, random_state=config.seed)
    clf.fit(scaler.transform(x), y)
    weight, bias = clf.coef_, clf.intercept_
    if len(classes) == 2:
        # One row w for class 1. logreg: p(1) = sigmoid(w.x + b), a softmax over (0, w.x + b); SVM: the
        # margins (-(w.x + b), w.x + b) pick the same class, with |w.x + b| as the margin.
        first = -weight if config.head == ProbeHead.SVM else np.zeros_like(weight)
        weight = np.vstack([first, weight])
        bias = np.concatenate([-bias if config.head == ProbeHead.SVM else [0.0], bias])
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    return Model.from_head(head, classes, info)


def fit_in_rounds(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], config: TrainConfig, l2: float, rounds: int,
    iterations: int,
) -> Any:  # fmt: skip
    """The validation accuracy of fit_sklearn's linear probe (standardised, C = 1/(l2 n)) after each round
    of `iterations` solver iterations (logistic regression, warm-started), so that a sweep can stop a
    hopeless value early; the SVM (liblinear has no warm start) in one round. data: x, y, x_val, y_val."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    x, y, xv, yv = data
    scaler = StandardScaler().fit(x)
    xs, xvs = scaler.transform(x), scaler.transform(xv)
    c = 1.0 / (l2 * len(y)) if l2 > 0 else 1e12
    balanced = "balanced" if config.class_weight == ClassWeight.BALANCED else None
    if config.head == ProbeHead.SVM:
        svm = LinearSVC(C=c, class_weight=balanced, max_iter=10_000, random_state=config.seed).fit(xs, y)
        yield float((svm.predict(xvs) == yv).mean())
        return
    clf = LogisticRegression(
        C=c, class_weight=balanced, max_iter=iterations, warm_start=True, random_state=config.seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a round ends before convergence on purpose
        for _ in range(rounds):
            clf.fit(xs, y)
            yield float((clf.predict(xvs) == yv).mean())
