"""An OUTPUT folder: what it holds, refusing or clearing old results, resuming an interrupted extract."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raytl import storage, writer
from raytl.config import ExtractConfig

# OUTPUT/_run.json: the options an extract was started with; a rerun with the same ones continues it.
RUN_FILE = "_run.json"


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuse an OUTPUT that already holds raytl results, unless --overwrite (then clear just those)."""
    fs, root = storage.filesystem(output)
    existing = raytl_files(fs, root.rstrip("/"))
    if existing and not overwrite:
        raise storage.StorageError(
            f"OUTPUT {storage.redact(output)} already holds raytl results ({len(existing)} files); "
            "pass --overwrite to replace them or choose another OUTPUT."
        )
    for path in existing:
        fs.rm(path)


def run_record(config: ExtractConfig, weights_id: str) -> dict[str, Any]:
    """Option -> value for everything that decides which rows an extract writes and what they hold."""
    return {
        "SOURCE": storage.redact(config.source or ""),
        "--manifest": storage.redact(config.manifest or ""),
        "--weights": weights_id,
        "--layer": str(config.layer),
        "--pool": str(config.pool),
        "--image-size": config.image_size,
        "--resize-size": config.resize,
        "--precision": str(config.precision),
        "--decode": str(config.decode),
        "--max-pixels": config.max_pixels,
        "--label-field": config.label_field or "",
    }


def resume(config: ExtractConfig, record: dict[str, Any]) -> pa.Array:
    """The paths OUTPUT already holds (embedded or failed) from a run with the same options; starts a new
    record otherwise. Refuses an OUTPUT from other options or an older raytl, unless --overwrite."""
    fs, root = storage.filesystem(config.output)
    root = root.rstrip("/")
    existing = raytl_files(fs, root)
    run_file = storage.join(config.output, RUN_FILE)
    if existing and not config.overwrite:
        previous = _read_record(run_file) if fs.exists(f"{root}/{RUN_FILE}") else None
        if previous is None:
            prepare_output(config.output, overwrite=False)  # raises: results of unknown options
        assert previous is not None
        for option, value in record.items():
            if previous.get(option) != value:
                raise storage.StorageError(
                    f"OUTPUT {storage.redact(config.output)} holds embeddings made with {option} "
                    f"{previous.get(option)!r}, not {value!r}; rerun with the same options to continue it, "
                    "or pass --overwrite to replace it."
                )
        for leftover in [p for p in existing if _is_leftover(p)]:
            fs.rm(leftover)  # a local part half-written when the last run died
        errors = [p for p in existing if _is_part(p) and f"/{writer.ERRORS_DIR}/" in p]
        embedded = [p for p in existing if _is_part(p) and p not in errors]
        chunks = _written_paths(fs, embedded).chunks + _written_paths(fs, errors).chunks
        return pa.chunked_array(chunks, pa.string()).combine_chunks()
    for path in existing:
        fs.rm(path)
    storage.write_bytes(run_file, json.dumps(record, indent=2).encode())
    return pa.array([], pa.string())


def raytl_files(fs: Any, root: str) -> list[str]:
    """Part files, `_errors/` parts, `_summary.json` and `_run.json` under root (nothing else is touched)."""
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        raise storage.StorageError(f"OUTPUT {storage.redact(root)} is a file, not a folder.")
    names = fs.ls(root, detail=False)
    ours = [p for p in names if _is_part(p) or _is_leftover(p) or p.endswith((writer.SUMMARY_FILE, RUN_FILE))]
    errors_dir = f"{root}/{writer.ERRORS_DIR}"
    if fs.exists(errors_dir):
        ours += [p for p in fs.find(errors_dir) if _is_part(p)]
    return ours


def _is_part(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith("part-") and path.endswith(".parquet")


def _is_leftover(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith("part-") and ".parquet.tmp-" in path


def _read_record(uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError:
        raise storage.StorageError(f"{storage.redact(uri)} is not valid JSON; pass --overwrite.") from None


def _written_paths(fs: Any, parts: list[str]) -> pa.ChunkedArray:
    """The `path` column of parts of one schema: each part was written whole, or not at all."""
    if not parts:
        return pa.chunked_array([], pa.string())
    return pq.read_table(parts, filesystem=fs, columns=["path"]).column("path")
