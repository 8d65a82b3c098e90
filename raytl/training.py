"""What raytl's two Ray Train programs (`train`: a linear head on embeddings; `finetune`: the network on
images) share: workers and their collective backend, ordered ingest, checkpoints saved, reported and
loaded, and the budget for caching a split in the object store."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from raytl import logs, storage
from raytl.config import ConfigError, Device
from raytl.tracking import UNTRACKED, Tracker

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


def json_bytes(data: dict) -> bytes:
    """metrics.json and friends: indented, numpy scalars as floats."""
    return json.dumps(data, indent=2, default=float).encode()


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

    def add(self, epoch: int, train: tuple[float, float], val: tuple[float, float], **extra: Any) -> dict:
        """Record an epoch's (loss, accuracy) on both splits and anything else; returns the record."""
        import ray.train

        record = {
            "epoch": epoch,
            "train_loss": train[0],
            "train_accuracy": train[1],
            "val_loss": val[0],
            "val_accuracy": val[1],
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


# --- MODEL_DIR: a new run, the unfinished one resumed, or a finished model kept -------------------------

# The options that do not change what a run trains: how hard to try, and where it is tracked.
_NOT_RUN_OPTIONS = ("overwrite", "max_failures", "mlflow_uri", "mlflow_experiment", "mlflow_run_name")


def run_options(config: Any) -> dict[str, Any]:
    """What a run in MODEL_DIR is recorded by: its config, less the options that change nothing trained."""
    options = json.loads(config.to_json())
    for name in _NOT_RUN_OPTIONS:
        options.pop(name, None)
    return options


def prepare_model_dir(
    model_dir: str, options: dict[str, Any], run_file: str, written: tuple[str, ...], overwrite: bool,
    what: str, option_name: Any = str, recorded_defaults: dict[str, Any] | None = None, record: bool = True,
) -> bool:  # fmt: skip
    """Start a run in MODEL_DIR (its options written to `run_file`), or resume the unfinished one with the
    same options (True): an interrupted run (Ctrl-C, a lost driver) continues from its last checkpoint, which
    Ray Train restores from MODEL_DIR/train. A finished model or another run's files are never replaced
    without --overwrite, which removes exactly the files a run writes (`written`, run_file and train/).
    record=False leaves the recording to `record_run`, once the inputs are checked (a run refused for its
    data leaves nothing behind)."""
    fs, root = storage.filesystem(model_dir)
    root = root.rstrip("/")
    where = f"MODEL_DIR {storage.redact(model_dir)}"
    uri = storage.join(model_dir, run_file)
    with storage.guarded(f"prepare {where}"):
        held = fs.exists(root) and bool(fs.ls(root))
        if held and overwrite:
            for name in (*written, run_file, "train"):
                if fs.exists(f"{root}/{name}"):
                    fs.rm(f"{root}/{name}", recursive=True)
        elif held:
            if fs.exists(f"{root}/model.json"):
                raise storage.StorageError(
                    f"{where} already holds a finished model; pass --overwrite to train a new one there or "
                    "choose another MODEL_DIR."
                )
            if not fs.exists(f"{root}/{run_file}"):
                raise storage.StorageError(
                    f"{where} is not empty and holds no raytl {what} run; choose another MODEL_DIR or pass "
                    "--overwrite."
                )
            stored = {**(recorded_defaults or {}), **json.loads(storage.read_bytes(uri))}
            changed = [k for k in options if stored.get(k) != options[k]]
            if changed:
                name = changed[0]
                raise ConfigError(
                    f"{where} holds an unfinished run with other options ({option_name(name)} was "
                    f"{stored.get(name)!r}, now {options[name]!r}); rerun with the same options to resume "
                    "it, or pass --overwrite to start over."
                )
            return True
        if record:
            record_run(model_dir, run_file, options)
    return False


def record_run(model_dir: str, run_file: str, options: dict[str, Any]) -> None:
    """Write the run's options to MODEL_DIR/run_file: from here on, the same command resumes it."""
    storage.write_bytes(storage.join(model_dir, run_file), json.dumps(options, indent=2).encode())
