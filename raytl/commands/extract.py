"""`raytl extract`: the Ray Data pipeline from an image corpus to Parquet embeddings."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

import raytl
from raytl import doneset, logs, output, storage, writer
from raytl.config import ConfigError, Decode, ExtractConfig
from raytl.embedder import Embedder, on_actors
from raytl.errors import ExtractError
from raytl.models import IMAGENET_MEAN, IMAGENET_STD, embedding_dim, load_weights
from raytl.preprocess import Transform, decode_batch, fetch_batch
from raytl.reader import Corpus, list_corpus, manifest_rows
from raytl.shards import read_shards

log = logging.getLogger(__name__)

# Parquet part files stay near this size whatever D is (25088-d flattened pool5 rows are 100 KB each).
_TARGET_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Resources:
    """What the pipeline may use, read from the cluster once at start-up."""

    gpus: int
    cpus: int

    @classmethod
    def of_cluster(cls) -> Resources:
        total = ray.cluster_resources()
        return cls(gpus=int(total.get("GPU", 0)), cpus=max(1, int(total.get("CPU", 1))))


def run(config: ExtractConfig) -> dict[str, Any]:
    """Validate inputs, skip what OUTPUT already holds, run the pipeline, write `_summary.json`."""
    # Fails fast on a missing or empty SOURCE; a manifest is only opened (Ray Data tasks read its rows).
    output.check_apart(config.output, {"SOURCE": config.source})
    part_seconds()  # a bad RAYTL_PART_SECONDS is refused before any work
    corpus = list_corpus(config.source, config.manifest, stream=True, allow_schemes=config.allow_schemes)
    weights = load_weights(config.weights, config.layer, config.seed)  # fails fast on bad weights
    if corpus.shards and config.decode == Decode.GPU:
        raise ConfigError(
            "--decode gpu reads loose image files; tar shards are decoded on CPU (--decode cpu)."
        )
    done = output.resume(config, output.run_record(config, weights.id))  # refuses other options' OUTPUT
    todo, total, skipped = pending(corpus, done)
    if skipped:
        log.warning("resuming: %d images are already in %s and are skipped", skipped, config.output)
    dim = embedding_dim(config.layer, config.pool, config.image_size)
    metadata = embeddings_metadata(config, weights.id, dim)
    log.info("extract config: %s", config.to_json())
    started = time.perf_counter()
    counts: dict[str, int] = {}
    if total != 0:
        logs.init_ray()
        stats = build(config, todo, ray.put(weights.state_dict), Resources.of_cluster(), metadata, done)
        progress = logs.Progress("extract", total)

        def check(totals: dict[str, int]) -> None:
            progress.update(totals)
            _check_errors(totals, total, config)

        with user_errors():
            counts = writer.sum_counts(stats, check=check)
            progress.done(counts)
            _check_errors(counts, total, config, final=True)
    embedded, failed = counts.get("embedded", 0), counts.get("failed", 0)
    if corpus.shards and embedded + failed + skipped == 0:  # as for an empty folder, found only once read
        raise storage.StorageError(
            f"SOURCE {storage.redact(config.source or '')} holds no samples "
            f"({corpus.table.num_rows} shards read)."
        )
    wall = time.perf_counter() - started
    summary = {
        "seen": embedded + failed + skipped,
        "embedded": embedded,
        "failed": failed,
        "skipped": skipped,
        "ignored_non_images": corpus.ignored,
        "wall_seconds": round(wall, 3),
        "images_per_second": round(embedded / wall, 2) if wall else None,
        "output": storage.redact(config.output),
        "embedding": metadata,
    }
    writer.write_summary(config.output, summary)
    return summary


def pending(corpus: Corpus, done: output.Done) -> tuple[Corpus, int | None, int]:
    """The corpus less what OUTPUT holds, how many images that leaves (None: known only once read) and
    how many it skips."""
    if corpus.shards:  # samples are found inside the shards: their readers skip the done ones
        skip = doneset.build(done.dataset()) if done.rows else None
        return Corpus(corpus.table, 0, shards=True, skip=skip), None, done.rows
    if corpus.manifest is not None:  # its rows are read by tasks, which drop the done ones (`listing`)
        rows = corpus.manifest.rows
        return corpus, None if rows is None else max(0, rows - done.rows), done.rows
    table = corpus.table
    if done.rows:
        written = storage.public_uris(table["path"])  # as OUTPUT holds them
        table = table.filter(pc.invert(pc.is_in(written, value_set=done.paths())))
    return Corpus(table, 0), table.num_rows, corpus.table.num_rows - table.num_rows


# --max-errors as a share, when the number of images is unknown (CSV manifest, shards): judged on the
# images seen so far once there are this many, and on all of them at the end.
_ERROR_SHARE_AFTER = 1000


def _check_errors(
    totals: dict[str, int], total: int | None, config: ExtractConfig, final: bool = False
) -> None:
    """--max-errors: stop as soon as more files than allowed have failed (a mis-pointed SOURCE)."""
    failed = totals.get("failed", 0)
    seen = failed + totals.get("embedded", 0)
    if total is None and isinstance(config.max_errors, float) and not final and seen < _ERROR_SHARE_AFTER:
        return
    limit = config.error_limit(seen if total is None else total)
    if limit is not None and failed > limit:
        raise ExtractError(
            f"{failed} files could not be read or decoded, more than --max-errors {config.max_errors} allows "
            f"({limit}): is SOURCE the right one? Each file and its reason is in "
            f"{storage.redact(storage.join(config.output, writer.ERRORS_DIR))}."
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A storage failure raised inside a Ray task reaches the driver wrapped by Ray: unwrap it."""
    try:
        yield
    except Exception as exc:
        remote = isinstance(exc, ray.exceptions.RayError)
        if isinstance(exc, (storage.StorageError, ExtractError)) and not remote:
            raise
        # Ray Data re-raises a task's exception as RayTaskError(UserCodeException), keeping the original
        # only as text in the remote traceback (and a RayTaskError(StorageError) *is* a StorageError,
        # whose message is that whole traceback): its last StorageError line is the sentence.
        found = _STORAGE_ERROR.findall(_ANSI.sub("", str(exc)))
        if not found:
            raise
        raise storage.StorageError(found[-1].strip()) from None


