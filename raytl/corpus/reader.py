"""List a corpus: image files under a class-per-folder SOURCE, or the rows of a CSV / Parquet manifest."""

from __future__ import annotations

import gzip
import io
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from raytl.corpus import shards
from raytl.errors import ConfigError, StorageError
from raytl.files import doneset, storage
from raytl.vision.preprocess import IMAGE_EXTENSIONS, is_image

log = logging.getLogger(__name__)

CORPUS_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string())])


@dataclass(frozen=True)
class Corpus:
    """The images to read: `table` has columns path (full URI) and label ("" when unknown)."""

    table: pa.Table
    ignored: int  # files that were listed but are not images
    shards: bool = False  # rows are WebDataset tar shards (path = shard URI), not images
    skip: Any = None  # shards: the SHARD#KEY paths already in OUTPUT (resume; from `doneset.build`)
    keep: pa.Array | None = None  # shards: only these SHARD#KEY paths (a fine-tuning split)
    manifest: Manifest | None = None  # a manifest streamed by Ray Data tasks (`table` is then empty)


@dataclass(frozen=True)
class Manifest:
    """A manifest read by Ray Data tasks, never whole on the driver: only its header is read here."""

    uri: str  # a full URI, or an absolute local path
    rows: int | None  # Parquet: from its footer; CSV: unknown until it has been read
    labels: bool  # it has a `label` column
    allow_schemes: tuple[str, ...] = ()  # other filesystems its paths may name (--allow-schemes)


