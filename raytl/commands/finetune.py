"""`raytl finetune`: a backbone (VGG16 or any torchvision classification model) with a new head, trained on
the images themselves with Ray Train (DDP)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

import raytl
from raytl import logs, pipeline, report, shards, split, storage, tracking, training
from raytl import metrics as classification
from raytl.classifier import KERNEL_FILE, METRICS_FILE, MODEL_FILE, MODEL_JSON, Model, classify
from raytl.config import ConfigError, FinetuneConfig, Freeze, Head, Layer, Optimizer, Pool
from raytl.models import (
    VGG16,
    embedding_dim,
    from_state_dict,
    load_weights,
    prefers_channels_last,
    preset,
    resolve_precision,
    resolved,
)
from raytl.output import NOTHING
from raytl.preprocess import TrainTransform, Transform
from raytl.reader import CORPUS_SCHEMA, Corpus, image_schemes, list_corpus
from raytl.tracking import UNTRACKED, Tracker

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"  # the fine-tuned backbone the head needs, as a torchvision state_dict
RUN_FILE = "finetune.json"  # the options of the run in MODEL_DIR: a rerun with the same ones resumes it
# What a run writes in MODEL_DIR besides RUN_FILE and train/: what --overwrite removes.
WRITTEN = (MODEL_FILE, MODEL_JSON, METRICS_FILE, BACKBONE_FILE, KERNEL_FILE, report.REPORT_FILE,
           report.FIGURES_DIR, report.VALIDATION_FILE)  # fmt: skip
STATE_FILE = "state.pt"  # inside each Ray Train checkpoint
# Index in VGG16's `features` where each conv block ends (after its max-pool): --freeze block1..block5.
BLOCK_ENDS = {
    Freeze.BLOCK1.value: 5,
    Freeze.BLOCK2.value: 10,
    Freeze.BLOCK3.value: 17,
    Freeze.BLOCK4.value: 24,
    Freeze.BLOCK5.value: 31,
}


def run(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, write MODEL_DIR (backbone.pt, model.pt, model.json, metrics.json); returns the metrics."""
    if config.model != VGG16:  # the crop and resize sizes of the model's weights, unless given
        config = resolved(config)
    layer = Layer.FC7 if config.head == Head.FC7 else Layer.POOL5
    weights = load_weights(config.weights, layer, config.seed, config.model)  # checked before any Ray work
    train, val, classes = split_corpus(config)  # listing shards takes a Ray pass: it starts Ray
    with storage.guarded(f"prepare MODEL_DIR {config.model_dir}"):
        resuming = prepare_model_dir(config)
    logs.init_ray()
    log.info("finetune config: %s (%s)", config.to_json(), "resuming" if resuming else "new run")
    dim = embedding_dim(layer, Pool.AVG, config.crop, config.model)
    starting = pipeline.embeddings_metadata(backbone_stages(config, layer), weights.id, dim)
    with tracking.run("finetune", config, starting, resume=resuming) as tracker:
        weights_ref = ray.put(weights.state_dict)
        result = fit(config, train, val, classes, weights_ref, tracker)
        best, latest = best_and_latest(result)
        backbone_spec = save_model(config, classes, layer, weights.state_dict, weights.id, best)
        model = Model.load(config.model_dir)
        metrics, sample = evaluate(model, backbone_stages(config, layer), backbone_spec, val)
        report.write_validation(config.model_dir, sample)
        metrics.update(
            head=str(config.head),
            kind="finetune",
            best_epoch=best["epoch"],
            train_samples=_counts(train.table, classes),
            val_samples=_counts(val.table, classes),
            history=latest["history"],
            resumed_at_epochs=latest["resumed"],
        )
        storage.write_bytes(storage.join(config.model_dir, METRICS_FILE), training.json_bytes(metrics))
        report.write_quietly(config.model_dir)
        tracker.finish(config.model_dir, metrics)
    return metrics


