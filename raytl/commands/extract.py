"""`raytl extract`: an image corpus to Parquet embeddings, through the whole pipeline (raytl.pipeline)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.compute as pc
import ray

from raytl import doneset, logs, output, pipeline, storage, writer
from raytl.config import ConfigError, Decode, ExtractConfig
from raytl.errors import ExtractError
from raytl.models import embedding_dim, load_weights, resolved
from raytl.reader import Corpus, list_corpus

log = logging.getLogger(__name__)


def run(config: ExtractConfig) -> dict[str, Any]:
    """Validate inputs, skip what OUTPUT already holds, run the pipeline, write `_summary.json`."""
    # Fails fast on a missing or empty SOURCE; a manifest is only opened (Ray Data tasks read its rows).
    output.check_apart(config.output, {"SOURCE": config.source})
    pipeline.part_seconds()  # a bad RAYTL_PART_SECONDS is refused before any work
    config = resolved(config)  # the model's crop and resize where not given; an unknown --model refused
    # A crop size the model cannot take (a ViT's is fixed) is refused before anything is read.
    dim = embedding_dim(config.layer, config.pool, config.image_size or 224, config.model)
    corpus = list_corpus(config.source, config.manifest, stream=True, allow_schemes=config.allow_schemes)
    weights = load_weights(
        config.weights, config.layer, config.seed, config.model
    )  # fails fast on bad weights
    if corpus.shards and config.decode == Decode.GPU:
        raise ConfigError(
            "--decode gpu reads loose image files; tar shards are decoded on CPU (--decode cpu)."
        )
    done = output.resume(config, output.run_record(config, weights.id))  # refuses other options' OUTPUT
    todo, total, skipped = pending(corpus, done)
    if skipped:
        log.warning("resuming: %d images are already in %s and are skipped", skipped, config.output)
    stages = pipeline.Stages.of(config)
    metadata = pipeline.embeddings_metadata(stages, weights.id, dim)
    log.info("extract config: %s", config.to_json())
    started = time.perf_counter()
    counts: dict[str, int] = {}
    if total != 0:
        logs.init_ray()
        resources = pipeline.Resources.of_cluster(config.device)
        rows = pipeline.embedded(stages, todo, ray.put(weights.state_dict), resources, done)
        stats = pipeline.written(rows, config, resources, metadata)
        progress = logs.Progress("extract", total)

        def check(totals: dict[str, int]) -> None:
            progress.update(totals)
            _check_errors(totals, total, config)

        with pipeline.user_errors():
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
