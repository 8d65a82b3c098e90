"""The few-shot learning curve's model code, Ray-free: the ladder of labels per class, the seeded labelled
subsets (nested: the k-shot subset of a draw holds its smaller ones), one point's fit and score, and the
summary a user reads ("0.90 of the full-data accuracy at k = 16").

Each draw r ranks a class's training rows by a hash of (seed, r, path), the same in every process and on
every run; the k-shot subset of draw r is each class's k lowest-ranked rows (all of a class that has fewer).
So any worker can rank its rows alone, and the driver keeps only the `largest k` best-ranked rows of each
(draw, class): never the whole training split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytl.config import L2_AUTO, TrainConfig
from raytl.modeling.audit import log_loss
from raytl.modeling.metrics import confusion, report
from raytl.modeling.model_dir import ModelInfo
from raytl.modeling.probe import fit_sklearn
from raytl.modeling.select import probabilities

FULL = "all"  # the last point: every training row
SHARE = 0.9  # the answer printed: the labels per class that reach this share of the full-data accuracy
# --l2 auto at a few-shot point: lambda = factor / n, the grid of train's sweep (cluster/sweep.FACTORS),
# scored by stratified cross-validation within the point's own rows, in at most this many folds, and only
# where every class has MIN_ROWS rows or more (below, the default 1/n: measured on the quickstart's digits,
# cross-validating 1-3 rows a class chose worse penalties than the default).
L2_FACTORS = tuple(10.0**e for e in range(-4, 5))
INNER_FOLDS = 5
MIN_ROWS = 4


def ladder(shots: Sequence[int] | None, largest_class: int) -> list[int]:
    """Labels per class at each point below "all": --shots, or 1, 2, 4, ... below the largest class's
    training rows (a point at or above it would be "all" again)."""
    if shots is not None:
        return [k for k in shots if k < largest_class]
    out, k = [], 1
    while k < largest_class:
        out.append(k)
        k *= 2
    return out


def ranks(paths: Sequence[str], seed: int, draw: int) -> np.ndarray:
    """Each path's rank key in draw `draw` (uint64, stable across processes and runs)."""
    salt = f"{seed}\0{draw}\0".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + p.encode(), digest_size=8).digest(), "big") for p in paths),
        dtype=np.uint64,
        count=len(paths),
    )


def best_ranked(batch: dict[str, np.ndarray], seed: int, draws: int, k: int) -> dict[str, np.ndarray]:
    """Of a batch of training rows (x, y, path), the k best-ranked rows of each (draw, class): the only
    rows any point of the curve can use. A row kept by several draws appears once for each."""
    parts: dict[str, list[np.ndarray]] = {"draw": [], "key": [], "x": [], "y": []}
    y = batch["y"]
    for draw in range(draws):
        keys = ranks(batch["path"].tolist(), seed, draw)
        for label in np.unique(y):
            rows = np.flatnonzero(y == label)
            rows = rows[np.argsort(keys[rows], kind="stable")[:k]]
            parts["draw"].append(np.full(len(rows), draw, np.int64))
            parts["key"].append(keys[rows])
            parts["x"].append(batch["x"][rows])
            parts["y"].append(y[rows])
    if not parts["x"]:
        dim = batch["x"].shape[1] if batch["x"].ndim == 2 else 0
        return {"draw": np.zeros(0, np.int64), "key": np.zeros(0, np.uint64),
                "x": np.zeros((0, dim), np.float32), "y": np.zeros(0, np.int64)}  # fmt: skip
    return {name: np.concatenate(values) for name, values in parts.items()}


