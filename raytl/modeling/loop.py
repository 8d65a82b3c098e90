"""The training core both of raytl's Ray Train programs step with, Ray-free (a unit test runs it on plain
batches): `train_one_epoch` and `evaluate` over an `Objective` (the probe's, the network's), the sums they
all-reduce across workers, and the rule that keeps the best epoch (`Selection`).

A row has a loss, a weight in the epoch's loss (its class weight; 0 for an image that did not decode, so
every worker still steps in lockstep) and counts toward accuracy unless it failed to decode."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class RowLosses:
    """One batch through the model: per-row losses and what the epoch's metrics sum from them."""

    loss: torch.Tensor  # (N,), unweighted
    logits: torch.Tensor  # (N, classes)
    y: torch.Tensor  # (N,) class indices
    weight: torch.Tensor  # (N,) each row's weight in the loss
    counted: torch.Tensor  # (N,) bool: the row counts toward accuracy (False: its image failed to decode)

    def sums(self) -> torch.Tensor:
        """float64 [weighted loss, weight, correct, counted, failed] of the batch."""
        correct = (self.logits.argmax(1) == self.y) & self.counted
        return torch.stack(
            [
                (self.loss * self.weight).sum().double(),
                self.weight.sum().double(),
                correct.sum().double(),
                self.counted.sum().double(),
                (~self.counted).sum().double(),
            ]
        )


class Objective(Protocol):
    """What a model's program gives the core: a batch's row losses (`training`: with the training-only
    terms, e.g. label smoothing)."""

    def losses(self, batch: Any, training: bool) -> RowLosses: ...


@dataclass(frozen=True)
class EpochMetrics:
    """An epoch's loss (weighted mean), accuracy and failed images, over all workers."""

    loss: float
    accuracy: float
    failed: int = 0

    @classmethod
    def of(cls, sums: torch.Tensor) -> EpochMetrics:
        loss, weight, correct, counted, failed = all_reduced(sums).tolist()
        return cls(
            loss / weight if weight > 0 else math.nan, correct / counted if counted else math.nan, int(failed)
        )


def train_one_epoch(
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    step_schedule: Any = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> EpochMetrics:
    """One pass over this worker's batches, a step each: the weighted mean loss (plus `penalty`, e.g. L2),
    scaled by `scaler` (fp16), `step_schedule` stepped after every step."""
    model.train()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in batches:
        rows = objective.losses(batch, training=True)
        loss = (rows.loss * rows.weight).sum() / rows.weight.sum().clamp(min=1e-12)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if step_schedule is not None:
            step_schedule.step()
        with torch.no_grad():
            sums += rows.sums()
    return EpochMetrics.of(sums)


def evaluate(
    model: torch.nn.Module, objective: Objective, batches: Iterable[Any], device: torch.device
) -> EpochMetrics:
    """One pass over this worker's validation batches, no gradients; the metrics over all workers."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            sums += objective.losses(batch, training=False).sums()
    return EpochMetrics.of(sums)


def all_reduced(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`value` summed (or its maximum) over the workers of a torch.distributed group; as it is alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(value, op=reduce_op)
    return value


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every worker when any worker says so."""
    return bool(all_reduced(torch.tensor([float(flag)], device=device), op="max").item())


# --- the best epoch -------------------------------------------------------------------------------------


def selection_key(epoch: dict[str, float], by_accuracy: bool) -> tuple[float, ...]:
    """What makes an epoch the best, as a key where larger is better. By loss (a logistic regression: log
    loss is a proper score of the probabilities it outputs), or by validation accuracy, ties broken by the
    loss: the SVM (its squared hinge on held-out rows keeps growing with the margins even while more rows
    land on the right side; on real embeddings loss 59 -> 1,053 while accuracy rose 0.685 -> 0.809, so the
    loss alone would keep the first epoch's head) and a fine-tuned network."""
    if by_accuracy:
        return (epoch["val_accuracy"], -epoch["val_loss"])
    return (-epoch["val_loss"], 0.0)


def improves(key: tuple[float, ...], best: tuple[float, ...], tolerance: float = 1e-7) -> bool:
    """key beats best by more than float noise (compared in order: accuracy first where it leads)."""
    for value, incumbent in zip(key, best, strict=True):
        if value > incumbent + tolerance:
            return True
        if value < incumbent - tolerance:
            return False
    return False


def selection(by_accuracy: bool) -> str:
    """How the kept epoch was chosen, in words for metrics.json and the report."""
    return "highest validation accuracy (ties: lowest loss)" if by_accuracy else "lowest validation loss"


@dataclass
class Selection:
    """The best epoch so far and how many epochs since it (for --patience); kept in checkpoints."""

    by_accuracy: bool
    best: tuple[float, ...] = (-math.inf, -math.inf)
    epoch: int = -1  # the best epoch; -1 before the first
    stale: int = 0
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # the best epoch's, if kept

    def offer(self, record: dict[str, Any], weights: Callable[[], dict] | None = None) -> bool:
        """Record an epoch's metrics; True (and its `weights()` copied, when given) if it is the best."""
        key = selection_key(record, self.by_accuracy)
        if not improves(key, self.best):
            self.stale += 1
            return False
        self.best, self.epoch, self.stale = key, int(record["epoch"]), 0
        if weights is not None:
            self.weights = copy.deepcopy(weights())
        return True

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch, "stale": self.stale, "weights": self.weights}

    @classmethod
    def restore(cls, by_accuracy: bool, state: dict[str, Any] | None) -> Selection:
        if not state:
            return cls(by_accuracy)
        return cls(by_accuracy, tuple(state["best"]), state["epoch"], state["stale"], state["weights"])
