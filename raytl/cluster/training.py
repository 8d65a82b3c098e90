"""The Ray Train side of raytl's two training programs (`train`: a linear head on embeddings; `finetune`:
the network on images): the worker's loop both run (`run_epochs`: resume, the epochs of modeling.loop, the
best epoch, reports), workers and their collective backend, ordered ingest, checkpoints saved, reported
and loaded, and the budget for caching a split in the object store."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from raytl.config import Device
from raytl.modeling import loop
from raytl.reporting import logs
from raytl.reporting.tracking import UNTRACKED, Tracker

log = logging.getLogger(__name__)

# A split up to this share of the cluster's object store is cached there for the epochs.
CACHE_FRACTION = 0.25


def cache_budget() -> float:
    """Bytes of the object store a split may be cached in."""
    return ray.cluster_resources().get("object_store_memory", 0) * CACHE_FRACTION


def report(metrics: dict, state: dict, name: str) -> None:
    """Every worker reports; rank 0 attaches the checkpoint, `state` saved as `name` (every rank holds the
    same weights)."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, name))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def load(checkpoint: Any, name: str) -> dict:
    """The state a `report` saved in checkpoint as `name`, its tensors on the CPU: GPU workers save CUDA
    tensors (the head, the optimizer's moments), and the driver that reads the best epoch back often has
    no GPU (a KubeRay head, a CPU node); load_state_dict puts them on a worker's device."""
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)


def uses_gpu(device: Device) -> bool:
    """--device: cuda asks for GPU workers even when no GPU is up (an autoscaler adds GPU nodes)."""
    return device == Device.CUDA or (device == Device.AUTO and ray.cluster_resources().get("GPU", 0) >= 1)


def collective_backend(use_gpu: bool) -> str:
    """NCCL where a GPU node's CUDA works (asked on a GPU node, not on the driver); gloo otherwise."""
    if not use_gpu:
        return "gloo"
    return "nccl" if ray.get(_cuda_works.options(num_gpus=1).remote()) else "gloo"


@ray.remote(num_cpus=0)
def _cuda_works() -> bool:
    return torch.cuda.is_available()


def in_order() -> Any:
    """Ray Train's ingest with Ray Data's preserve_order: each worker gets the same rows, in the same order,
    on every run (the split otherwise follows which blocks finish first), so that --seed fixes the head."""
    from ray.data import DataContext
    from ray.train import DataConfig

    options = copy.deepcopy(DataContext.get_current().execution_options)  # the defaults Train would take
    options.preserve_order = True
    return DataConfig(execution_options=options)


def fewest(workers: int | tuple[int, int]) -> int:
    """The fewest Ray Train workers --workers allows: N, or MIN of MIN-MAX."""
    return workers[0] if isinstance(workers, tuple) else workers


def most(workers: int | tuple[int, int]) -> int:
    """The most Ray Train workers --workers allows: N, or MAX of MIN-MAX."""
    return workers[1] if isinstance(workers, tuple) else workers


def scaling(workers: int | tuple[int, int], use_gpu: bool, cpus: float = 0.25) -> Any:
    """Ray Train workers: one GPU (and a CPU to feed it) each on GPU clusters, `cpus` each otherwise.
    MIN-MAX is Ray Train's elastic training: it starts with as many as it can place (at least MIN), and
    restarts the group from the last checkpoint, larger or smaller, as nodes join or leave."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=workers,  # type: ignore[arg-type]  # Train V2 (the default) takes (MIN, MAX); mypy sees V1
        use_gpu=use_gpu,
        # A linear head needs little CPU; the Ray Data tasks that feed it need the rest. A worker
        # holding a whole CPU on a small node starves them and training never gets a batch.
        resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": cpus},
    )


@dataclass(frozen=True)
class WorkerLogs:
    """The driver's logging and tracking choices that its Ray Train workers follow."""

    show_epochs: bool  # a line per epoch, written by rank 0
    ray_debug: bool  # Ray Train's own worker output left on
    tracker: Tracker = UNTRACKED  # where rank 0 logs each epoch's metrics (MLflow)

    @classmethod
    def of_driver(cls, tracker: Tracker = UNTRACKED) -> WorkerLogs:
        return cls(logs.show_epochs(), logs.ray_debug(), tracker)

    def apply(self) -> None:
        """Called first in a worker."""
        logs.quiet_train_worker(self.ray_debug)


