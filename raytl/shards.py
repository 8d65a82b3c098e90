"""WebDataset tar shards: expand a SOURCE pattern, and read a shard's samples as decoded rows (CPU tasks)."""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from raytl import doneset, storage
from raytl.preprocess import ImageError, Transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand(pattern: str) -> list[str]:
    """`s3://b/shards/{00000..00099}.tar` -> the 100 URIs (zero padding kept); `{a,b}` lists work too."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    head, tail, body = pattern[: found.start()], pattern[found.end() :], found.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        first, last = span.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [uri for choice in choices for uri in expand(head + choice + tail)]


def is_shard(path: str) -> bool:
    return path.lower().endswith(".tar")


def read_shards(
    batch: dict[str, np.ndarray],
    transform: Transform,
    label_field: str | None,
    batch_size: int,
    skip: Any = None,
    keep: Any = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of shard URIs -> batches of (path `SHARD#KEY`, label, image, error), streamed member by member;
    samples in `skip` (a done set from `doneset.build`) are left out, and only those in `keep` (a set or a
    reference to one) are read when it is given."""
    keep = _resolve(keep)
    rows: list[tuple[str, str, np.ndarray | None, str]] = []
    for shard in (str(p) for p in batch["path"]):
        for key, members in samples(shard):
            path = f"{shard}#{key}"
            if (keep is None or path in keep) and (skip is None or not doneset.contains(skip, [path])[0]):
                rows.append(_row(path, members, transform, label_field))
            if len(rows) == batch_size:
                yield _batch(rows, transform.image_size)
                rows = []
    if rows:
        yield _batch(rows, transform.image_size)


def sample_labels(batch: dict[str, np.ndarray], label_field: str | None) -> dict[str, np.ndarray]:
    """Rows of shard URIs -> (path `SHARD#KEY`, label) of every sample with an image member, images left
    undecoded: the listing fine-tuning splits ("" where the label member is missing)."""
    paths, labels = [], []
    for shard in (str(p) for p in batch["path"]):
        for key, members in samples(shard):
            if any(e in members for e in IMAGE_EXTENSIONS):
                try:
                    label = label_of(members, label_field)
                except ImageError:
                    label = ""
                paths.append(f"{shard}#{key}")
                labels.append(label)
    return {"path": np.array(paths, dtype=object), "label": np.array(labels, dtype=object)}


def samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(KEY, {extension: bytes}) per sample: WebDataset keeps a sample's members next to each other."""
    fs, path = storage.filesystem(shard)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key: str | None = None
            members: dict[str, bytes] = {}
            for info in tar:
                if not info.isfile():
                    continue
                name_key, extension = split_name(info.name)
                if name_key != key and members:
                    yield key, members  # type: ignore[misc]
                    members = {}
                key = name_key
                members[extension] = tar.extractfile(info).read()  # type: ignore[union-attr]
            if members:
                yield key, members  # type: ignore[misc]
    except (tarfile.TarError, EOFError) as exc:
        raise storage.StorageError(f"shard {storage.redact(shard)} is not a readable tar: {exc}.") from None
    except FileNotFoundError:
        raise storage.StorageError(f"shard {storage.redact(shard)} does not exist.") from None
    except OSError as exc:  # s3fs has retried already; a rerun continues from the samples written
        raise storage.StorageError(storage.failure(f"read shard {shard}", exc)) from None


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def label_of(members: dict[str, bytes], label_field: str | None) -> str:
    """`cls` or `txt`: that member's text; `json:FIELD`: a field of the .json member; None: cls if present."""
    field = label_field or ("cls" if "cls" in members else None)
    if field is None:
        return ""
    if field.startswith("json:"):
        if "json" not in members:
            raise ImageError("no .json member for --label-field " + field)
        try:
            value = json.loads(members["json"]).get(field[5:])
        except (ValueError, AttributeError):
            raise ImageError("the .json member is not a JSON object") from None
        return "" if value is None else str(value)
    if field not in members:
        raise ImageError(f"no .{field} member for --label-field {field}")
    return members[field].decode("utf-8", "replace").strip()


def _row(path: str, members: dict[str, bytes], transform: Transform, label_field: str | None) -> tuple:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    try:
        label = label_of(members, label_field)
        if image is None:
            raise ImageError(f"no image member (members: {', '.join(sorted(members))})")
        return path, label, transform(image), ""
    except ImageError as exc:
        return path, "", None, storage.redact(str(exc))
    except Exception as exc:  # a decoder bug on a hostile member must not end the run
        return path, "", None, "cannot decode: " + storage.describe_error(exc)


def _batch(rows: list[tuple], size: int) -> dict[str, np.ndarray]:
    images = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
    for i, (_, _, image, _) in enumerate(rows):
        if image is not None:
            images[i] = image
    return {
        "path": np.array([r[0] for r in rows]),
        "label": np.array([r[1] for r in rows]),
        "image": images,
        "error": np.array([r[3] for r in rows]),
    }


def _resolve(skip: Any) -> Any:
    if skip is None or isinstance(skip, (set, frozenset, list)):
        return skip
    import ray

    return ray.get(skip)