def list_corpus(
    source: str | None,
    manifest: str | None = None,
    stream: bool = False,
    allow_schemes: tuple[str, ...] = (),
) -> Corpus:
    """List SOURCE or read MANIFEST (stream: leave its rows to Ray Data tasks, for manifests of any size);
    raises StorageError on a missing or empty corpus. A manifest's paths must be on its own filesystem
    unless their scheme is in allow_schemes (see `resolve_manifest_paths`)."""
    if source and "{" in source:  # a brace pattern of WebDataset shards, never listed
        shard_uris = [storage.to_uri(*storage.filesystem(uri)) for uri in shards.expand(source)]
        return Corpus(pa.table([shard_uris, [""] * len(shard_uris)], schema=CORPUS_SCHEMA), 0, shards=True)
    if manifest and stream:
        return Corpus(CORPUS_SCHEMA.empty_table(), 0, manifest=open_manifest(manifest, allow_schemes))
    if manifest:
        corpus = read_manifest(manifest, allow_schemes)
    elif (source or "").lower().endswith(".zip"):
        corpus = list_zip(source or "")
    else:
        corpus = list_folder(source or "")
    if corpus.table.num_rows == 0:
        where = f"manifest {manifest}" if manifest else f"SOURCE {source}"
        raise StorageError(
            f"{storage.redact(where)} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return corpus


def list_folder(source: str) -> Corpus:
    """SOURCE/<label>/<file> -> label from the first folder; files directly in SOURCE get no label."""
    fs, root = storage.filesystem(source)
    root = root.rstrip("/")
    try:
        if not fs.exists(root):
            raise StorageError(
                f"SOURCE {storage.redact(source)} does not exist (no such bucket, prefix or directory)."
            )
        if fs.isfile(root):
            raise StorageError(
                f"SOURCE {storage.redact(source)} is a file; give the folder that holds the images."
            )
        files, unreadable = _utf8_names(sorted(fs.find(root, withdirs=False)), source)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(
            f"SOURCE {storage.redact(source)} cannot be listed: {storage.describe_error(exc)}."
        ) from None
    tars = [storage.to_uri(fs, f) for f in files if shards.is_shard(f)]
    if tars and not any(is_image(f) for f in files):
        log.info("listed %d WebDataset shards under %s", len(tars), source)
        ignored = len(files) - len(tars) + unreadable
        return Corpus(pa.table([tars, [""] * len(tars)], schema=CORPUS_SCHEMA), ignored, True)
    paths, labels = [], []
    for file in files:
        if not is_image(file):
            continue
        relative = file[len(root) :].lstrip("/")
        paths.append(storage.to_uri(fs, file))
        labels.append(relative.split("/", 1)[0] if "/" in relative else "")
    ignored = len(files) - len(paths) + unreadable
    log.info("listed %d images under %s (%d other files ignored)", len(paths), source, ignored)
    return Corpus(pa.table([paths, labels], schema=CORPUS_SCHEMA), ignored=ignored)


def _utf8_names(files: list[str], source: str) -> tuple[list[str], int]:
    """Files whose names are not valid UTF-8 (a local disk can hold any bytes) cannot be written to Parquet:
    they are left out with a warning naming them (escaped), and counted among the ignored files."""
    good = [f for f in files if _is_utf8(f)]
    if len(good) < len(files):
        bad = [os.fsencode(f).decode("utf-8", "backslashreplace") for f in files if not _is_utf8(f)]
        log.warning(
            "%d files under %s are not read: their names are not valid UTF-8 (%s%s)",
            len(bad),
            storage.redact(source),
            ", ".join(bad[:5]),
            ", ..." if len(bad) > 5 else "",
        )
    return good, len(files) - len(good)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_zip(source: str) -> Corpus:
    """A zip of class-per-folder images, read in place: only its central directory is fetched here, and each
    image becomes `zip://MEMBER::SOURCE`, a URI fsspec reads with range requests."""
    target = source if "://" in source else "file://" + os.path.abspath(source)
    name = f"SOURCE {storage.redact(source)}"
    with storage.opening(f"{name} does not exist.", f"{name} is not a readable zip file"):
        fs, _ = storage.filesystem(f"zip://::{target}")
        members = sorted(fs.find("", withdirs=False))
    outside = [m for m in members if ".." in m.split("/")]  # `../b/up.png`: no label, no folder of SOURCE
    if outside:
        log.warning(
            "%d zip members with `..` in their names are not read (e.g. %s)", len(outside), outside[0]
        )
    images = [m.lstrip("/") for m in members if is_image(m) and m not in outside]
    tops = {m.split("/", 1)[0] for m in images}
    # A zip of the corpus folder itself (corpus/<label>/<file>): labels are one level down.
    depth = 1 if len(tops) == 1 and all(m.count("/") >= 2 for m in images) else 0
    labels = [m.split("/")[depth] if m.count("/") > depth else "" for m in images]
    paths = [f"zip://{m}::{target}" for m in images]
    return Corpus(pa.table([paths, labels], schema=CORPUS_SCHEMA), ignored=len(members) - len(images))


def read_manifest(manifest: str, allow_schemes: tuple[str, ...] = ()) -> Corpus:
    """A CSV or Parquet file with `path` and optional `label`; relative paths are taken from its folder."""
    name = f"--manifest {storage.redact(manifest)}"
    with storage.opening(f"{name}: no such file.", f"{name} cannot be read"):
        data = storage.read_bytes(manifest)
    table = _parse_manifest(manifest, data)
    if "path" not in table.column_names:
        raise StorageError(
            f"--manifest {storage.redact(manifest)} has no `path` column "
            f"(columns: {', '.join(table.column_names)})."
        )
    return Corpus(_manifest_block(table, manifest, allow_schemes), ignored=0)


def open_manifest(manifest: str, allow_schemes: tuple[str, ...] = ()) -> Manifest:
    """Check a manifest from its header alone (Parquet footer, first CSV line): format, `path`, rows."""
    name, where = manifest.lower(), f"--manifest {storage.redact(manifest)}"
    fs, path = storage.filesystem(manifest)
    with storage.opening(f"{where}: no such file.", f"{where} cannot be read"):
        with fs.open(path, "rb") as f:
            if name.endswith((".parquet", ".pq")):
                footer = pq.read_metadata(f)
                columns, rows = footer.schema.to_arrow_schema().names, footer.num_rows
            elif name.endswith((".csv", ".csv.gz", ".tsv")):
                head = (gzip.GzipFile(fileobj=f) if name.endswith(".gz") else f).read(1 << 16)
                lines = head.decode("utf-8", "replace").splitlines()
                delimiter = "\t" if name.endswith(".tsv") else ","
                columns = [c.strip().strip('"') for c in lines[0].split(delimiter)] if lines else []
                rows = None if any(line.strip() for line in lines[1:]) else 0
            else:
                raise StorageError(f"{where} must end in .csv, .csv.gz, .tsv or .parquet.")
    if "path" not in columns:
        raise StorageError(f"{where} has no `path` column (columns: {', '.join(columns)}).")
    if rows == 0:
        raise StorageError(f"{where} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return Manifest(storage.to_uri(fs, path), rows, "label" in columns, allow_schemes)


def manifest_rows(
    manifest: Manifest, rows_per_block: int | None = None, skip: Any = None
) -> ray.data.Dataset:
    """The manifest as a stream of (path, label) rows read by Ray Data tasks, less `skip` (a done set from
    `doneset.build`), in blocks of rows_per_block rows."""
    fs, path = storage.pyarrow_filesystem(manifest.uri)
    columns = ["path", "label"] if manifest.labels else ["path"]
    name = manifest.uri.lower()
    if name.endswith((".parquet", ".pq")):
        rows = ray.data.read_parquet(path, filesystem=fs, columns=columns, partitioning=None)
    else:
        rows = ray.data.read_csv(
            path,
            filesystem=fs,
            partitioning=None,  # type: ignore[arg-type]  # no key=value columns from the manifest's folders
            arrow_open_stream_args={"compression": "gzip"} if name.endswith(".gz") else None,
            parse_options=pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ","),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, include_columns=columns
            ),
        )
    rows = rows.map_batches(
        _manifest_block,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"uri": manifest.uri, "allow_schemes": manifest.allow_schemes, "skip": skip},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )
    # Small blocks, so that decoding spreads over the cluster from the first rows on (a streaming split).
    return rows if rows_per_block is None else rows.repartition(target_num_rows_per_block=rows_per_block)