class History:
    """The epochs' metrics (a list of dicts, kept in checkpoints); rank 0 shows each epoch added as a line
    (when the command shows epochs) and logs it to the run's tracker."""

    def __init__(
        self, command: str, epochs: int, show: WorkerLogs, records: list[dict] | None = None, first: int = 0
    ) -> None:
        self.command, self.epochs, self.show, self.tracker = command, epochs, show.show_epochs, show.tracker
        self.records: list[dict] = records or []
        self.first, self.started = first, time.monotonic()

    def add(self, epoch: int, train: loop.EpochMetrics, val: loop.EpochMetrics, **extra: Any) -> dict:
        """Record an epoch's loss and accuracy on both splits and anything else; returns the record."""
        import ray.train

        record = {
            "epoch": epoch,
            "train_loss": train.loss,
            "train_accuracy": train.accuracy,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            **extra,
        }
        self.records.append(record)
        if ray.train.get_context().get_world_rank() == 0:
            if self.show:
                logs.show_epoch(logs.epoch_line(self.command, record, self.epochs, self.started, self.first))
            self.tracker.log_epoch(record)
        return record


def fit(trainer: Any) -> Any:
    """trainer.fit(), with raytl's Ctrl-C. Ray Train's own SIGINT handler aborts the run and lets fit return
    as if it had ended (a result without its last checkpoint: exit 1, a MODEL_DIR the rerun refused). Here
    the first Ctrl-C aborts the run the same way (every checkpoint is written whole) and raises
    KeyboardInterrupt: `raytl: interrupted`, exit 130, and the same command resumes; a second one raises at
    once."""
    import signal
    import threading

    interrupted: list[int] = []

    def register(controller: Any) -> None:
        def on_sigint(signum: int, frame: Any) -> None:
            if not interrupted:
                interrupted.append(signum)
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # gone already: Ctrl-C reaches the whole process group, Ray's too
                    pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    trainer._register_sigint_handler = register  # Ray Train's hook for its handler (main thread only)
    try:
        result = trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return result


# --- the worker's loop: the skeleton both programs run ----------------------------------------------------


def worker_device(threads: int | None = None) -> torch.device:
    """This Ray Train worker's device: its GPU, or the CPU (`threads` torch threads) where it holds none or
    its CUDA does not work (collective_backend then chose gloo)."""
    import ray.train.torch

    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)  # Ray's OMP_NUM_THREADS follows the (fractional) CPU request
    return device


@dataclass
class Worker:
    """What a program built on one worker for `run_epochs`: its model, how to step and evaluate it, and how
    often to report."""

    command: str  # "train" | "finetune": the epoch lines' and the tracker's name
    epochs: int
    checkpoint_file: str  # the state's name inside each checkpoint
    model: Any  # what batches go through (prepared by Ray Train: DDP-wrapped, on the device)
    objective: loop.Objective
    optimizer: torch.optim.Optimizer
    schedule: Any  # a torch LR scheduler
    batches: Callable[[str, int | None], Iterable[Any]]  # (split, epoch) -> this worker's batches
    trainable: Callable[[], dict[str, torch.Tensor]]  # what a checkpoint keeps of the model
    load_trainable: Callable[[dict[str, torch.Tensor]], None]
    device: torch.device
    logs: WorkerLogs
    by_accuracy: bool  # the best epoch: by validation accuracy (ties: loss), else by loss
    scaler: Any = None  # a torch.amp.GradScaler (fp16)
    step_schedule: bool = False  # the schedule steps after every batch (else after every epoch)
    penalty: Callable[[], torch.Tensor] | None = None  # added to the training loss (the probe's L2)
    patience: int | None = None  # stop after this many epochs without a better one
    report_seconds: float = 0.0  # report (a barrier and a checkpoint) at most this often; 0: every epoch
    keep_best: bool = False  # the best epoch's trainable tensors travel in the checkpoint (a small model)
    counts_failed: bool = False  # each epoch's record counts the training images that failed to decode
    extra: Callable[[], dict[str, Any]] = dict  # more of each epoch's record


