"""`raytl pack` (loose files -> WebDataset tar shards, a Ray task a shard) and `raytl list` (a manifest)."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raytl.cluster import session
from raytl.config import ListConfig, PackConfig
from raytl.corpus import reader
from raytl.corpus.reader import Corpus, list_corpus
from raytl.errors import ConfigError, StorageError
from raytl.files import exclusions, storage

log = logging.getLogger(__name__)


def run(config: PackConfig) -> dict:
    """Pack the listed images into PREFIX/00000.tar, 00001.tar, ...: KEY.<ext> (the file's bytes as they
    are), and for labelled images KEY.cls (the class index, an integer by WebDataset's convention, in the
    sorted order of the labels), KEY.txt (the label) and KEY.json (label, class index and source URI);
    returns counts, the classes and the brace pattern.
    The images are shuffled (seeded) first: a listing comes sorted by class, and a reader that streams a
    few shards at a time (training) needs every shard to hold a mix."""
    prefix, shard_size = config.output, config.shard_size
    corpus = _loose(config.source, config.manifest, config.allow_schemes)
    fs, root = storage.filesystem(prefix)
    existing = [p for p in fs.ls(root, detail=False) if p.endswith(".tar")] if fs.exists(root) else []
    if existing and not config.overwrite:
        raise StorageError(
            f"{storage.redact(prefix)} already holds {len(existing)} tar shards; "
            "pass --overwrite to replace them or choose another prefix."
        )
    session.init_ray()
    rows = corpus.table.num_rows
    shards = (rows + shard_size - 1) // shard_size
    table = corpus.table.take(np.random.default_rng(config.seed).permutation(rows))
    classes = sorted({label for label in table["label"].to_pylist() if label})
    pending = [
        _write_shard.remote(i, table.slice(i * shard_size, shard_size), prefix, classes)
        for i in range(shards)
    ]
    written = sum(ray.get(pending))
    pattern = storage.join(prefix, "{" + f"{0:05d}..{shards - 1:05d}" + "}.tar")
    return {
        "images": rows,
        "packed": written,
        "missing": rows - written,
        "shards": shards,
        "classes": classes,  # KEY.cls holds the index into this list
        "pattern": pattern,
    }


@ray.remote(num_cpus=1, max_retries=3)
def _write_shard(index: int, rows: pa.Table, prefix: str, classes: list[str]) -> int:
    """One shard, built in memory and written whole (so a retried task rewrites the same file)."""
    paths, labels = rows["path"].to_pylist(), rows["label"].to_pylist()
    buffer = io.BytesIO()
    packed = 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for j, (path, label, data) in enumerate(zip(paths, labels, storage.fetch_many(paths), strict=True)):
            if isinstance(data, Exception):
                log.warning("not packed, cannot read %s: %s", path, storage.describe_error(data))
                continue
            key = f"{index:05d}{j:06d}"
            extension = posixpath.splitext(path)[1].lower() or ".jpg"
            members = [(key + extension, data)]
            meta: dict[str, Any] = {"label": label, "source": storage.public_uri(path)}
            if label:
                meta["class"] = classes.index(label)
                members += [(key + ".cls", str(meta["class"]).encode()), (key + ".txt", label.encode())]
            members.append((key + ".json", json.dumps(meta).encode()))
            for name, member in members:
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
            packed += 1
    storage.write_bytes(storage.join(prefix, f"{index:05d}.tar"), buffer.getvalue())
    return packed


def write_manifest(config: ListConfig) -> dict[str, Any]:
    """`raytl list`: list a class-per-folder SOURCE once and write (path, label) as Parquet or CSV, less
    the images --exclude's tables list (a cleaned manifest for extract --manifest and pack)."""
    corpus = _loose(config.source, None)
    table, excluded = corpus.table, 0
    if config.exclude:
        table = exclusions.drop(table, exclusions.excluded_paths(config.exclude, config.exclude_rank))
        excluded = corpus.table.num_rows - table.num_rows
    reader.write_manifest(table, config.manifest)
    return {"images": table.num_rows, "excluded": excluded, "ignored_non_images": corpus.ignored,
            "manifest": config.manifest}  # fmt: skip


def _loose(source: str | None, manifest: str | None, allow_schemes: tuple[str, ...] = ()) -> Corpus:
    corpus = list_corpus(source, manifest, allow_schemes=allow_schemes)
    if corpus.shards:
        raise ConfigError(f"SOURCE {storage.redact(source or '')} is already tar shards.")
    return corpus
