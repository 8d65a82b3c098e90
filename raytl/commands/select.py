"""`raytl select`: which unlabelled rows (label empty) of EMBEDDINGS to label next, written as a manifest
(path, rank, score, strategy) that `raytl extract --manifest`, labelling tools and spreadsheets read.

One streamed Ray Data pass scores every unlabelled row (a seeded hash, or a model's uncertainty) and keeps
the best-scored candidates only; the selection itself (k-means and typicality, k-center, clusters of the
most uncertain) runs on the driver over that compact set."""

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
    rows, scores = choose(config, best, covered)
    table = pa.table(
        {
            "path": pa.array(best.path[rows].tolist(), pa.string()),
            "rank": pa.array(np.arange(1, len(rows) + 1), pa.int64()),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([str(config.strategy)] * len(rows), pa.string()),
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


def choose(config: SelectConfig, best: select.Best, covered: select.Best) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the candidates, scores) of the picks, in rank order."""
    assert best.x is not None
    x = best.x.astype(np.float64)
    known = None if covered.x is None or not len(covered.x) else covered.x.astype(np.float64)
    if config.strategy == Strategy.TYPICAL:
        return select.typical(x, config.budget, config.seed, known)
    if config.strategy == Strategy.KCENTER:
        return select.kcenter(x, config.budget, 0, known)  # no labels: from the first by the seeded hash
    if config.strategy == Strategy.MARGIN_DIVERSE:
        return select.diverse(x, best.score, config.budget, config.seed)
    return np.arange(config.budget), best.score[: config.budget]