# --- inputs: the corpus, its split, MODEL_DIR --------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Labelled images: rows (path, label), and the WebDataset shards that hold them (None: loose files)."""

    table: pa.Table
    shards: pa.Table | None = None

    def where(self, mask: np.ndarray) -> Images:
        return Images(self.table.filter(pa.array(mask)), self.shards)

    def corpus(self) -> Corpus:
        """As extract's reader takes them (shards: read whole, only these samples kept)."""
        if self.shards is None:
            return Corpus(self.table, ignored=0)
        return Corpus(self.shards, 0, shards=True, keep=self.table["path"].combine_chunks())


def split_corpus(config: FinetuneConfig) -> tuple[Images, Images, list[str]]:
    """Training and validation images and the sorted classes; refuses unlabelled images."""
    images = _labelled(config.source, config.manifest, config.label_field, config.allow_schemes)
    corpus = images.table
    _require_labels(corpus, "SOURCE" if config.source else "--manifest")
    classes = sorted(set(corpus["label"].to_pylist()))
    if len(classes) < 2:
        raise ConfigError(f"the images have a single class ({classes[0]!r}); a classifier needs two.")
    if config.val:
        val = _list_val(config.val, config.label_field, config.allow_schemes)
        unknown = sorted(set(val.table["label"].to_pylist()) - set(classes))
        if unknown:
            raise ConfigError(f"--val has labels that SOURCE does not: {', '.join(map(repr, unknown[:5]))}.")
        train = images
    else:
        labels = corpus["label"].to_pylist()
        row_bins = split.bins(corpus["path"].to_pylist(), config.seed)
        hists = {
            c: np.bincount(row_bins[[lab == c for lab in labels]], minlength=split.BINS) for c in classes
        }
        in_val = split.in_validation(labels, row_bins, split.thresholds(hists, config.val_fraction))
        train, val = images.where(~in_val), images.where(in_val)
    empty = [c for c in classes if c not in set(train.table["label"].to_pylist())]
    if empty:
        raise ConfigError(f"class {empty[0]!r} has no training images left after the validation split.")
    if val.table.num_rows == 0:
        raise ConfigError("the validation split is empty: give --val or a larger --val-fraction.")
    workers = training.most(config.workers)
    if train.table.num_rows < workers:
        raise ConfigError(f"--workers {workers} is more than the {train.table.num_rows} training images.")
    return train, val, classes


def _labelled(
    source: str | None, manifest: str | None, label_field: str | None, allow_schemes: tuple[str, ...] = ()
) -> Images:
    """List SOURCE or read the manifest; tar shards are read once by Ray tasks for their samples' labels."""
    corpus = list_corpus(source, manifest, allow_schemes=allow_schemes)
    if not corpus.shards:
        return Images(corpus.table)
    logs.init_ray()
    blocks = [corpus.table.slice(i, 1) for i in range(corpus.table.num_rows)]
    labels = ray.data.from_arrow(blocks).map_batches(
        shards.sample_labels,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"label_field": label_field},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0.5,  # mostly reading
    )
    with pipeline.user_errors():
        tables = ray.get(labels.to_arrow_refs())
    table = (
        pa.concat_tables([t.cast(CORPUS_SCHEMA) for t in tables]) if tables else CORPUS_SCHEMA.empty_table()
    )
    if table.num_rows == 0:
        raise storage.StorageError(f"SOURCE {storage.redact(source or '')} holds no samples with an image.")
    log.info("listed %d samples in %d shards", table.num_rows, corpus.table.num_rows)
    return Images(table, corpus.table)


def _list_val(uri: str, label_field: str | None, allow_schemes: tuple[str, ...] = ()) -> Images:
    is_manifest = uri.lower().endswith((".csv", ".csv.gz", ".tsv", ".parquet", ".pq"))
    try:
        if is_manifest:
            images = _labelled(None, uri, None, allow_schemes)
        else:
            images = _labelled(uri, None, label_field)
    except storage.StorageError as exc:
        raise storage.StorageError(f"--val: {exc}") from None
    _require_labels(images.table, "--val")
    return images


