"""The Ray Data stages every image command is made of: listed paths -> decode (CPU tasks) -> embed (model
actors) -> Parquet parts. extract runs them whole; predict and finetune take the stages they need."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raytl.cluster.embedder import Embedder, Resources, on_actors
from raytl.config import Decode, Device, ExtractConfig, Layer, Pool, Precision
from raytl.corpus.reader import Corpus, manifest_rows
from raytl.corpus.shards import read_shards
from raytl.errors import ConfigError
from raytl.files import doneset, output, writer
from raytl.version import VERSION
from raytl.vision.models import VGG16, preset
from raytl.vision.preprocess import Transform, decode_batch, fetch_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stages:
    """What the image stages need to know, whichever command runs them: how files are read and decoded,
    how crops are made, and the model actors. extract's own options make one (`of`); predict makes one
    from the settings recorded with the model's embeddings, finetune from its options."""

    layer: Layer
    pool: Pool
    precision: Precision
    image_size: int
    resize: int  # the shorter side before the centre crop
    max_pixels: int
    decode_batch: int
    decode: Decode = Decode.CPU
    label_field: str | None = None
    batch_size: int | None = None  # per forward pass (None: 256 on GPU, 32 on CPU)
    num_actors: int | tuple[int, int] | None = None
    device: Device = Device.AUTO
    compile: bool = False
    model: str = VGG16  # the backbone (models.trunk)
    interpolation: str = "bilinear"  # of the resize, as the model's weights' transforms do it

    @classmethod
    def of(cls, source: Any, **overrides: Any) -> Stages:
        """The stages as `source` sets them (a resolved config, or a model's Backbone record: whichever of
        these fields it has), then `overrides`; the interpolation is the model's weights' unless given."""
        given = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
        found = preset(source.model, getattr(source, "weights", None))
        return cls(**{"interpolation": found.interpolation, **given, **overrides})

    @property
    def transform(self) -> Transform:
        """The evaluation crop (DESIGN.md)."""
        draft = self.decode == Decode.DRAFT
        return Transform(self.image_size, self.resize, self.max_pixels, self.interpolation, draft)


# Parquet part files stay near this size whatever D is (25088-d flattened pool5 rows are 100 KB each).
_TARGET_FILE_BYTES = 256 * 1024 * 1024


def written(
    rows: ray.data.Dataset, config: ExtractConfig, resources: Resources, metadata: dict
) -> ray.data.Dataset:
    """The last stage: `embedded` rows written as Parquet parts of OUTPUT; yields each part's counts."""
    dim = metadata["dim"]
    rows_per_file = max(1, min(rows_per_part(config, resources), _TARGET_FILE_BYTES // (4 * dim)))
    return rows.map_batches(
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
    if resources.use_gpu:
        return _ROWS_PER_PART
    actors = config.num_actors[0] if isinstance(config.num_actors, tuple) else config.num_actors or 1
    rate = _CPU_RATE_224 * (224 / (config.image_size or 224)) ** 2 * actors
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
    stages: Stages,
    corpus: Corpus,
    weights_ref: Any,
    resources: Resources,
    done: output.Done = output.NOTHING,
) -> ray.data.Dataset:
    """Rows (path, label, embedding, error): decoded by CPU tasks, embedded by the model actor pool."""
    transform = stages.transform
    on_device = stages.decode == Decode.GPU  # CPU tasks then only fetch and check headers
    rows = decoded(stages, corpus, listing(stages.decode_batch, corpus, done), transform)
    device_decode = transform if on_device else None
    return on_actors(rows, Embedder, weights_ref, stages, resources, device_decode)


def listing(decode_batch: int, corpus: Corpus, done: output.Done) -> ray.data.Dataset:
    """Rows (path, label) still to read, in blocks of --decode-batch rows (of one shard for shards)."""
    if corpus.manifest is None:  # listed on the driver (loose files: done ones dropped by `pending`)
        return in_blocks(corpus.table, 1 if corpus.shards else decode_batch)
    skip = doneset.build(done.dataset()) if done.rows else None
    return manifest_rows(corpus.manifest, decode_batch, skip)


def in_blocks(table: pa.Table, rows: int) -> ray.data.Dataset:
    """A table listed on the driver as a Dataset of blocks of `rows` rows, one read task a block."""
    blocks = BlocksOf(table, rows)
    return ray.data.read_datasource(blocks, override_num_blocks=max(1, len(blocks.tasks)))


class BlocksOf(Datasource):
    """A driver-side table read as blocks of `rows` rows. Each read task carries its own rows and Ray Data
    fuses it with the decoding that follows, so the first files are decoded at once: the alternatives
    cost a Ray task before any decode (from_arrow(table).repartition: ~1-3 s at start-up on 2 busy
    cores) or one task per block (from_arrow of many tables, each put whole: a slice pickles its
    table's full buffers)."""

    def __init__(self, table: pa.Table, rows: int) -> None:
        self.nbytes = table.nbytes
        self.tasks = []
        for start in range(0, table.num_rows, rows):
            # take, not slice: a block pickled into its task then holds only its own rows
            block = table.take(pa.array(range(start, min(start + rows, table.num_rows))))
            meta = BlockMetadata(
                num_rows=block.num_rows, size_bytes=block.nbytes, input_files=None, exec_stats=None
            )
            self.tasks.append(ReadTask(functools.partial(list, [block]), meta, schema=block.schema))

    def estimate_inmemory_data_size(self) -> int:
        return self.nbytes

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return self.tasks


def decoded(stages: Stages, corpus: Corpus, rows: ray.data.Dataset, transform: Transform) -> ray.data.Dataset:
    """Rows (path, label, image or JPEG data, error) from CPU tasks: loose files a batch a task, or a
    whole tar shard a task, streamed out in batches."""
    if corpus.shards:
        return rows.map_batches(
            read_shards,  # type: ignore[arg-type]
            fn_kwargs={
                "transform": transform,
                "label_field": stages.label_field,
                "batch_size": stages.decode_batch,
                "skip": corpus.skip,
                "keep": ray.put(set(corpus.keep.to_pylist())) if corpus.keep is not None else None,
            },
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
        )
    return rows.map_batches(
        fetch_batch if stages.decode == Decode.GPU else decode_batch,  # type: ignore[arg-type]
        fn_kwargs={"transform": transform},
        # a driver-listed corpus comes in blocks of --decode-batch rows (`in_blocks`): a task a block, fused
        # with its read task (Ray Data fuses no read with a map that sets a batch size)
        batch_size=None if corpus.manifest is None else stages.decode_batch,
        batch_format="numpy",
        num_cpus=1,
    )


def embeddings_metadata(stages: Stages, weights_id: str, dim: int) -> dict[str, Any]:
    """The JSON stored under the Parquet schema key `raytl`: how every embedding was made."""
    found = preset(stages.model)
    return {
        "model": stages.model,
        "weights": weights_id,
        "layer": str(stages.layer) if stages.model == VGG16 else "penultimate",
        "pool": str(stages.pool) if stages.layer == "pool5" and stages.model == VGG16 else None,
        "dim": dim,
        "image_size": stages.image_size,
        "precision": str(stages.precision),
        "preprocessing": {
            "exif_transpose": True,
            "to_rgb": True,
            "resize": stages.resize,
            "interpolation": stages.interpolation,
            "antialias": True,
            "center_crop": stages.image_size,
            "decode": str(stages.decode),
            "mean": list(found.mean),
            "std": list(found.std),
        },
        "raytl_version": VERSION,
    }
