"""The linear probe on Ray, for `raytl train` and `raytl curve`: the labels pass and the split, the rows
for training (x, y), the fit (scikit-learn on the driver, or Ray Train data-parallel: multinomial logistic
regression or a one-vs-rest linear SVM, the squared hinge of scikit-learn's LinearSVC) and the evaluation."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from raytl.cluster import training
from raytl.config import Backend, ProbeHead, TrainConfig
from raytl.errors import DatasetError
from raytl.files import storage
from raytl.files.embeddings import Embeddings, matrix
from raytl.modeling import probe, split
from raytl.modeling.classifier import LinearHead, Model
from raytl.modeling.metrics import report as classification_report
from raytl.modeling.model_dir import PROBE_CHECKPOINT, ModelInfo
from raytl.reporting import report, tracking

log = logging.getLogger(__name__)


# A worker keeps its shard of the splits in memory (CPU or GPU) after the first epoch up to this size.
_WORKER_CACHE_BYTES = 2 * 1024**3
# Workers report metrics and write a checkpoint at most this often (and after the last epoch).
_REPORT_SECONDS = 30.0


@dataclass(frozen=True)
class Plan:
    """What the first pass over the labels decided: classes, the split, and per-split counts."""

    classes: list[str]
    limits: dict[str, int] | None  # validation bins per class; None with a separate --val dataset
    train_counts: dict[str, int]
    val_counts: dict[str, int]


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker gets: the options, and what the driver learnt of the data."""

    config: TrainConfig
    mean: np.ndarray  # per embedding dimension, over the training split
    std: np.ndarray
    classes: int
    weights: list[float]  # per class (--class-weight)
    l2: float  # the penalty the head's loss adds (--c)
    in_memory: bool  # each worker keeps its shard in memory after the first epoch (it is small enough)
    logs: training.WorkerLogs

    @property
    def svm(self) -> bool:
        return self.config.head == ProbeHead.SVM


def default_l2(config: TrainConfig, plan: Plan) -> float:
    """--l2, or 1/n_train: scikit-learn's default C=1 (--l2 auto is resolved before: sweep.choose_l2)."""
    if isinstance(config.l2, float):
        return config.l2
    assert config.l2 is None, "--l2 auto is chosen before the fit"
    return 1.0 / sum(plan.train_counts.values())


def fit(
    config: TrainConfig, plan: Plan, train_rows: ray.data.Dataset, val_rows: ray.data.Dataset, dim: int,
    info: ModelInfo, tracker: tracking.Tracker = tracking.UNTRACKED,
) -> tuple[Model, list[dict]]:  # fmt: skip
    """The probe on the training rows, by --backend; and the history of its epochs (none for sklearn)."""
    l2 = default_l2(config, plan)
    if config.backend == Backend.SKLEARN:
        x, y = gather(train_rows)
        return probe.fit_sklearn(x, y, plan.classes, config, l2, info), []
    mean, std = moments(train_rows, dim)
    head, history = fit_ray(train_rows, val_rows, plan, config, mean, std, l2, tracker)
    return Model.from_head(head, plan.classes, info), history


# --- pass 1: labels and the split ------------------------------------------------------------------


def label_histograms(batch: pa.Table, seed: int) -> pa.Table:
    """Rows per (label, hash bin) of one batch, pickled into a one-row table."""
    labels = batch["label"].to_pylist()
    row_bins = split.bins(batch["path"].to_pylist(), seed)
    missing = sum(1 for label in labels if label is None or label == "")
    hists: dict[str, np.ndarray] = {}
    for label in set(labels) - {None, ""}:
        mask = np.fromiter((lab == label for lab in labels), bool, len(labels))
        hists[label] = np.bincount(row_bins[mask], minlength=split.BINS)
    return pa.table({"stats": [pickle.dumps((hists, missing))]})