@dataclass
class Subsets:
    """The driver's running k best-ranked rows of each (draw, class), fed batch by batch (best_ranked's);
    memory: draws x classes x k rows, whatever the size of the training split."""

    k: int
    held: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # keys, x

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for draw, label in set(zip(batch["draw"].tolist(), batch["y"].tolist(), strict=True)):
            mine = (batch["draw"] == draw) & (batch["y"] == label)
            keys, x = batch["key"][mine], batch["x"][mine]
            if (draw, label) in self.held:
                old_keys, old_x = self.held[(draw, label)]
                keys, x = np.concatenate([old_keys, keys]), np.concatenate([old_x, x])
            order = np.argsort(keys, kind="stable")[: self.k]
            self.held[(draw, label)] = (keys[order], x[order])

    def subset(self, draw: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw `draw`'s k-shot training rows: (x, y), classes in order."""
        labels = sorted(label for d, label in self.held if d == draw)
        xs = [self.held[(draw, label)][1][:k] for label in labels]
        ys = [np.full(len(x), label, np.int64) for label, x in zip(labels, xs, strict=True)]
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def score(
    x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray], classes: list[str], config: TrainConfig,
    info: ModelInfo,
) -> dict[str, Any]:  # fmt: skip
    """One point of one draw: the probe fitted on (x, y) with scikit-learn (train's --backend sklearn: the
    same solver, standardisation and default l2 = 1/n; --l2 auto: inner_l2), scored on the validation rows."""
    sweep: list[dict[str, float]] = []
    if isinstance(config.l2, float):
        l2 = config.l2
    elif config.l2 == L2_AUTO:
        l2, sweep = inner_l2(x, y, classes, config, info)
    else:
        l2 = 1.0 / len(y)
    model = fit_sklearn(x, y, classes, config, l2, info)
    predicted, _ = model.predict(val[0])
    metrics = report(confusion(val[1], predicted, len(classes)), classes)
    scored = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "l2": l2, "labels": len(y)}
    return {**scored, **({"l2_sweep": sweep} if sweep else {})}


def inner_l2(
    x: np.ndarray, y: np.ndarray, classes: list[str], config: TrainConfig, info: ModelInfo
) -> tuple[float, list[dict[str, float]]]:
    """--l2 auto at one point, never looking at the validation rows that score it: each factor / n of
    L2_FACTORS scored by stratified cross-validation within the point's rows (as many folds as the
    smallest class allows, at most INNER_FOLDS; seeded by --seed). The logistic probe keeps the lowest
    out-of-fold log loss (accuracy ties on a few rows too often to choose), the SVM the highest accuracy;
    ties go to the factor nearest the default (1). With fewer than MIN_ROWS rows of some class: the
    default 1/n, and no sweep."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=len(classes))
    if counts[counts > 0].min() < MIN_ROWS:
        return 1.0 / len(y), []
    k = int(min(INNER_FOLDS, counts[counts > 0].min()))
    splits = list(StratifiedKFold(k, shuffle=True, random_state=config.seed).split(x, y))
    sweep = []
    for factor in L2_FACTORS:
        right, loss = 0, 0.0
        for inside, held in splits:
            model = fit_sklearn(x[inside], y[inside], classes, config, factor / len(inside), info)
            logits = model.logits(x[held])
            right += int((logits.argmax(axis=1) == y[held]).sum())
            loss += log_loss(y[held], probabilities(logits.astype(np.float64))) * len(held)
        trial = {"l2": factor / len(y), "accuracy": right / len(y)}
        sweep.append(trial if info.svm else {**trial, "log_loss": loss / len(y)})
    return min(sweep, key=lambda t: (_inner_score(t), abs(np.log10(t["l2"] * len(y)))))["l2"], sweep


def _inner_score(trial: dict[str, float]) -> float:
    """Lower is better: the out-of-fold log loss, or (SVM) the error rate."""
    return trial["log_loss"] if "log_loss" in trial else 1.0 - trial["accuracy"]


def point(shots: int | str, per_class: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One point of the curve from its draws' results: the mean and spread over draws."""
    accuracy = np.array([r["accuracy"] for r in results])
    f1 = np.array([r["macro_f1"] for r in results])
    return {
        "shots": shots,
        "labels_per_class": per_class,  # the mean over classes (a class with fewer rows gives all it has)
        "labels": int(np.mean([r["labels"] for r in results])),
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std()),
        "macro_f1": float(f1.mean()),
        "macro_f1_std": float(f1.std()),
        "draws": results,
    }


def answer(points: list[dict[str, Any]], share: float = SHARE) -> dict[str, Any]:
    """The fewest labels per class whose mean accuracy reaches `share` of the full-data point's."""
    full = points[-1]["accuracy"]
    reached = next(p for p in points if p["accuracy"] >= share * full)
    return {"share": share, "full_accuracy": full, "shots": reached["shots"], "labels": reached["labels"]}


def sentence(found: dict[str, Any]) -> str:
    """The printed answer."""
    lead = f"{found['share']:.2f} of the full-data accuracy ({found['full_accuracy']:.3f})"
    if found["shots"] == FULL:
        return f"{lead} only with every label ({found['labels']:,})."
    return f"{lead} at k = {found['shots']} labels per class ({found['labels']:,} labels)."
