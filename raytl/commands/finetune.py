"""`raytl finetune`: a backbone (VGG16 or any torchvision classification model) with a new head, trained on
the images themselves with Ray Train (DDP)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from raytl import errors
from raytl.cluster import pipeline, session, training
from raytl.config import FinetuneConfig, Head, Layer, Pool
from raytl.corpus import shards
from raytl.corpus.reader import CORPUS_SCHEMA, Corpus, image_schemes, list_corpus
from raytl.errors import ConfigError, DatasetError, StorageError
from raytl.files import exclusions, storage
from raytl.files.output import NOTHING
from raytl.modeling import loop, split
from raytl.modeling import metrics as classification
from raytl.modeling import model_dir as model_dirs
from raytl.modeling.classifier import Model, classify
from raytl.modeling.model_dir import BACKBONE_FILE, FINETUNE_RUN, METRICS_FILE, NETWORK_CHECKPOINT
from raytl.modeling.network import (
    NetworkObjective,
    build_network,
    make_optimizer,
    schedule,
    steps_per_epoch,
    trainable_state,
)
from raytl.reporting import report, tracking
from raytl.reporting.tracking import UNTRACKED, Tracker
from raytl.version import VERSION
from raytl.vision.models import (
    VGG16,
    embedding_dim,
    load_weights,
    preset,
    resolved,
)
from raytl.vision.preprocess import TrainTransform, Transform

log = logging.getLogger(__name__)


def run(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, write MODEL_DIR (backbone.pt, model.pt, model.json, metrics.json); returns the metrics."""
    if config.model != VGG16:  # the crop and resize sizes of the model's weights, unless given
        config = resolved(config)
    layer = Layer.FC7 if config.head == Head.FC7 else Layer.POOL5
    weights = load_weights(config.weights, layer, config.seed, config.model)  # checked before any Ray work
    train, val, classes = split_corpus(config)  # listing shards takes a Ray pass: it starts Ray
    with storage.guarded(f"prepare MODEL_DIR {config.model_dir}"):
        resuming = prepare_model_dir(config)
    session.init_ray()
    log.info("finetune config: %s (%s)", config.to_json(), "resuming" if resuming else "new run")
    dim = embedding_dim(layer, Pool.AVG, config.crop, config.model)
    starting = pipeline.embeddings_metadata(backbone_stages(config, layer), weights.id, dim)
    with tracking.run("finetune", config, starting, resume=resuming) as tracker:
        weights_ref = ray.put(weights.state_dict)
        result = fit(config, train, val, classes, weights_ref, tracker)
        best, latest = training.best_state(result, NETWORK_CHECKPOINT)
        backbone_spec = save_model(config, classes, layer, weights.state_dict, weights.id, best)
        model = Model.load(config.model_dir)
        metrics, sample = validation_metrics(model, backbone_stages(config, layer), backbone_spec, val)
        report.write_validation(config.model_dir, sample)
        metrics.update(
            head=str(config.head),
            kind="finetune",
            best_epoch=best["epoch"],
            selected_by=loop.selection(True),
            train_samples=_counts(train.table, classes),
            val_samples=_counts(val.table, classes),
            history=latest["history"],
            resumed_at_epochs=latest["resumed"],
        )
        model_dirs.write_json(config.model_dir, METRICS_FILE, metrics)
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
    excluded = exclusions.excluded_paths(config.exclude, config.exclude_rank) if config.exclude else None
    if excluded is not None:
        images = left_in(images, excluded)
    corpus = images.table
    what = "SOURCE" if config.source else "--manifest"
    _require_labels(corpus, what)
    classes = sorted(set(corpus["label"].to_pylist()))
    split.check_classes(f"{what} {storage.redact(config.source or config.manifest or '')}", classes)
    if config.val:
        val = _list_val(config.val, config.label_field, config.allow_schemes)
        val = val if excluded is None else left_in(val, excluded)
        split.check_val_labels(what, val.table["label"].to_pylist(), classes)
        train = images
    else:
        labels = corpus["label"].to_pylist()
        row_bins = split.bins(corpus["path"].to_pylist(), config.seed)
        hists = {
            c: np.bincount(row_bins[[lab == c for lab in labels]], minlength=split.BINS) for c in classes
        }
        in_val = split.in_validation(labels, row_bins, split.thresholds(hists, config.val_fraction))
        train, val = images.where(~in_val), images.where(in_val)
    split.check_sides(classes, _counts(train.table, classes), _counts(val.table, classes), "images")
    workers = training.most(config.workers)
    if train.table.num_rows < workers:
        raise ConfigError(f"--workers {workers} is more than the {train.table.num_rows} training images.")
    return train, val, classes


def left_in(images: Images, excluded: pa.Array) -> Images:
    """The images whose path --exclude's tables do not list."""
    kept = Images(exclusions.drop(images.table, excluded), images.shards)
    log.info("--exclude: left out %d images", images.table.num_rows - kept.table.num_rows)
    return kept