def _require_labels(table: pa.Table, what: str) -> None:
    missing = sum(1 for label in table["label"].to_pylist() if not label)
    if missing:
        raise ConfigError(
            f"{what} has images without a label ({missing} of {table.num_rows}); fine-tuning needs "
            "SOURCE/<label>/<image> folders, a manifest with a `label` column, or shards with labels "
            "(--label-field)."
        )


def prepare_model_dir(config: FinetuneConfig) -> bool:
    """Start a run in MODEL_DIR, or resume the unfinished one with the same options; True when resuming
    (training.prepare_model_dir)."""
    return training.prepare_model_dir(
        config.model_dir, training.run_options(config), RUN_FILE, WRITTEN, config.overwrite, "fine-tuning",
        _option, recorded_defaults={"model": VGG16},  # runs recorded before --model existed are vgg16's
    )  # fmt: skip


def _option(field: str) -> str:
    return field.upper() if field in ("source", "model_dir") else "--" + field.replace("_", "-")


# --- data: listings -> decoded uint8 images and class indices, streamed into the workers -------------------


def labelled(decoded: dict[str, np.ndarray], classes: list[str]) -> dict:
    """Decoded rows (path, label, image, error) -> image uint8 (N, H, W, 3), y int64, ok bool (False: the
    file did not decode; its image is zeros and the loss ignores it, so every worker steps in lockstep)."""
    index = {c: i for i, c in enumerate(classes)}
    for path, error in zip(decoded["path"], decoded["error"], strict=True):
        if error:
            log.warning("skipping %s: %s", storage.redact(str(path)), error)
    return {
        "image": decoded["image"],
        "y": np.array([index[str(label)] for label in decoded["label"]], dtype=np.int64),
        "ok": decoded["error"] == "",
    }


def image_dataset(
    config: FinetuneConfig, images: Images, transform: Transform, classes: list[str]
) -> ray.data.Dataset:
    """Decoding and augmentation as CPU tasks (a batch of files, or a shard, a task); re-executed, with new
    random crops, every epoch."""
    stages = backbone_stages(config, Layer.POOL5)  # its reading settings: batch size, label member
    corpus = images.corpus()
    rows = pipeline.listing(config.decode_batch, corpus, NOTHING)
    return pipeline.decoded(stages, corpus, rows, transform).map_batches(
        labelled,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"classes": classes},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,  # as the decoding task, so that Ray fuses the two
    )


def datasets(
    config: FinetuneConfig, train: Images, val: Images, classes: list[str]
) -> dict[str, ray.data.Dataset]:
    """The train stream (shuffled listing, random block order each epoch, augmented) and the validation
    stream (DESIGN.md's eval transforms; kept in the object store when small)."""
    size, interpolation = config.crop, preset(config.model).interpolation
    eval_transform = Transform(size, config.resize, config.max_pixels, interpolation)
    train_transform = (
        TrainTransform(size, config.resize, config.max_pixels, interpolation, min_scale=config.min_crop_scale)
        if config.augment
        else eval_transform
    )
    # Listings come sorted by class: shuffle once (seeded), then the blocks' order changes every epoch
    # (shards: their order; the workers' shuffle buffer mixes the samples within).
    rng = np.random.default_rng(config.seed)
    if train.shards is None:
        train = Images(train.table.take(rng.permutation(train.table.num_rows)))
    else:
        train = Images(train.table, train.shards.take(rng.permutation(train.shards.num_rows)))
    train_ds = image_dataset(config, train, train_transform, classes)
    val_ds = image_dataset(config, val, eval_transform, classes)
    budget = training.cache_budget()
    if val.table.num_rows * size**2 * 3 <= budget:
        val_ds = val_ds.materialize()
    return {"train": train_ds.randomize_block_order(), "val": val_ds}


