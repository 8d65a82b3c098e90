"""`raytl select`: which unlabelled rows (label empty) of EMBEDDINGS to label next, written as a manifest
(path, rank, score, strategy) that `raytl extract --manifest`, labelling tools and spreadsheets read.

One streamed Ray Data pass scores every unlabelled row (a seeded hash, or a model's uncertainty) and keeps
the best-scored candidates only; the selection itself (k-means and typicality, k-center, clusters of the
most uncertain) runs on the driver over that compact set. typical on a pool larger than its sample takes a
second pass: every unlabelled row's nearest centre of the clusters fitted on the sample, each cluster's
size over the whole pool and its rows nearest the centre, among which typicality picks."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from raytl.cluster import session
from raytl.config import MODEL_STRATEGIES, SelectConfig, Strategy
from raytl.corpus.reader import write_manifest
from raytl.errors import DatasetError, StorageError
from raytl.files import storage
from raytl.files.embeddings import check_same_backbone, matrix, open_embeddings
from raytl.files.output import check_apart
from raytl.modeling import select
from raytl.modeling.classifier import Model

log = logging.getLogger(__name__)


def run(config: SelectConfig) -> dict[str, Any]:
    """Check inputs, score the pool, select, write OUT; returns the summary."""
    data = open_embeddings(config.embeddings)
    model = Model.load(config.model) if config.model else None
    if model is not None:
        check_same_backbone(model.info.recorded_backbone, data, "EMBEDDINGS")
    check_apart(config.output, {"EMBEDDINGS": config.embeddings})
    fs, path = storage.filesystem(config.output)
    with storage.guarded(f"read OUT {config.output}"):
        exists = fs.exists(path)
    if exists and not config.overwrite:
        raise StorageError(
            f"OUT {storage.redact(config.output)} exists; pass --overwrite to replace it or choose another "
            "OUT."
        )
    session.init_ray()
    best, covered = pool_pass(config, data, model)
    if best.seen == 0:
        raise DatasetError(
            f"EMBEDDINGS {storage.redact(config.embeddings)} has no unlabelled rows (label empty) to select "
            "from."
        )
    if config.budget > best.seen:
        raise DatasetError(
            f"--budget {config.budget} is more than the {best.seen} unlabelled rows of EMBEDDINGS."
        )
    paths, scores = choose(config, best, covered, data)
    table = pa.table(
        {
            "path": pa.array(paths.tolist(), pa.string()),
            "rank": pa.array(np.arange(1, len(paths) + 1), pa.int64()),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([str(config.strategy)] * len(paths), pa.string()),
        }
    )
    write_manifest(table, config.output)
    return {
        "selected": table.num_rows,
        "unlabelled": best.seen,
        "strategy": str(config.strategy),
        "output": storage.redact(config.output),
    }


def score_batch(batch: pa.Table, dim: int, strategy: Strategy, seed: int, model: Model | None) -> dict:
    """The unlabelled rows of a batch: path, embedding, score (higher: label it sooner) and a tie-breaker."""
    labels = batch["label"].to_pylist()
    unlabelled = np.fromiter((label is None or label == "" for label in labels), bool, len(labels))
    paths = np.array(batch["path"].to_pylist(), dtype=object)
    x = matrix(batch["embedding"], dim)
    tie = select.hashed(paths.tolist(), seed)
    score = tie  # random, and the seeded samples typical and kcenter work on
    if model is not None and strategy in MODEL_STRATEGIES:
        use = Strategy.MARGIN if strategy == Strategy.MARGIN_DIVERSE else strategy
        score = select.uncertainty(model.logits(x), use)
    return {"path": paths, "x": x, "score": score, "tie": tie, "unlabelled": unlabelled}


def pool_pass(config: SelectConfig, data: Any, model: Model | None) -> tuple[select.Best, select.Best]:
    """One streamed pass over EMBEDDINGS: the best-scored unlabelled candidates (and how many rows are
    unlabelled), and for typical and kcenter a seeded sample of the labelled rows."""
    best = select.Best(select.candidates(config.strategy, config.budget))
    cold = config.strategy in (Strategy.TYPICAL, Strategy.KCENTER)
    covered = select.Best(select.COVERED if cold else 0)
    scored = data.read().map_batches(
        score_batch,
        fn_kwargs={"dim": data.dim, "strategy": config.strategy, "seed": config.seed, "model": model},
        batch_format="pyarrow",
    )
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        pool, known = batch["unlabelled"], ~batch["unlabelled"]
        best.add(batch["score"][pool], batch["tie"][pool], batch["path"][pool], batch["x"][pool])
        if cold:
            covered.add(batch["tie"][known], batch["tie"][known], batch["path"][known], batch["x"][known])
    return best, covered


def assign_batch(batch: pa.Table, dim: int, seed: int, centres: np.ndarray) -> dict:
    """The unlabelled rows of a batch with their nearest centre and its distance (typical's second pass)."""
    scored = score_batch(batch, dim, Strategy.TYPICAL, seed, None)
    pool = scored["unlabelled"]
    cluster, distance = select.nearest_centre(scored["x"][pool].astype(np.float64), centres)
    kept = {name: scored[name][pool] for name in ("tie", "path", "x")}
    return {"cluster": cluster, "distance": distance, **kept}


def near_centre_pass(config: SelectConfig, data: Any, clusters: select.Clusters) -> select.NearCentre:
    """A second streamed pass, over every unlabelled row: its cluster (the nearest of the centres fitted on
    the sample), each cluster's size over the whole pool and the rows nearest each centre."""
    near = select.NearCentre(len(clusters.centres), select.NEAR_CENTRE)
    assigned = data.read().map_batches(
        assign_batch,
        fn_kwargs={"dim": data.dim, "seed": config.seed, "centres": clusters.centres},
        batch_format="pyarrow",
    )
    for batch in assigned.iter_batches(batch_size=None, batch_format="numpy"):
        near.add(batch["cluster"], batch["distance"], batch["tie"], batch["path"], batch["x"])
    return near


def choose(
    config: SelectConfig, best: select.Best, covered: select.Best, data: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(paths, scores) of the picks, in rank order. typical on a pool larger than its sample (`data`
    given): the clusters fitted on the sample, then every row's cluster and typicality from a second pass."""
    assert best.x is not None
    x = best.x.astype(np.float64)
    known = None if covered.x is None or not len(covered.x) else covered.x.astype(np.float64)
    if config.strategy == Strategy.TYPICAL and data is not None and best.seen > len(best.path):
        clusters = select.Clusters.fit(x, config.budget, config.seed, known)
        near = near_centre_pass(config, data, clusters)
        assert near.keep.x is not None
        rows, scores = select.most_typical(
            near.keep.x.astype(np.float64), near.cluster, near.sizes, clusters.taken, config.budget
        )
        return near.keep.path[rows], scores
    rows, scores = _choose_among(config, x, best.score, known)
    return best.path[rows], scores


def _choose_among(
    config: SelectConfig, x: np.ndarray, score: np.ndarray, known: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the candidates `x`, scores) of the picks, in rank order."""
    if config.strategy == Strategy.TYPICAL:
        return select.typical(x, config.budget, config.seed, known)
    if config.strategy == Strategy.KCENTER:
        return select.kcenter(x, config.budget, 0, known)  # no labels: from the first by the seeded hash
    if config.strategy == Strategy.MARGIN_DIVERSE:
        return select.diverse(x, score, config.budget, config.seed)
    return np.arange(config.budget), score[: config.budget]