_STORAGE_ERROR = re.compile(r"raytl\.(?:errors|storage)\.StorageError: (.+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def build(
    config: ExtractConfig,
    corpus: Corpus,
    weights_ref: Any,
    resources: Resources,
    metadata: dict,
    done: output.Done = output.NOTHING,
) -> ray.data.Dataset:
    """The whole pipeline: listed paths -> decode (CPU tasks) -> embed (actors) -> write Parquet parts."""
    dim = metadata["dim"]
    rows_per_file = max(1, min(rows_per_part(config, resources), _TARGET_FILE_BYTES // (4 * dim)))
    return embedded(config, corpus, weights_ref, resources, done).map_batches(
        writer.write_part,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"output": config.output, "schema": writer.embeddings_schema(dim, metadata)},
        batch_size=rows_per_file,
        batch_format="pyarrow",
        # Mostly waiting on storage. Reserving any CPU starves it on a small node: with decode tasks and
        # the model actor holding every CPU, parts were only written once decoding had finished.
        num_cpus=0,
    )


# The work a killed driver can lose is what the writers hold, up to a part each: without --rows-per-file,
# parts are sized to come about every PART_SECONDS_ENV seconds (default 60). Ray Data's writers are stateless
# tasks fed fixed-size batches, so the size is planned from the expected rate rather than timed.
PART_SECONDS_ENV = "RAYTL_PART_SECONDS"
_PART_SECONDS = 60.0
# VGG16 images a second on one CPU model actor at 224 px: 2 AVX2 cores in fp32 (bench/extract.py; AMX bf16 is
# ~7x, so parts come sooner there). GPU clusters keep the largest parts: a GPU fills one in seconds.
_CPU_RATE_224 = 5.0
_ROWS_PER_PART = 8192


def rows_per_part(config: ExtractConfig, resources: Resources) -> int:
    """--rows-per-file, else about _PART_SECONDS of the expected embedding rate (at most 8192 rows)."""
    if config.rows_per_file:
        return config.rows_per_file
    if resources.gpus:
        return _ROWS_PER_PART
    rate = _CPU_RATE_224 * (224 / config.image_size) ** 2 * (config.num_actors or 1)
    return int(min(_ROWS_PER_PART, max(64, rate * part_seconds())))


def part_seconds() -> float:
    """About how much work a part holds on CPU clusters (RAYTL_PART_SECONDS, default 60 s)."""
    value = os.environ.get(PART_SECONDS_ENV, "")
    try:
        seconds = float(value) if value else _PART_SECONDS
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{PART_SECONDS_ENV} must be a positive number of seconds, not {value!r}.")
    return seconds


def embedded(
    config: ExtractConfig,
    corpus: Corpus,
    weights_ref: Any,
    resources: Resources,
    done: output.Done = output.NOTHING,
) -> ray.data.Dataset:
    """Rows (path, label, embedding, error): decoded by CPU tasks, embedded by the model actor pool."""
    transform = Transform(config.image_size, config.resize, config.max_pixels)
    on_device = config.decode == Decode.GPU  # CPU tasks then only fetch and check headers
    rows = decoded(config, corpus, listing(config, corpus, done), transform)
    device_decode = transform if on_device else None
    return on_actors(rows, Embedder, weights_ref, config, resources.gpus, resources.cpus, device_decode)


def listing(config: ExtractConfig, corpus: Corpus, done: output.Done) -> ray.data.Dataset:
    """Rows (path, label) still to read, in blocks of --decode-batch rows (of one shard for shards)."""
    if corpus.manifest is None:  # listed on the driver (loose files: done ones dropped by `pending`)
        return ray.data.from_arrow(_blocks(corpus.table, 1 if corpus.shards else config.decode_batch))
    skip = doneset.build(done.dataset()) if done.rows else None
    return manifest_rows(corpus.manifest, config.decode_batch, skip)


def decoded(
    config: ExtractConfig, corpus: Corpus, rows: ray.data.Dataset, transform: Transform
) -> ray.data.Dataset:
    """Rows (path, label, image or JPEG data, error) from CPU tasks: loose files a batch a task, or a
    whole tar shard a task, streamed out in batches."""
    if corpus.shards:
        return rows.map_batches(
            read_shards,  # type: ignore[arg-type]
            fn_kwargs={
                "transform": transform,
                "label_field": config.label_field,
                "batch_size": config.decode_batch,
                "skip": corpus.skip,
                "keep": ray.put(set(corpus.keep.to_pylist())) if corpus.keep is not None else None,
            },
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
        )
    return rows.map_batches(
        fetch_batch if config.decode == Decode.GPU else decode_batch,  # type: ignore[arg-type]
        fn_kwargs={"transform": transform},
        batch_size=config.decode_batch,
        batch_format="numpy",
        num_cpus=1,
    )


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Split the listing so that decode tasks run in parallel from the first block on."""
    count = max(1, math.ceil(table.num_rows / rows))
    return [table.slice(i * rows, rows) for i in range(count)]


def embeddings_metadata(config: ExtractConfig, weights_id: str, dim: int) -> dict[str, Any]:
    """The JSON stored under the Parquet schema key `raytl`: how every embedding was made."""
    return {
        "model": "vgg16",
        "weights": weights_id,
        "layer": str(config.layer),
        "pool": str(config.pool) if config.layer == "pool5" else None,
        "dim": dim,
        "image_size": config.image_size,
        "precision": str(config.precision),
        "preprocessing": {
            "exif_transpose": True,
            "to_rgb": True,
            "resize": config.resize,
            "interpolation": "bilinear",
            "antialias": True,
            "center_crop": config.image_size,
            "decode": str(config.decode),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "raytl_version": raytl.__version__,
    }