def run_epochs(worker: Worker) -> None:
    """One Ray Train worker's training: resume from the last checkpoint (a restarted worker group, or the
    same command run again), then train and evaluate an epoch at a time, keeping the best epoch, reporting
    metrics and a checkpoint (every epoch, or every report_seconds as all workers agree, and at the end)."""
    w = worker
    run = _resume(w)
    last_report = time.monotonic()
    for epoch in range(run.start, w.epochs):
        train = loop.train_one_epoch(
            w.model, w.objective, w.optimizer, w.batches("train", epoch), w.device, w.scaler,
            w.schedule if w.step_schedule else None, w.penalty,
        )  # fmt: skip
        val = loop.evaluate(w.model, w.objective, w.batches("val", None), w.device)
        lr = w.schedule.get_last_lr()[0]  # this epoch's (its last step's)
        if not w.step_schedule:
            w.schedule.step()
        failed = {"failed_images": train.failed} if w.counts_failed else {}
        record = run.history.add(epoch, train, val, **failed, lr=lr, **w.extra())
        if run.selection.offer(record, w.trainable if w.keep_best else None):
            record["selected"] = True
        done = epoch == w.epochs - 1 or (w.patience is not None and run.selection.stale >= w.patience)
        # Reporting is a barrier and writes a checkpoint: every report_seconds as agreed by all workers (so
        # that each reports equally often) and at the end, not after every short epoch.
        due = not w.report_seconds or loop.all_agree(
            time.monotonic() - last_report >= w.report_seconds, w.device
        )
        if done or due:
            run.state = _state(w, run, epoch)
            report(_scored(record, run.selection), run.state, w.checkpoint_file)
            last_report = time.monotonic()
        if done:
            return
    if run.state and run.history.records:  # resumed after the last epoch: hand the driver its result again
        report(_scored(run.history.records[-1], run.selection), run.state, w.checkpoint_file)


@dataclass
class _Run:
    """A worker's bookkeeping across epochs (and, through checkpoints, across restarts)."""

    history: History
    selection: loop.Selection
    start: int = 0  # the first epoch this worker group trains
    resumed: list[int] = field(default_factory=list)  # the epochs the run was resumed at
    state: dict[str, Any] = field(default_factory=dict)  # the last checkpoint's


def _resume(w: Worker) -> _Run:
    """A new run, or the last checkpoint's state restored into the worker's model, optimiser and schedule."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return _Run(History(w.command, w.epochs, w.logs), loop.Selection(w.by_accuracy))
    state = _upgraded(load(checkpoint, w.checkpoint_file))
    w.load_trainable(state["trainable"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.schedule.load_state_dict(state["schedule"])
    if w.scaler is not None and state.get("scaler"):
        w.scaler.load_state_dict(state["scaler"])
    start = state["epoch"] + 1
    return _Run(
        History(w.command, w.epochs, w.logs, state["history"], start),
        loop.Selection.restore(w.by_accuracy, state.get("selection")),
        start, [*state.get("resumed", []), start], state,
    )  # fmt: skip


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an unfinished probe run from before the shared loop (its head, best_head, best and
    stale) in today's shape, so that the same command still resumes it."""
    if "trainable" in state or "head" not in state:
        return state
    kept = [r["epoch"] for r in state["history"] if r.get("selected")]
    selection = {"best": state["best"], "epoch": kept[-1] if kept else -1, "stale": state["stale"],
                 "weights": state["best_head"]}  # fmt: skip
    return {**state, "trainable": state["head"], "scaler": None, "selection": selection, "resumed": []}


def _state(w: Worker, run: _Run, epoch: int) -> dict[str, Any]:
    """What a checkpoint holds: enough to continue after `epoch` exactly as if never stopped."""
    return {
        "trainable": w.trainable(),
        "optimizer": w.optimizer.state_dict(),
        "schedule": w.schedule.state_dict(),
        "scaler": w.scaler.state_dict() if w.scaler is not None else None,
        "selection": run.selection.state(),
        "history": run.history.records,
        "epoch": epoch,
        "resumed": run.resumed,
    }


# The metric Ray Train keeps the best checkpoint by (CheckpointConfig.checkpoint_score_attribute, "max"):
# the epoch where it is the best one so far, else -1, so that the latest best epoch wins and ties cannot be.
KEPT_SCORE = "kept_epoch"


def _scored(record: dict[str, Any], selection: loop.Selection) -> dict[str, Any]:
    return {**record, KEPT_SCORE: record["epoch"] if selection.epoch == record["epoch"] else -1}


def best_state(result: Any, name: str) -> tuple[dict, dict]:
    """The checkpoint states of the best epoch (Selection's rule: the checkpoint scored by KEPT_SCORE) and
    of the latest. Ray's list can name a checkpoint that a run interrupted mid-cleanup already deleted: the
    best one still in storage wins."""
    assert result.checkpoint is not None, "the last epoch always reports a checkpoint"
    latest = load(result.checkpoint, name)
    candidates = sorted(
        result.best_checkpoints or [], key=lambda pair: pair[1].get(KEPT_SCORE, -1), reverse=True
    )
    for checkpoint, metrics in candidates:
        if metrics.get(KEPT_SCORE, -1) < 0:
            break
        try:
            return load(checkpoint, name), latest
        except FileNotFoundError:
            log.warning("checkpoint of epoch %d is gone from storage; trying the next best", metrics["epoch"])
    return latest, latest