def _labelled(
    source: str | None, manifest: str | None, label_field: str | None, allow_schemes: tuple[str, ...] = ()
) -> Images:
    """List SOURCE or read the manifest; tar shards are read once by Ray tasks for their samples' labels."""
    corpus = list_corpus(source, manifest, allow_schemes=allow_schemes)
    if not corpus.shards:
        return Images(corpus.table)
    session.init_ray()
    blocks = [corpus.table.slice(i, 1) for i in range(corpus.table.num_rows)]
    labels = ray.data.from_arrow(blocks).map_batches(
        shards.sample_labels,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"label_field": label_field},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0.5,  # mostly reading
    )
    with errors.unwrapped():
        tables = ray.get(labels.to_arrow_refs())
    table = (
        pa.concat_tables([t.cast(CORPUS_SCHEMA) for t in tables]) if tables else CORPUS_SCHEMA.empty_table()
    )
    if table.num_rows == 0:
        raise StorageError(f"SOURCE {storage.redact(source or '')} holds no samples with an image.")
    log.info("listed %d samples in %d shards", table.num_rows, corpus.table.num_rows)
    return Images(table, corpus.table)


def _list_val(uri: str, label_field: str | None, allow_schemes: tuple[str, ...] = ()) -> Images:
    is_manifest = uri.lower().endswith((".csv", ".csv.gz", ".tsv", ".parquet", ".pq"))
    try:
        if is_manifest:
            images = _labelled(None, uri, None, allow_schemes)
        else:
            images = _labelled(uri, None, label_field)
    except StorageError as exc:
        raise StorageError(f"--val: {exc}") from None
    _require_labels(images.table, "--val")
    return images


def _require_labels(table: pa.Table, what: str) -> None:
    missing = sum(1 for label in table["label"].to_pylist() if not label)
    if missing:
        raise DatasetError(
            f"{what} has images without a label ({missing} of {table.num_rows}); fine-tuning needs "
            "SOURCE/<label>/<image> folders, a manifest with a `label` column, or shards with labels "
            "(--label-field)."
        )


def prepare_model_dir(config: FinetuneConfig) -> bool:
    """Start a run in MODEL_DIR, or resume the unfinished one with the same options; True when resuming
    (model_dir.prepare)."""
    return model_dirs.prepare(
        config.model_dir, model_dirs.run_options(config), FINETUNE_RUN, config.overwrite, "fine-tuning",
        config.option_name,
        recorded_defaults={"model": VGG16},  # runs recorded before --model existed are vgg16's
    )  # fmt: skip


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
    size, interpolation = config.crop, preset(config.model, config.weights).interpolation
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
            # The best epoch (loop.Selection) is kept besides the latest (always kept: resume needs it).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=training.KEPT_SCORE, checkpoint_score_order="max"
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


def train_loop(loop_config: dict[str, WorkerPlan]) -> None:
    """One Ray Train worker: the network, its optimiser and schedule, stepped by the training core
    (training.run_epochs): train and validate an epoch at a time, a report and a checkpoint after each."""
    import ray.train
    import ray.train.torch

    plan = loop_config["plan"]
    config = plan.config
    plan.logs.apply()
    device = training.worker_device(plan.threads)
    network = build_network(ray.get(plan.weights_ref), config, plan.classes)
    objective = NetworkObjective(network, config, device)
    objective.model = ray.train.torch.prepare_model(objective.placed(network), move_to_device=device)
    optimizer = make_optimizer(network, config)
    workers = ray.train.get_context().get_world_size()
    size = config.batch_size

    def batches(split: str, epoch: int | None) -> Any:
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=size,
            dtypes={"image": torch.uint8, "y": torch.int64, "ok": torch.bool},
            device=device,
            local_shuffle_buffer_size=4 * size if epoch is not None else None,
        )

    training.run_epochs(
        training.Worker(
            command="finetune",
            epochs=config.epochs,
            checkpoint_file=NETWORK_CHECKPOINT,
            model=objective.model,
            objective=objective,
            optimizer=optimizer,
            schedule=schedule(optimizer, config, steps_per_epoch(plan.train_images, workers, size)),
            batches=batches,
            trainable=lambda: trainable_state(network),
            load_trainable=lambda state: network.load_state_dict(state, strict=False),
            device=device,
            logs=plan.logs,
            by_accuracy=True,
            scaler=objective.scaler(),
            step_schedule=True,
            counts_failed=True,
            extra=lambda: {"workers": workers},
        )
    )


# --- the result: MODEL_DIR for `raytl predict`, and exact metrics ----------------------------------------


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
    backbone = {
        **pipeline.embeddings_metadata(
            backbone_stages(config, layer), f"{storage.redact(uri)}#sha256:{digest}", dim
        ),
        "schemes": image_schemes(config.source, config.manifest, config.allow_schemes),
    }
    info = model_dirs.info_of(
        backbone, kind="finetune", head=str(config.head), initial_weights=weights_id,
        best_epoch=best["epoch"], config=json.loads(config.to_json()), raytl_version=VERSION,
    )  # fmt: skip
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
    """How predict (and the final evaluation) runs the fine-tuned layers: DESIGN.md's eval transforms (the
    forward passes' batch size is the image stages' own, not a training step's)."""
    return pipeline.Stages.of(config, layer=layer, pool=Pool.AVG, image_size=config.crop, batch_size=None)


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


def validation_metrics(
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