# --- training ------------------------------------------------------------------------------------------


def fit(
    config: FinetuneConfig,
    train: Images,
    val: Images,
    classes: list[str],
    weights_ref: Any,
    tracker: Tracker = UNTRACKED,
) -> Any:
    """Ray Train DDP over --workers; a checkpoint every epoch; resumes from the latest one after a failure
    and when the same command runs again on the same MODEL_DIR."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    total = ray.cluster_resources()
    use_gpu = training.uses_gpu(config.device)
    # On CPU clusters half the CPUs train and half decode: augmentation runs again every epoch.
    cpus = 1.0 if use_gpu else max(0.25, total.get("CPU", 1) / (2 * training.fewest(config.workers)))
    fs, path = storage.pyarrow_filesystem(config.model_dir)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "plan": WorkerPlan(
                config,
                len(classes),
                weights_ref,
                train_images=train.table.num_rows,
                threads=max(1, int(cpus)),
                logs=training.WorkerLogs.of_driver(tracker),
            )
        },
        scaling_config=training.scaling(config.workers, use_gpu, cpus),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train V2 (the default); mypy resolves V1
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            # The best epoch by validation accuracy is kept besides the latest (always kept: resume needs it).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING"),
        ),
        datasets=datasets(config, train, val, classes),  # type: ignore[arg-type]
        torch_config=TorchConfig(backend=training.collective_backend(use_gpu)),
    )
    return training.fit(trainer)


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker gets: the options, and what the driver derived for them."""

    config: FinetuneConfig
    classes: int
    weights_ref: Any  # the starting backbone state_dict, in the object store
    train_images: int
    threads: int  # torch threads of a CPU worker (its share of the CPUs)
    logs: training.WorkerLogs


class Network(nn.Module):
    """The backbone (VGG16 cut at pool5 averaged or fc7; another model without its final classifier layer),
    then dropout and a new linear layer over the classes."""

    def __init__(self, trunk: nn.Module, dim: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.trunk = trunk
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, classes)
        nn.init.normal_(self.head.weight, 0, 0.01)  # torchvision's init of VGG16's classifier layers
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.trunk(x)))

    def train(self, mode: bool = True) -> Network:
        """As nn.Module's, but frozen parts stay in eval mode: batch norms keep the running statistics of
        --weights, and stochastic depth and dropout inside them stay off (they are a fixed feature map)."""
        super().train(mode)
        for module in self.trunk.modules():
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()
        return self


def build_network(state_dict: dict, config: FinetuneConfig, classes: int) -> Network:
    """The network with the backbone's layers up to --freeze frozen (no gradients, no optimiser state)."""
    layer = Layer.FC7 if config.head == Head.FC7 else Layer.POOL5
    trunk = from_state_dict(config.model, state_dict, layer, Pool.AVG)
    torch.manual_seed(config.seed)
    network = Network(
        trunk,
        embedding_dim(layer, Pool.AVG, config.crop, config.model),
        classes,
        dropout=0.5 if config.head == Head.FC7 else 0.0,
    )
    freeze(trunk, config.freeze or "none")
    return network


def freeze(trunk: nn.Module, spec: str) -> None:
    """Turn off the gradients of --freeze's part of the backbone: none; all; vgg16's conv blocks 1..N; or
    the first fraction F of its layers (the modules that hold parameters, in the order the model defines
    them, which for torchvision's models is from the input to the output)."""
    if spec == "none":
        return
    if spec == "all":
        trunk.requires_grad_(False)
    elif spec in BLOCK_ENDS:
        features = trunk.get_submodule("features")
        assert isinstance(features, nn.Sequential), "config.parse_freeze allows blocks for vgg16 only"
        for module in features[: BLOCK_ENDS[spec]]:
            module.requires_grad_(False)
    else:
        layers = list(dict.fromkeys(name.rpartition(".")[0] for name, _ in trunk.named_parameters()))
        for name in layers[: round(float(spec) * len(layers))]:
            for parameter in trunk.get_submodule(name).parameters(recurse=False):
                parameter.requires_grad_(False)


