"""Synthetic raytl embeddings datasets (Gaussian classes), written exactly as `raytl extract` writes them."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.files import storage
from raytl.files.writer import embeddings_schema

BACKBONE = {
    "model": "vgg16",
    "weights": "random:seed=0",
    "layer": "pool5",
    "pool": "avg",
    "image_size": 32,
    "precision": "fp32",
    "preprocessing": {"resize": 37, "center_crop": 32},
}


def blobs(n: int, classes: int, dim: int, seed: int, spread: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with features on different scales (so standardisation matters)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(0, 1, (classes, dim))
    y = rng.integers(0, classes, n)
    scales = np.linspace(0.1, 20, dim)
    x = (centres[y] + rng.normal(0, spread, (n, dim))) * scales + 5
    return x.astype(np.float32), y


def entangled(
    n: int, seed: int, outliers: float = 0.0, classes: int = 3, dim: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """Classes whose means sit along large shared nuisance factors, so the direction that separates them
    is found slowly (accuracy climbs for tens of epochs), as with real embeddings' correlated features.
    `outliers`: that share of rows is pushed 300x further out and mislabelled, so that a linear model's
    held-out loss grows with its weights' norm from the first epoch on while its accuracy climbs."""
    centres = np.random.default_rng(1234).normal(0, 1, (classes, dim))
    loadings = np.random.default_rng(99).normal(0, 1, (3, dim)) + centres[np.arange(3) % classes]
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, 1, (n, dim)) + 6 * rng.normal(0, 1, (n, 3)) @ loadings
    far = rng.random(n) < outliers
    x = np.where(far[:, None], 300 * x, x)
    return x.astype(np.float32), np.where(far, (y + 1) % classes, y)


def write(uri: str, x: np.ndarray, labels: list, parts: int = 3, prefix: str = "img", **meta) -> list[str]:
    """Write rows as `parts` part files under uri; returns the row paths."""
    dim = x.shape[1]
    schema = embeddings_schema(dim, {**BACKBONE, "dim": dim, **meta})
    paths = [f"s3://corpus/{prefix}-{i:05d}.jpg" for i in range(len(x))]
    for k, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        table = pa.table(
            [
                pa.array([paths[i] for i in rows], pa.string()),
                pa.array([labels[i] for i in rows], pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1)), dim),
            ],
            schema=schema,
        )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(uri, f"part-{prefix}-{k:03d}.parquet"), sink.getvalue())
    return paths


def names(y: np.ndarray) -> list[str]:
    return [f"class-{int(v)}" for v in y]
