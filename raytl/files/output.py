"""An OUTPUT folder: what it holds, refusing or clearing old results, resuming an interrupted extract."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raytl.config import ExtractConfig
from raytl.errors import StorageError
from raytl.files import storage, writer

# OUTPUT/_run.json: the options an extract was started with; a rerun with the same ones continues it.
RUN_FILE = "_run.json"


# What an OUTPUT holds: the columns that tell a command's results apart.
EMBEDDINGS, PREDICTIONS = "embeddings", "predictions"
_KIND_COLUMN = {EMBEDDINGS: "embedding", PREDICTIONS: "predicted_label"}


def check_unheld(output: str, marker: str, what: str, overwrite: bool) -> None:
    """OUT may not hold a result already (its `marker` file, e.g. curve.json), unless --overwrite."""
    fs, path = storage.filesystem(output)
    with storage.guarded(f"read OUT {output}"):
        held = fs.exists(f"{path.rstrip('/')}/{marker}")
    if held and not overwrite:
        raise StorageError(
            f"OUT {storage.redact(output)} already holds {what} ({marker}); pass --overwrite to replace it "
            "or choose another OUT."
        )


def check_apart(output: str, inputs: dict[str, str | None]) -> None:
    """Refuse an OUTPUT that is one of the inputs or inside one (its results would land among, or replace,
    what the run reads). `inputs`: option name -> URI (None: not given)."""
    for name, uri in inputs.items():
        if uri and storage.is_within(output, uri):
            where = "is" if storage.location(output) == storage.location(uri) else "is inside"
            raise StorageError(
                f"OUTPUT {storage.redact(output)} {where} {name} {storage.redact(uri)}: raytl would write "
                f"its results among the files it reads; choose an OUTPUT outside {name}."
            )


def prepare_output(output: str, overwrite: bool, kind: str = PREDICTIONS) -> None:
    """Refuse an OUTPUT that already holds raytl results, unless --overwrite (then clear just those); results
    of another kind (embeddings where predictions go) are refused even with --overwrite."""
    fs, root = storage.filesystem(output)
    existing = raytl_files(fs, root.rstrip("/"))
    check_kind(fs, existing, kind, output)
    if existing and not overwrite:
        raise StorageError(
            f"OUTPUT {storage.redact(output)} already holds raytl results ({len(existing)} files); "
            "pass --overwrite to replace them or choose another OUTPUT."
        )
    _remove(fs, existing, output)


def _remove(fs: Any, paths: list[str], output: str) -> None:
    with storage.guarded(f"replace the raytl results in OUTPUT {output}"):
        for path in paths:
            fs.rm(path)


def check_kind(fs: Any, existing: list[str], kind: str, output: str) -> None:
    """Refuse to touch an OUTPUT whose part files are another command's results (never removed)."""
    parts = [p for p in existing if _is_part(p) and f"/{writer.ERRORS_DIR}/" not in p]
    if not parts:
        return
    with storage.guarded(f"read {storage.to_uri(fs, parts[0])}"), fs.open(parts[0], "rb") as f:
        columns = set(pq.read_schema(f).names)
    found = next((k for k, column in _KIND_COLUMN.items() if column in columns), "other Parquet data")
    if found != kind:
        raise StorageError(
            f"OUTPUT {storage.redact(output)} holds {found}, not {kind}, and --overwrite only replaces "
            f"{kind}; choose another OUTPUT."
        )


def run_record(config: ExtractConfig, weights_id: str) -> dict[str, Any]:
    """Option -> value for everything that decides which rows an extract writes and what they hold."""
    return {
        "SOURCE": storage.redact(config.source or ""),
        "--manifest": storage.redact(config.manifest or ""),
        "--weights": weights_id,
        **({"--model": config.model} if config.model != "vgg16" else {}),  # records before --model: vgg16
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
    failed: int = 0  # of the rows, those in `_errors/` parts

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
        check_kind(fs, existing, EMBEDDINGS, config.output)
        with storage.guarded(f"read {run_file}"):
            previous = _read_record(run_file) if fs.exists(f"{root}/{RUN_FILE}") else None
        if previous is None:
            prepare_output(config.output, overwrite=False, kind=EMBEDDINGS)  # raises: unknown options
        assert previous is not None
        for option, value in record.items():
            if previous.get(option) != value:
                raise StorageError(
                    f"OUTPUT {storage.redact(config.output)} holds embeddings made with {option} "
                    f"{previous.get(option)!r}, not {value!r}; rerun with the same options to continue it, "
                    "or pass --overwrite to replace it."
                )
        _remove(fs, [p for p in existing if _is_leftover(p)], config.output)  # half-written when a run died
        parts = [p for p in existing if _is_part(p)]
        with storage.guarded(f"read the part files in OUTPUT {config.output}"):
            rows = {p: _footer_rows(fs, p) for p in parts}
        failed = sum(n for p, n in rows.items() if f"/{writer.ERRORS_DIR}/" in p)
        return Done([storage.to_uri(fs, p) for p in parts], sum(rows.values()), failed)
    check_kind(fs, existing, EMBEDDINGS, config.output)
    _remove(fs, existing, config.output)
    storage.write_bytes(run_file, json.dumps(record, indent=2).encode())
    return NOTHING


def raytl_files(fs: Any, root: str) -> list[str]:
    """Part files, `_errors/` parts, `_summary.json` and `_run.json` under root (nothing else is touched)."""
    with storage.guarded(f"list OUTPUT {storage.to_uri(fs, root)}"):
        return _raytl_files(fs, root)


def _raytl_files(fs: Any, root: str) -> list[str]:
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        raise StorageError(f"OUTPUT {storage.redact(root)} is a file, not a folder.")
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
        raise StorageError(f"{storage.redact(uri)} is not valid JSON; pass --overwrite.") from None


def _footer_rows(fs: Any, part: str) -> int:
    with fs.open(part, "rb") as f:
        return pq.read_metadata(f).num_rows
