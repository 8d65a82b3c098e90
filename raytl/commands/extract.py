"""`raytl extract`: an image corpus to Parquet embeddings, through the whole pipeline (cluster.pipeline)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.compute as pc
import ray

from raytl import errors
from raytl.cluster import pipeline, session
from raytl.config import Decode, ExtractConfig
from raytl.corpus.reader import Corpus, image_schemes, list_corpus
from raytl.errors import ConfigError, ExtractError, StorageError
from raytl.files import doneset, output, storage, writer
from raytl.reporting import logs
from raytl.vision.models import embedding_dim, load_weights, resolved

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
    record = output.run_record(config, weights.id)
    done = output.resume(config, record)  # refuses other options' OUTPUT
    todo, total, skipped = pending(corpus, done)
    if skipped:
        log.warning("resuming: %d images are already in %s and are skipped", skipped, config.output)
    stages = pipeline.Stages.of(config)
    metadata = pipeline.embeddings_metadata(stages, weights.id, dim)
    metadata["schemes"] = image_schemes(config.source, config.manifest, config.allow_schemes)
    log.info("extract config: %s", config.to_json())
    started = time.perf_counter()
    counts: dict[str, int] = {}
    if total != 0:
        counts = _passes(config, record, corpus, todo, done, stages, weights.state_dict, metadata, total)
    embedded, failed = counts.get("embedded", 0), counts.get("failed", 0)
    if corpus.shards and embedded + failed + skipped == 0:  # as for an empty folder, found only once read
        raise StorageError(
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
        "embedding": writer.ran_at(metadata, ran) if (ran := writer.precisions(counts)) else metadata,
    }
    writer.write_summary(config.output, summary)
    return summary


def _passes(
    config: ExtractConfig,
    record: dict[str, Any],
    corpus: Corpus,
    todo: Corpus,
    done: output.Done,
    stages: pipeline.Stages,
    state_dict: dict,
    metadata: dict,
    total: int | None,
) -> dict[str, int]:
    """Embed what OUTPUT does not hold yet; after a pass that lost part of the cluster (a node, a model
    actor), another over what is still missing, up to --max-failures times. The counts of all passes."""
    session.init_ray()
    resources = pipeline.Resources.of_cluster(config.device)
    weights_ref = ray.put(state_dict)
    progress = logs.Progress("extract", total)
    first, failures = done, 0
    while True:
        earlier = _written_since(first, done)  # by earlier passes (nothing the first time)
        try:
            counts = _embed_all(
                stages, todo, weights_ref, resources, done, config, metadata, earlier, progress
            )
            progress.done(counts)
            return counts
        except Exception as exc:
            failures += 1
            if not lost_cluster_part(exc) or failures > config.max_failures:
                raise
            where = storage.redact(config.output)
            log.warning(
                "lost part of the cluster (%s): resuming from what %s holds (retry %d of --max-failures %d)",
                type(exc).__name__, where, failures, config.max_failures,
            )  # fmt: skip
            time.sleep(_SETTLE_SECONDS)
            done = output.resume(config, record)
            todo, left, _ = pending(corpus, done)
            if left == 0:  # the lost pass had written everything
                counts = _written_since(first, done)
                progress.done(counts)
                return counts


def _written_since(first: output.Done, now: output.Done) -> dict[str, int]:
    failed = now.failed - first.failed
    return {"embedded": now.rows - first.rows - failed, "failed": failed}


# Ray Data cancels the lost pass's tasks without waiting for them: a write already under way may still
# land. What OUTPUT holds is read again only once those have had time to end.
_SETTLE_SECONDS = 2.0


def _embed_all(
    stages: pipeline.Stages,
    todo: Corpus,
    weights_ref: Any,
    resources: pipeline.Resources,
    done: output.Done,
    config: ExtractConfig,
    metadata: dict,
    earlier: dict[str, int],
    progress: logs.Progress,
) -> dict[str, int]:
    """One pass of the pipeline over `todo`; the counts of this run so far (`earlier`: rows that passes
    before this one wrote)."""
    rows = pipeline.embedded(stages, todo, weights_ref, resources, done)
    stats = pipeline.written(rows, config, resources, metadata)

    def check(totals: dict[str, int]) -> None:
        totals = {k: totals.get(k, 0) + earlier.get(k, 0) for k in {*totals, *earlier}}
        progress.update(totals)
        _check_errors(totals, progress.total, config)

    with errors.unwrapped():
        counts = writer.sum_counts(stats, check=check)
    counts = {k: counts.get(k, 0) + earlier.get(k, 0) for k in {*counts, *earlier}}
    _check_errors(counts, progress.total, config, final=True)
    return counts


def lost_cluster_part(exc: BaseException) -> bool:
    """Ray lost something the run needed and did not recover it: a node, an actor, a worker, an object
    held only there. What OUTPUT holds is whole, so a new pass over the rest finishes the run; an actor
    whose __init__ raised would only raise again."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return not exc.actor_init_failed
    lost = (ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)
    return isinstance(exc, lost)


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
