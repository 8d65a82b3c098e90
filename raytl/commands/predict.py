"""`raytl predict`: classify embeddings, or images through the model's own backbone, in one stream."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray

from raytl import errors
from raytl.cluster import pipeline, session
from raytl.config import Decode, ExtractConfig, PredictConfig
from raytl.corpus.reader import list_corpus
from raytl.files import storage, writer
from raytl.files.embeddings import check_same_backbone, is_embeddings, open_embeddings
from raytl.files.output import check_apart, prepare_output
from raytl.modeling.classifier import Model, backbone_weights, classify
from raytl.reporting import logs

log = logging.getLogger(__name__)


def predictions_schema(model: Model, model_dir: str) -> pa.Schema:
    """path, predicted_label, score (probability of the predicted class), label (null when unknown)."""
    meta = {"model_dir": storage.redact(model_dir), "classes": model.classes, "head": model.info.head}
    return pa.schema(
        [
            ("path", pa.string()),
            ("predicted_label", pa.string()),
            ("score", pa.float32()),
            ("label", pa.string()),
        ],
        metadata={writer.METADATA_KEY: json.dumps(meta).encode()},
    )


def run(config: PredictConfig) -> dict[str, Any]:
    """Classify INPUT into OUTPUT Parquet; returns the summary (also OUTPUT/_summary.json)."""
    model = Model.load(config.model_dir)
    check_apart(config.output, {"INPUT": config.source})
    # Everything about INPUT is checked before OUTPUT is touched; the rows are built once Ray is up.
    if config.source and is_embeddings(config.source):
        embedded, dim = _embeddings_input(config, model)
    else:
        embedded, dim = _images_input(config, model)
    prepare_output(config.output, config.overwrite)
    _init_ray()
    started = time.perf_counter()
    rows = embedded().map_batches(
        classify,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"model": model, "dim": dim},
        batch_format="pyarrow",
    )
    stats = rows.map_batches(
        writer.write_part,  # type: ignore[arg-type]
        fn_kwargs={"output": config.output, "schema": predictions_schema(model, config.model_dir)},
        batch_size=8192,
        batch_format="pyarrow",
        num_cpus=0,  # as extract's writer: never starved by decode tasks
    )
    with errors.unwrapped():
        progress = logs.Progress("predict", None)
        counts = writer.sum_counts(stats, check=progress.update)
        progress.done(counts)
    summary = _summary(config, counts, time.perf_counter() - started)
    writer.write_summary(config.output, summary)
    return summary


def _embeddings_input(config: PredictConfig, model: Model) -> tuple[Callable[[], Any], int]:
    """INPUT holds embeddings: checked against the model's backbone; (rows builder, dimension)."""
    data = open_embeddings(config.source or "", "INPUT")
    check_same_backbone(model.info.recorded_backbone, data, "INPUT")
    return data.read, data.dim


def _images_input(config: PredictConfig, model: Model) -> tuple[Callable[[], Any], int]:
    """INPUT holds images: embedded as the model's embeddings were (its recorded backbone settings), with
    its weights (or --weights when they moved); (rows builder, dimension)."""
    stages = backbone_stages(model, config)
    corpus = list_corpus(config.source, config.manifest, stream=True, allow_schemes=config.allow_schemes)
    if corpus.shards and stages.decode == Decode.GPU:
        # Shards are decoded by CPU tasks (read_shards); the model's GPU-decoded crops differ from
        # Pillow's by at most 2 grey levels.
        log.warning("the model's embeddings were decoded on GPU; tar shards are decoded on CPU")
        stages = replace(stages, decode=Decode.CPU)
    backbone = backbone_weights(model, config.model_dir, config.weights)

    def rows() -> Any:
        weights_ref = ray.put(backbone.state_dict)
        return pipeline.embedded(stages, corpus, weights_ref, pipeline.Resources.of_cluster(stages.device))

    return rows, int(model.mean.size)


def _summary(config: PredictConfig, counts: dict[str, int], wall: float) -> dict[str, Any]:
    predicted, failed = counts.get("embedded", 0), counts.get("failed", 0)
    return {
        "seen": predicted + failed,
        "predicted": predicted,
        "failed": failed,
        "labelled": counts.get("labelled", 0),
        "accuracy": counts["correct"] / counts["labelled"] if counts.get("labelled") else None,
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(predicted / wall, 2) if wall else None,
        "model_dir": storage.redact(config.model_dir),
        "output": storage.redact(config.output),
    }


def backbone_stages(model: Model, config: PredictConfig) -> pipeline.Stages:
    """The image stages as the model's embeddings were made (their `raytl` metadata), on predict's actors
    (its --batch-size, --num-actors, --device), reading files as extract does by default."""
    return pipeline.Stages.of(
        model.backbone,
        max_pixels=ExtractConfig.max_pixels,
        decode_batch=ExtractConfig.decode_batch,
        batch_size=config.batch_size,
        num_actors=config.num_actors,
        device=config.device,
    )


def _init_ray() -> None:
    session.init_ray()