def count_labels(data: Embeddings, seed: int, what: str, labelled_only: bool) -> dict[str, np.ndarray]:
    """One distributed pass over the path and label columns only; refuses rows without a label unless
    `labelled_only` (which skips them)."""
    ds = data.read().select_columns(["path", "label"])
    total: dict[str, np.ndarray] = {}
    missing = 0
    for batch in ds.map_batches(
        label_histograms, fn_kwargs={"seed": seed}, batch_format="pyarrow"
    ).iter_batches(batch_size=None, batch_format="pyarrow"):
        for blob in batch["stats"].to_pylist():
            hists, none = pickle.loads(blob)
            missing += none
            for label, hist in hists.items():
                total[label] = total.get(label, 0) + hist
    if missing and not labelled_only:
        raise DatasetError(f"{what} {storage.redact(data.uri)} has {missing} rows without a label.")
    return total


def plan_split(
    config: TrainConfig, train: Embeddings, val: Embeddings | None, labelled_only: bool = False
) -> Plan:
    """Classes, and which rows validate: a separate --val dataset or a stratified --val-fraction. Rows
    without a label are refused, or with `labelled_only` left out (to_xy drops them)."""
    hists = count_labels(train, config.seed, "EMBEDDINGS", labelled_only)
    classes = sorted(hists)
    split.check_classes(f"EMBEDDINGS {storage.redact(train.uri)}", classes)
    if val is not None:
        val_hists = count_labels(val, config.seed, "--val", labelled_only)
        split.check_val_labels("EMBEDDINGS", val_hists, classes)
        train_counts = {c: int(h.sum()) for c, h in hists.items()}
        val_counts = {c: int(val_hists.get(c, np.zeros(1)).sum()) for c in classes}
        limits = None
    else:
        limits = split.thresholds(hists, config.val_fraction)
        val_counts = {c: int(hists[c][: limits[c]].sum()) for c in classes}
        train_counts = {c: int(hists[c].sum()) - val_counts[c] for c in classes}
    split.check_sides(classes, train_counts, val_counts, "rows")
    return Plan(classes, limits, train_counts, val_counts)


# --- rows for training: x (N, D) float32, y int64 -----------------------------------------------------


def to_xy(batch: pa.Table, classes: list[str], dim: int, seed: int | None, limits: Any, side: str) -> dict:
    """Embeddings, class indices and paths (for the report's sample) of the rows on `side` (train | val |
    all) of the split."""
    labels = batch["label"].to_pylist()
    keep = np.fromiter((label is not None and label != "" for label in labels), bool, len(labels))
    if side != "all":
        assert seed is not None and limits is not None, "a split side needs the seed and the limits"
        val = split.in_validation(labels, split.bins(batch["path"].to_pylist(), seed), limits)
        keep &= val if side == "val" else ~val
    index = {c: i for i, c in enumerate(classes)}
    x = matrix(batch["embedding"], dim)[keep]
    y = np.array([index[label] for label, k in zip(labels, keep, strict=True) if k], dtype=np.int64)
    return {"x": x, "y": y, "path": np.array(batch["path"].to_pylist(), dtype=object)[keep]}


def xy(data: Embeddings, plan: Plan, seed: int | None, side: str) -> ray.data.Dataset:
    return data.read().map_batches(
        to_xy,  # type: ignore[arg-type]
        fn_kwargs={
            "classes": plan.classes,
            "dim": data.dim,
            "seed": seed,
            "limits": plan.limits,
            "side": side,
        },
        batch_format="pyarrow",
    )