def make_optimizer(network: Network, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Two groups: the new head at --lr, the unfrozen backbone layers at --backbone-lr."""
    trunk = [p for p in network.trunk.parameters() if p.requires_grad]
    groups = [{"params": list(network.head.parameters()), "lr": config.lr}]
    if trunk:
        groups.append({"params": trunk, "lr": config.trunk_lr})
    if config.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 1/100 to 1 over `warmup` steps, then cosine down to zero."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(loop_config: dict[str, WorkerPlan]) -> None:
    """One Ray Train worker: build the network, resume if there is a checkpoint, then train and validate
    an epoch at a time, reporting metrics and a checkpoint after each."""
    import ray.train
    import ray.train.torch

    plan = loop_config["plan"]
    config = plan.config
    plan.logs.apply()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)  # Ray's OMP_NUM_THREADS follows the (fractional) CPU request
    network = build_network(ray.get(plan.weights_ref), config, plan.classes)
    runner = Runner(network, config, device)
    optimizer = make_optimizer(network, config)
    # Each worker's steps an epoch: Ray Train splits the stream equally among however many workers run
    # now (with --workers MIN-MAX, a group restarted after a resize may be larger or smaller).
    workers = ray.train.get_context().get_world_size()
    steps = max(1, math.ceil(plan.train_images // workers / config.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, round(config.warmup * steps), config.epochs * steps),
    )
    history, resumed, start, state = training.History("finetune", config.epochs, plan.logs), [], 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group, or a rerun of the same command: carry on where it stopped
        state = training.load(checkpoint, STATE_FILE)
        network.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        runner.scaler.load_state_dict(state["scaler"])
        start = state["epoch"] + 1
        history, resumed = (
            training.History("finetune", config.epochs, plan.logs, state["history"], start),
            [*state["resumed"], start],
        )
    for epoch in range(start, config.epochs):
        loss, accuracy, failed = runner.train_epoch(optimizer, schedule, ray.train.get_dataset_shard("train"))
        val_metrics = runner.validate(ray.train.get_dataset_shard("val"))
        lr = schedule.get_last_lr()[0]
        history.add(epoch, (loss, accuracy), val_metrics, failed_images=failed, lr=lr, workers=workers)
        state = {
            "trainable": trainable_state(network),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": runner.scaler.state_dict(),
            "history": history.records,
            "epoch": epoch,
            "resumed": resumed,
        }
        training.report(history.records[-1], state, STATE_FILE)
    if start >= config.epochs and history.records:  # resumed after the last epoch: hand the driver its result
        training.report(history.records[-1], state, STATE_FILE)


def trainable_state(network: Network) -> dict[str, torch.Tensor]:
    """The tensors training changes: the trained layers' parameters and buffers (a batch norm's running
    statistics); frozen layers are the --weights' own and stay out of checkpoints."""
    trained = {name.rpartition(".")[0] for name, p in network.named_parameters() if p.requires_grad}
    return {
        k: v.detach().cpu().clone()
        for k, v in network.state_dict().items()
        if k.rpartition(".")[0] in trained
    }


