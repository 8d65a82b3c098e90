"""Write embedded rows as Parquet part files and failed rows to `_errors/`, under deterministic names."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytl.files import storage

ERRORS_DIR = "_errors"
SUMMARY_FILE = "_summary.json"
METADATA_KEY = b"raytl"
PRECISION = "precision"  # the model actors' column of the precision they ran at (not written)
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])


def embeddings_schema(dim: int, metadata: dict) -> pa.Schema:
    """The contract: path, label, embedding fixed_size_list<float32>[D], metadata key `raytl`."""
    return pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
        metadata=schema_metadata(metadata),
    )


def schema_metadata(metadata: dict) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}


def precisions(counts: dict[str, int]) -> str | None:
    """The precisions the model actors ran at, from the written parts' counts ("fp32"; "bf16,fp32" for a
    cluster of both kinds of node); None when this run embedded nothing."""
    ran = sorted(k.split(":", 1)[1] for k in counts if k.startswith(f"{PRECISION}:"))
    return ",".join(ran) or None


def ran_at(metadata: dict, precision: str) -> dict:
    """The metadata with `precision` what the model actor ran at (--precision auto: bf16 or fp32 by its
    hardware) and `precision_option` what was asked, when the two differ."""
    if metadata.get("precision") == str(precision):
        return metadata
    return {**metadata, "precision": str(precision), "precision_option": metadata.get("precision")}


def write_part(batch: pa.Table, output: str, schema: pa.Schema) -> pa.Table:
    """Write the schema's columns of a batch's good rows, and failed rows to _errors; returns counts.

    The batch has an `error` column ("" for good rows); a `correct` column (predictions) is counted too.
    """
    # Named after the batch's contents: a retried task rewrites the same files instead of adding rows.
    name = "part-" + _digest(batch.column("path")) + ".parquet"
    # No password in a `path` (https://user:pw@...): outputs are read by people and tools beyond raytl.
    column = batch.column_names.index("path")
    batch = batch.set_column(column, "path", storage.public_uris(batch.column("path")))
    failed = batch.filter(pc.not_equal(batch.column("error"), ""))
    embedded = batch.filter(pc.equal(batch.column("error"), ""))
    if embedded.num_rows:
        if PRECISION in embedded.column_names:  # a batch is one actor's: one precision
            ran = embedded.column(PRECISION)[0].as_py()
            schema = schema.with_metadata(
                schema_metadata(ran_at(json.loads(schema.metadata[METADATA_KEY]), ran))
            )
        rows = embedded.select(schema.names).cast(schema)
        storage.write_bytes(storage.join(output, name), _parquet(rows))
    if failed.num_rows:
        rows = failed.select(["path", "error"]).cast(ERRORS_SCHEMA)
        storage.write_bytes(storage.join(output, ERRORS_DIR, name), _parquet(rows))
    counts = {"embedded": [embedded.num_rows], "failed": [failed.num_rows]}
    if PRECISION in embedded.column_names and embedded.num_rows:  # rows embedded at each precision
        counts[f"{PRECISION}:{embedded.column(PRECISION)[0].as_py()}"] = [embedded.num_rows]
    if "correct" in batch.column_names:  # predictions with known labels
        correct = embedded["correct"]
        counts["labelled"] = [len(correct) - correct.null_count]
        counts["correct"] = [pc.sum(correct.cast(pa.int64())).as_py() or 0]
    return pa.table(counts)


def sum_counts(stats: Any, check: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
    """Add up the count tables that write_part returned, as they stream in; `check` sees each new total
    and may raise to stop the run."""
    totals: dict[str, int] = {}
    batches = iter(stats.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            for name in batch.column_names:
                totals[name] = totals.get(name, 0) + (pc.sum(batch[name]).as_py() or 0)
            if check is not None:
                check(totals)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # a run stopped early shuts its tasks and actors down now, not when collected
    return totals


def _digest(paths: pa.ChunkedArray) -> str:
    h = hashlib.sha256()
    for path in paths.to_pylist():
        h.update(path.encode() + b"\0")
    return h.hexdigest()[:24]


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_summary(output: str, summary: dict) -> None:
    """OUTPUT/_summary.json: counts, wall time, throughput and the config."""
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
