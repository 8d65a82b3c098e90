"""--exclude: the rows that tables say to leave out of training (train, finetune) or of a manifest (list).
raytl audit's tables say it by their columns: duplicates.parquet lists every member of a group and marks
the one kept (`keep`); label_issues.parquet ranks its rows (`rank`, cut by --exclude-rank); leakage.parquet,
or any other table with a `path` column, lists only rows to leave out."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raytl.errors import ConfigError, DatasetError, StorageError
from raytl.files import storage


def excluded_paths(tables: Sequence[str], rank: int | None = None) -> pa.Array:
    """The paths the tables leave out, each once, sorted (an Arrow array, for `pc.is_in`)."""
    found: set[str] = set()
    for uri in tables:
        found.update(listed(read_table(uri), rank))
    return pa.array(sorted(found), pa.string())


def read_table(uri: str) -> pa.Table:
    """A Parquet or CSV table with a `path` column."""
    name = f"--exclude {storage.redact(uri)}"
    lower = uri.lower()
    if not lower.endswith((".parquet", ".pq", ".csv")):
        raise ConfigError(f"{name} must end in .parquet or .csv.")
    with storage.opening(f"{name}: no such file.", f"{name} cannot be read"):
        data = storage.read_bytes(uri)
    try:
        if lower.endswith(".csv"):
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(
                column_types={"path": pa.string()}))  # fmt: skip
        else:
            table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"{name} is not a readable table: {storage.describe_error(exc)}.") from None
    if "path" not in table.column_names:
        raise DatasetError(f"{name} has no `path` column (columns: {', '.join(table.column_names)}).")
    return table


def listed(table: pa.Table, rank: int | None) -> list[str]:
    """The paths one table leaves out: a duplicates table all but the kept member of each group; a ranked
    table (label issues) those ranked up to `rank` (all when None); any other table every path."""
    keep = np.ones(table.num_rows, dtype=bool)
    if "keep" in table.column_names:
        keep = ~np.asarray(table["keep"].fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
    elif "rank" in table.column_names and rank is not None:
        keep = np.asarray(table["rank"].fill_null(rank + 1).to_numpy(zero_copy_only=False)) <= rank
    paths = table["path"].to_pylist()
    return [p for p, k in zip(paths, keep, strict=True) if k and p]


def drop(batch: pa.Table, excluded: pa.Array) -> pa.Table:
    """The rows of a batch whose path is not excluded."""
    return batch.filter(pc.invert(pc.is_in(batch["path"], value_set=excluded)))