class Runner:
    """Steps and evaluates one worker's DDP model on uint8 batches: normalisation on the device, autocast
    (bf16 on CUDA and fast-bf16 CPUs), channels_last for convnets at reduced precision, a grad scaler for
    fp16."""

    def __init__(self, network: Network, config: FinetuneConfig, device: torch.device) -> None:
        import ray.train.torch

        from raytl.config import Precision

        self.config, self.device = config, device
        self.precision = resolve_precision(config.precision, device)
        self.dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self.precision)
        self.channels_last = self.dtype is not None and prefers_channels_last(network)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(network, move_to_device=device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == Precision.FP16)
        weights = preset(config.model)  # the normalisation the backbone's weights expect
        self.mean = torch.tensor(weights.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(weights.std, device=device).view(1, 3, 1, 1)

    def batches(self, shard: Any, shuffle: bool) -> Any:
        size = self.config.batch_size
        return shard.iter_torch_batches(
            batch_size=size,
            dtypes={"image": torch.uint8, "y": torch.int64, "ok": torch.bool},
            device=self.device,
            local_shuffle_buffer_size=4 * size if shuffle else None,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float, already channels_last in memory
        x = x if self.channels_last else x.contiguous()
        x = x.div_(255).sub_(self.mean).div_(self.std)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.model(x).float()

    def train_epoch(self, optimizer: Any, schedule: Any, shard: Any) -> tuple[float, float, int]:
        """One pass over this worker's shard; the loss, accuracy and failed images over all workers."""
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, images, failed
        for batch in self.batches(shard, shuffle=True):
            ok, y = batch["ok"], batch["y"]
            logits = self.forward(batch["image"])
            per_image = nn.functional.cross_entropy(
                logits, y, reduction="none", label_smoothing=self.config.label_smoothing
            )
            # Images that failed to decode weigh zero; the step still happens on every worker (DDP).
            weight = ok.float()
            loss = (per_image * weight).sum() / weight.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            schedule.step()
            with torch.no_grad():
                sums += self._batch_sums(per_image, logits, y, ok)
        return self._global(sums)

    def validate(self, shard: Any) -> tuple[float, float]:
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.batches(shard, shuffle=False):
                ok, y = batch["ok"], batch["y"]
                logits = self.forward(batch["image"])
                per_image = nn.functional.cross_entropy(logits, y, reduction="none")
                sums += self._batch_sums(per_image, logits, y, ok)
        loss, accuracy, _ = self._global(sums)
        return loss, accuracy

    def _batch_sums(self, per_image, logits, y, ok) -> torch.Tensor:
        correct = ((logits.argmax(1) == y) & ok).sum()
        return torch.stack(
            [(per_image * ok).sum().double(), correct.double(), ok.sum().double(), (~ok).sum().double()]
        )

    def _global(self, sums: torch.Tensor) -> tuple[float, float, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        loss, correct, images, failed = sums.tolist()
        return (
            (loss / images if images else math.nan),
            (correct / images if images else math.nan),
            int(failed),
        )


# --- the result: MODEL_DIR for `raytl predict`, and exact metrics ----------------------------------------


def best_and_latest(result: Any) -> tuple[dict, dict]:
    """The checkpoint states with the best validation accuracy (ties: lower loss, then later) and the
    latest. Ray's list can name a checkpoint that a run interrupted mid-cleanup already deleted: the
    best one still in storage wins."""
    assert result.checkpoint is not None, "every epoch reports a checkpoint"
    latest = training.load(result.checkpoint, STATE_FILE)
    candidates = sorted(
        result.best_checkpoints or [],
        key=lambda pair: (pair[1]["val_accuracy"], -pair[1]["val_loss"], pair[1]["epoch"]),
        reverse=True,
    )
    for checkpoint, metrics in candidates:
        try:
            return training.load(checkpoint, STATE_FILE), latest
        except FileNotFoundError:
            log.warning("checkpoint of epoch %d is gone from storage; trying the next best", metrics["epoch"])
    return latest, latest


def save_model(
    config: FinetuneConfig, classes: list[str], layer: Layer, initial: dict, weights_id: str, best: dict
) -> str:
    """backbone.pt (the backbone layers the head uses, fine-tuned ones replaced), then model.pt / model.json
    as for a probe: the head over those layers' output. Returns the backbone's URI."""
    trained = best["trainable"]
    backbone = dict(initial)
    backbone.update({k.removeprefix("trunk."): v for k, v in trained.items() if k.startswith("trunk.")})
    buffer = io.BytesIO()
    torch.save(backbone, buffer)
    uri = storage.join(config.model_dir, BACKBONE_FILE)
    storage.write_bytes(uri, buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    dim = embedding_dim(layer, Pool.AVG, config.crop, config.model)
    info = {
        "kind": "finetune",
        "head": str(config.head),
        "backbone": {
            **pipeline.embeddings_metadata(
                backbone_stages(config, layer), f"{storage.redact(uri)}#sha256:{digest}", dim
            ),
            "schemes": image_schemes(config.source, config.manifest, config.allow_schemes),
        },
        "initial_weights": weights_id,
        "best_epoch": best["epoch"],
        "config": json.loads(config.to_json()),
        "raytl_version": raytl.__version__,
    }
    head = Model(
        classes,
        np.zeros(dim, np.float32),
        np.ones(dim, np.float32),
        trained["head.weight"].float().numpy(),
        trained["head.bias"].float().numpy(),
        info,
    )
    head.save(config.model_dir)
    return uri


def backbone_stages(config: FinetuneConfig, layer: Layer) -> pipeline.Stages:
    """How predict (and the final evaluation) runs the fine-tuned layers: DESIGN.md's eval transforms."""
    return pipeline.Stages(
        layer=layer,
        pool=Pool.AVG,
        precision=config.precision,
        image_size=config.crop,
        resize=config.resize,
        max_pixels=config.max_pixels,
        decode_batch=config.decode_batch,
        label_field=config.label_field,
        device=config.device,
        model=config.model,
        interpolation=preset(config.model).interpolation,
    )


def batch_evaluation(batch: pa.Table, model: Model) -> dict[str, np.ndarray]:
    """Embedded rows -> the flattened confusion matrix of those that decoded, the failed count, and the
    rows for the report's sample (pickled)."""
    predicted = classify(batch, model, model.mean.size)
    index = {c: i for i, c in enumerate(model.classes)}
    ok = np.asarray(predicted["predicted_label"].is_valid())
    labels = [str(v) for v in predicted["label"].filter(pa.array(ok)).to_pylist()]
    names = [str(v) for v in predicted["predicted_label"].filter(pa.array(ok)).to_pylist()]
    true = np.array([index[t] for t in labels], dtype=np.int64)
    guess = np.array([index[p] for p in names], dtype=np.int64)
    matrix = classification.confusion(true, guess, len(model.classes)).reshape(1, -1)
    sample = report.batch_sample(
        predicted["path"].filter(pa.array(ok)).to_pylist(),
        labels,
        names,
        predicted["score"].filter(pa.array(ok)).to_numpy(),
        batch["embedding"].filter(pa.array(ok)).to_pylist(),
    )
    return {
        "matrix": matrix,
        "failed": np.array([batch.num_rows - int(ok.sum())]),
        "sample": np.array([sample], dtype=object),
    }


def evaluate(
    model: Model, stages: pipeline.Stages, weights_uri: str, val: Images
) -> tuple[dict[str, Any], pa.Table]:
    """Metrics of the saved model on every validation image, through predict's own image path, and a
    sample of the rows (misclassified ones first) for the report."""
    weights = load_weights(weights_uri, stages.layer, model=stages.model)
    rows = pipeline.embedded(
        stages, val.corpus(), ray.put(weights.state_dict), pipeline.Resources.of_cluster(stages.device)
    )
    k = len(model.classes)
    total, failed, sampler = np.zeros((k, k), dtype=np.int64), 0, report.Sampler()
    for part in rows.map_batches(
        batch_evaluation,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"model": model},
        batch_format="pyarrow",
    ).iter_batches(batch_size=None, batch_format="numpy"):
        total += part["matrix"].sum(0).reshape(k, k)
        failed += int(part["failed"].sum())
        sampler.add(part["sample"])
    return dict(classification.report(total, model.classes), failed_val_images=failed), sampler.table()


def _counts(table: pa.Table, classes: list[str]) -> dict[str, int]:
    labels = table["label"].to_pylist()
    return {c: labels.count(c) for c in classes}