def _manifest_block(block: pa.Table, uri: str, allow_schemes: tuple[str, ...], skip: Any = None) -> pa.Table:
    """Manifest rows -> (path as a full URI, label "" when missing), less `skip`; an empty path, or one on
    a filesystem the manifest may not name, stops the run."""
    paths = _strings(block["path"])
    if "" in paths:
        raise StorageError(f"--manifest {storage.redact(uri)} has an empty `path`.")
    paths = resolve_manifest_paths(paths, uri, allow_schemes)
    labels = _strings(block["label"]) if "label" in block.column_names else [""] * len(paths)
    table = pa.table([paths, labels], schema=CORPUS_SCHEMA)
    return table if skip is None else table.filter(pa.array(~doneset.contains(skip, paths)))


def image_schemes(source: str | None, manifest: str | None, allow_schemes: Sequence[str] = ()) -> list[str]:
    """The filesystems a corpus's image paths may be on: its SOURCE's (or its manifest's) and those
    --allow-schemes adds. Recorded with the embeddings (`schemes`), so that what reads their paths later
    (the report's thumbnails) reads nothing the corpus could not."""
    return sorted({storage.scheme_of(source or manifest or ""), *allow_schemes})


def resolve_manifest_paths(paths: list[str], manifest: str, allow_schemes: tuple[str, ...] = ()) -> list[str]:
    """A manifest's paths as full URIs on the manifest's own filesystem: relative ones are taken from its
    folder; absolute paths and URIs must be on the same filesystem (an S3 manifest names S3 objects, a
    local one local files), unless their scheme is in allow_schemes (`file` for worker-local paths, `http`,
    `https`, `gs`, ...). Otherwise a manifest from elsewhere could make the workers read their own disks
    or fetch internal URLs, and write what they found to OUTPUT."""
    fs, manifest_path = storage.filesystem(manifest)
    own = storage.scheme_of(manifest)
    folder = posixpath.dirname(manifest_path)
    resolved = []
    for path in paths:
        storage.check_chain(path, f"--manifest {storage.redact(manifest)} lists {storage.redact(path)}")
        scheme = storage.scheme_of(path)
        if "://" not in path and not path.startswith("/"):  # relative: beside the manifest
            path = storage.to_uri(fs, posixpath.normpath(posixpath.join(folder, path)))
        elif scheme != own and scheme not in allow_schemes:
            raise StorageError(
                f"--manifest {storage.redact(manifest)} lists {storage.redact(path)}, which is on another "
                f"filesystem ({scheme}) than the manifest ({own}); pass --allow-schemes {scheme} to read it."
            )
        elif scheme == "file" and path.startswith("/"):
            path = os.path.abspath(path)
        resolved.append(path)
    return resolved


def write_manifest(table: pa.Table, manifest: str) -> None:
    """A manifest (path, label, ... columns) written as Parquet or CSV, by MANIFEST's suffix."""
    sink = io.BytesIO()
    if manifest.lower().endswith((".parquet", ".pq")):
        pq.write_table(table, sink)
    elif manifest.lower().endswith(".csv"):
        pacsv.write_csv(table, sink)
    else:
        raise ConfigError(f"MANIFEST must end in .parquet or .csv, not {manifest!r}.")
    storage.write_bytes(manifest, sink.getvalue())


def _parse_manifest(manifest: str, data: bytes) -> pa.Table:
    name = manifest.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(io.BytesIO(data))
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            delimiter = "\t" if name.endswith(".tsv") else ","
            return pacsv.read_csv(
                pa.CompressedInputStream(pa.BufferReader(data), "gzip")
                if name.endswith(".gz")
                else pa.BufferReader(data),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={"path": pa.string(), "label": pa.string()}
                ),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(
            f"--manifest {storage.redact(manifest)} is not valid {name.rsplit('.', 1)[-1].upper()}: "
            f"{storage.describe_error(exc)}."
        ) from None
    raise StorageError(f"--manifest {storage.redact(manifest)} must end in .csv, .csv.gz, .tsv or .parquet.")


def _strings(column: pa.ChunkedArray) -> list[str]:
    return ["" if v is None else str(v) for v in column.to_pylist()]
