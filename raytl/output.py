"""An OUTPUT folder: what it holds, refusing or clearing old results, resuming an interrupted extract."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

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


@dataclass(frozen=True)
class Done:
    """What OUTPUT already holds from an interrupted run: part files (embedded and `_errors/`, each written
    whole or not at all) and their row count, read from the footers."""

    parts: list[str]  # full URIs
    rows: int

    def paths(self) -> pa.Array:
        """Their `path` column, read here (on the driver)."""
        if not self.parts:
            return pa.array([], pa.string())
        chunks = [
            pq.read_table(path, filesystem=fs, columns=["path"])["path"]
            for fs, path in map(storage.filesystem, self.parts)
        ]
        return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], pa.string()).combine_chunks()

    def dataset(self) -> ray.data.Dataset:
        """Their `path` column as a Ray Dataset, read by tasks: for resuming runs too large for the driver."""
        fs, _ = storage.pyarrow_filesystem(self.parts[0])
        paths = [storage.filesystem(p)[1] for p in self.parts]
        return ray.data.read_parquet(paths, filesystem=fs, columns=["path"], partitioning=None)


NOTHING = Done([], 0)


def resume(config: ExtractConfig, record: dict[str, Any]) -> Done:
    """What OUTPUT already holds (embedded or failed) from a run with the same options; starts a new
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
        parts = [p for p in existing if _is_part(p)]
        rows = sum(_footer_rows(fs, p) for p in parts)
        return Done([storage.to_uri(fs, p) for p in parts], rows)
    for path in existing:
        fs.rm(path)
    storage.write_bytes(run_file, json.dumps(record, indent=2).encode())
    return NOTHING


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


def _footer_rows(fs: Any, part: str) -> int:
    with fs.open(part, "rb") as f:
        return pq.read_metadata(f).num_rows