def split_rows(
    plan: Plan, seed: int, train: Embeddings, val: Embeddings | None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """The training and validation rows (x, y, path) of the split `plan` made; held in memory if small."""
    train_rows = xy(train, plan, seed, side="all" if val else "train")
    val_rows = xy(val, plan, None, side="all") if val else xy(train, plan, seed, side="val")
    return cache_if_small(train_rows, val_rows, train, val)


def cache_if_small(
    train_rows: ray.data.Dataset, val_rows: ray.data.Dataset, train: Embeddings, val: Embeddings | None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Hold both splits in the object store when they fit easily: every epoch then skips re-reading and
    re-splitting the Parquet. Larger datasets stream from storage each epoch."""
    rows = train.rows + (val.rows if val else 0)
    budget = training.cache_budget()
    if rows * (train.dim * 4 + 80) > budget:  # x, y and the path
        return train_rows, val_rows
    return train_rows.materialize(), val_rows.materialize()


def batch_moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = batch["x"].astype(np.float64)
    return {"n": np.array([len(x)]), "sum": x.sum(0, keepdims=True), "sumsq": (x * x).sum(0, keepdims=True)}


def moments(rows: ray.data.Dataset, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and standard deviation of the training rows, in one distributed pass."""
    n, total, squares = 0, np.zeros(dim), np.zeros(dim)
    for part in rows.map_batches(batch_moments, batch_format="numpy").iter_batches(
        batch_size=None, batch_format="numpy"
    ):
        n += int(part["n"].sum())
        total += part["sum"].sum(0)
        squares += part["sumsq"].sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


# --- fitting ------------------------------------------------------------------------------------------


def fit_ray(
    train_rows: ray.data.Dataset,
    val_rows: ray.data.Dataset,
    plan: Plan,
    config: TrainConfig,
    mean: np.ndarray,
    std: np.ndarray,
    l2: float,
    tracker: tracking.Tracker = tracking.UNTRACKED,
) -> tuple[LinearHead, list[dict]]:
    """Data-parallel training with Ray Train; returns the best epoch's head (loop.Selection), the history."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = storage.pyarrow_filesystem(config.model_dir)
    n_rows, dim = sum(plan.train_counts.values()) + sum(plan.val_counts.values()), len(mean)
    use_gpu = training.uses_gpu(config.device)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "plan": WorkerPlan(
                config,
                mean,
                std,
                len(plan.classes),
                probe.class_weights(plan.train_counts, plan.classes, config.class_weight),
                l2,
                in_memory=n_rows * (dim * 4 + 8) / training.fewest(config.workers) <= _WORKER_CACHE_BYTES,
                logs=training.WorkerLogs.of_driver(tracker),
            )
        },
        scaling_config=training.scaling(config.workers, use_gpu),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2 (the default); mypy resolves V1
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
            # Ray Train's per-report INFO lines drown the output unless raytl itself logs at INFO.
            logging_config=LoggingConfig(log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING"),
        ),
        # The workers take x and y; paths stay for the evaluation's sample.
        datasets={"train": train_rows.select_columns(["x", "y"]), "val": val_rows.select_columns(["x", "y"])},
        dataset_config=training.in_order(),
        torch_config=TorchConfig(backend=training.collective_backend(use_gpu)),
    )
    result = training.fit(trainer)
    assert result.checkpoint is not None, "the last epoch always reports a checkpoint"
    state = training.load(result.checkpoint, PROBE_CHECKPOINT)
    head = LinearHead(torch.from_numpy(mean), torch.from_numpy(std), len(plan.classes))
    head.load_state_dict(state["selection"]["weights"] or state["trainable"])  # the best epoch's
    return head, state["history"]


def train_loop(loop_config: dict[str, WorkerPlan]) -> None:
    """One Ray Train worker: the head and its optimiser, stepped by the training core (training.run_epochs):
    stream its shard, step, validate, report, checkpoint, stop early."""
    import ray.train.torch

    plan = loop_config["plan"]
    config = plan.config
    plan.logs.apply()
    torch.manual_seed(config.seed)
    device = training.worker_device()
    head = LinearHead(torch.tensor(plan.mean), torch.tensor(plan.std), plan.classes)
    model = ray.train.torch.prepare_model(head, move_to_device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    weights = torch.tensor(plan.weights, dtype=torch.float32, device=device)
    objective = probe.ProbeObjective(model, head, weights, plan.svm, plan.l2)
    shards = {name: Shard(name, plan, device) for name in ("train", "val")}
    training.run_epochs(
        training.Worker(
            command="train",
            epochs=config.epochs,
            checkpoint_file=PROBE_CHECKPOINT,
            model=model,
            objective=objective,
            optimizer=optimizer,
            schedule=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs),
            batches=lambda split, epoch: shards[split].batches(epoch),
            trainable=head.state_dict,
            load_trainable=head.load_state_dict,
            device=device,
            logs=plan.logs,
            by_accuracy=plan.svm,
            penalty=objective.penalty,
            patience=config.patience,
            report_seconds=_REPORT_SECONDS,
            keep_best=True,  # a head is small; its best epoch may fall between two reports
        )
    )


class Shard:
    """This worker's share of a split: streamed by Ray Data; kept in memory after the first pass when it
    fits (plan.in_memory), so that later epochs cost no pipeline start-up."""

    def __init__(self, name: str, plan: WorkerPlan, device: torch.device) -> None:
        self.name, self.plan, self.device = name, plan, device
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def batches(self, shuffle_seed: int | None) -> Any:
        """(x, y) batches; shuffled (seeded per epoch) when shuffle_seed is given."""
        size, seed = self.plan.config.batch_size, self.plan.config.seed
        if self.cached is not None:
            x, y = self.cached
            order = torch.arange(len(y), device=self.device)
            if shuffle_seed is not None:
                generator = torch.Generator().manual_seed(seed * 100_003 + shuffle_seed)
                order = torch.randperm(len(y), generator=generator).to(self.device)
            for start in range(0, len(y), size):
                index = order[start : start + size]
                yield x[index], y[index]
            return
        import ray.train

        keep: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in ray.train.get_dataset_shard(self.name).iter_torch_batches(
            batch_size=size,
            dtypes={"x": torch.float32, "y": torch.int64},
            device=self.device,
            local_shuffle_buffer_size=4 * size if shuffle_seed is not None else None,
            local_shuffle_seed=seed if shuffle_seed is not None else None,
        ):
            if self.plan.in_memory:
                keep.append((batch["x"], batch["y"]))
            yield batch["x"], batch["y"]
        if self.plan.in_memory:
            self.cached = (torch.cat([x for x, _ in keep]), torch.cat([y for _, y in keep]))


def gather(rows: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All rows on the driver (the sklearn backend only)."""
    xs, ys = [], []
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


# --- evaluation -------------------------------------------------------------------------------------------


def batch_confusion(batch: dict[str, np.ndarray], model: Model) -> dict[str, np.ndarray]:
    """The batch's confusion matrix (flattened) and its rows for the report's sample (pickled)."""
    from raytl.modeling.metrics import confusion

    predicted, score = model.predict(batch["x"])
    names = [model.classes[i] for i in predicted]
    truth = [model.classes[i] for i in batch["y"]]
    sample = report.batch_sample(batch["path"], truth, names, score, batch["x"])
    return {
        "matrix": confusion(batch["y"], predicted, len(model.classes)).reshape(1, -1),
        "sample": np.array([sample], dtype=object),
    }


def validation_metrics(model: Model, rows: ray.data.Dataset) -> tuple[dict[str, Any], pa.Table]:
    """Metrics of `model` on the rows, summed from per-batch confusion matrices, and a sample of the rows
    (misclassified ones first) for the report."""
    k = len(model.classes)
    total = np.zeros((k, k), dtype=np.int64)
    sampler = report.Sampler()
    matrices = rows.map_batches(
        batch_confusion,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"model": model},
        batch_format="numpy",
    )
    for part in matrices.iter_batches(batch_size=None, batch_format="numpy"):
        total += part["matrix"].sum(0).reshape(k, k)
        sampler.add(part["sample"])
    return classification_report(total, model.classes), sampler.table()
