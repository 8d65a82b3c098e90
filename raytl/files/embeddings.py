"""Open a raytl embeddings dataset: find its part files, check their schema and metadata, read it with Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.errors import DatasetError
from raytl.files import storage
from raytl.files.writer import METADATA_KEY

# Metadata fields that must agree between datasets used together (a probe and what it classifies).
BACKBONE_FIELDS = ("model", "weights", "layer", "pool", "dim", "image_size")


def backbone_label(metadata: dict[str, Any]) -> str:
    """How embeddings' metadata names their backbone in `inspect` and the report: `VGG16 pool5 (avg)`,
    `VGG16 fc7`, `resnet50 penultimate` (metadata from before --model: VGG16's)."""
    model = metadata.get("model", "vgg16")
    if model != "vgg16":
        return f"{model} penultimate"
    pool = metadata.get("pool")
    return f"VGG16 {metadata.get('layer', '?')}" + (f" ({pool})" if pool else "")


@dataclass(frozen=True)
class Embeddings:
    """A checked dataset: its part files, the embedding length D and the `raytl` metadata."""

    uri: str
    files: list[str]  # full URIs
    dim: int
    metadata: dict[str, Any]
    rows: int  # from the Parquet footers (before `excluded`)
    excluded: pa.Array | None = None  # paths that read() leaves out (--exclude)

    def backbone(self) -> dict[str, Any]:
        return {k: self.metadata.get(k) for k in BACKBONE_FIELDS}

    def read(self) -> Any:
        """The rows as a Ray dataset (streamed, never gathered on the driver)."""
        import ray

        from raytl.files.exclusions import drop

        fs, _ = storage.filesystem(self.uri)
        rows = ray.data.read_parquet([storage.filesystem(f)[1] for f in self.files], filesystem=fs)
        if self.excluded is None or len(self.excluded) == 0:
            return rows
        return rows.map_batches(
            drop,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
            fn_kwargs={"excluded": self.excluded},
            batch_format="pyarrow",
        )


def is_embeddings(uri: str) -> bool:
    """True when URI is a folder holding raytl Parquet part files."""
    try:
        return bool(_part_files(uri))
    except Exception:
        return False


def open_embeddings(uri: str, option: str = "EMBEDDINGS") -> Embeddings:
    """Find and check every part file's schema (footers only); raises DatasetError, or StorageError when
    the storage fails."""
    with storage.guarded(f"read {option} {uri}"):
        return _open(uri, option)


def _open(uri: str, option: str) -> Embeddings:
    files = _part_files(uri)
    if not files:
        raise DatasetError(f"{option} {storage.redact(uri)} holds no raytl embeddings (part-*.parquet).")
    dims, metas, rows = {}, {}, 0
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as f:
            footer = pq.ParquetFile(f).metadata
        schema = footer.schema.to_arrow_schema()
        rows += footer.num_rows
        dims[file] = _dim(schema, file, option)
        raw = (schema.metadata or {}).get(METADATA_KEY)
        metas[file] = json.loads(raw) if raw else {}
    first = files[0]
    for file in files[1:]:
        if dims[file] != dims[first]:
            raise DatasetError(
                f"{option} {storage.redact(uri)} mixes embedding dimensions: {dims[first]} in "
                f"{_name(first)} but {dims[file]} in {_name(file)}."
            )
        for key in BACKBONE_FIELDS:
            if metas[file].get(key) != metas[first].get(key):
                raise DatasetError(
                    f"{option} {storage.redact(uri)} mixes embeddings made differently: {key} is "
                    f"{metas[first].get(key)!r} in {_name(first)} but {metas[file].get(key)!r} "
                    f"in {_name(file)}."
                )
    return Embeddings(uri, files, dims[first], metas[first], rows)


def check_same_backbone(expected: dict[str, Any], got: Embeddings, what: str) -> None:
    """Raise DatasetError unless `got` was made by the backbone a model expects."""
    for key in BACKBONE_FIELDS:
        if got.metadata.get(key) != expected.get(key):
            raise DatasetError(
                f"{what} {storage.redact(got.uri)} has {key} {got.metadata.get(key)!r}, but the model "
                f"expects {expected.get(key)!r}."
            )


def matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """An embedding column (fixed_size_list, or Ray's tensor type) -> float32 (N, D), zero-copy if it can."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        if column.null_count:
            raise DatasetError(f"{column.null_count} embeddings are null.")
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
    return np.asarray(column.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


def _part_files(uri: str) -> list[str]:
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise DatasetError(f"{storage.redact(uri)} does not exist.")
    names = fs.ls(root, detail=False) if fs.isdir(root) else []
    parts = [p for p in names if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")]
    return sorted(storage.to_uri(fs, p) for p in parts)


def _dim(schema: pa.Schema, file: str, option: str) -> int:
    if "embedding" not in schema.names:
        raise DatasetError(f"{option} file {_name(file)} has no `embedding` column.")
    kind = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
        raise DatasetError(
            f"{option} file {_name(file)} has embedding type {kind}, not fixed_size_list<float>."
        )
    return kind.list_size


def _name(file: str) -> str:
    return storage.redact(file.rsplit("/", 1)[-1])
