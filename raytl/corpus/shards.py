"""WebDataset tar shards: expand a SOURCE pattern, and read a shard's samples as decoded rows (CPU tasks)."""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import braceexpand
import numpy as np

from raytl.errors import ImageError, StorageError
from raytl.files import doneset, storage
from raytl.vision import preprocess
from raytl.vision.preprocess import Transform

log = logging.getLogger(__name__)

# A sample's image member, by extension without the dot, in order of preference when it has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
assert {f".{e}" for e in IMAGE_EXTENSIONS} == preprocess.IMAGE_EXTENSIONS


_BRACES: Any = braceexpand  # its parser's regular expressions and helpers too (its stubs name one function)

# The most shards one brace pattern may name (at 100 samples a shard, 100M images): the list is built on the
# driver, and `{00000000..30000000}` would otherwise fill its memory before anything is read.
MAX_SHARDS = 1_000_000


def expand(pattern: str) -> list[str]:
    """`s3://b/shards/{00000..00099}.tar` -> the 100 URIs, as bash and WebDataset expand braces (zero padding,
    descending ranges, steps `{0..8..2}`, lists `{a,b}`), by the `braceexpand` library they use. Expanded
    lazily and refused (StorageError) past MAX_SHARDS."""
    if _count(pattern) > MAX_SHARDS:
        raise StorageError(
            f"SOURCE {storage.redact(pattern)} names more than {MAX_SHARDS:,} shards, more than one run "
            "reads; split the range over several runs (each into its own OUTPUT), or write larger shards."
        )
    try:
        return list(braceexpand.braceexpand(pattern))
    except _BRACES.UnbalancedBracesError:
        raise StorageError(f"SOURCE {storage.redact(pattern)} has unbalanced braces.") from None


def _count(pattern: str) -> int:
    """How many names braceexpand would make of pattern, counted without making them (its parser's
    grammar: a pattern is the product of its literals and `{…}` groups; a group is an integer or letter
    range, or a comma list whose items are patterns, summed; any other group is a literal around a pattern).
    braceexpand itself builds every range in full (itertools.product), whatever it is asked for."""
    count, start, depth, pos = 1, 0, 0, 0
    while pos < len(pattern):
        if pattern[pos] == "\\":
            pos += 2
            continue
        if pattern[pos] == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif pattern[pos] == "}":
            depth -= 1
            if depth == 0:
                count *= _count_group(pattern[start + 1 : pos])
        pos += 1
    return count


def _count_group(expr: str) -> int:
    found = _BRACES.int_range_re.match(expr)
    if found:
        first, last, step = int(found.group(1)), int(found.group(2)), int(found.group(3) or 1) or 1
        return abs(last - first) // step + 1
    found = _BRACES.char_range_re.match(expr)
    if found:
        return len(_BRACES.make_char_range(*found.groups()))
    items, start, depth = [], 0, 0
    pos = 0
    while pos < len(expr):
        if expr[pos] == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(expr[pos], 0)
        if expr[pos] == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:
        return _count(expr)  # not a list: `{` + pattern + `}`
    return sum(_count(item) for item in [*items, expr[start:]])


def is_shard(path: str) -> bool:
    return path.lower().endswith(".tar")


def sample_of(path: str) -> tuple[str, str] | None:
    """(SHARD, KEY) for a shard sample's `SHARD#KEY` path; None for any other path, a loose file whose name
    holds a `#` included."""
    cut = path.lower().rfind(".tar#")
    return None if cut < 0 else (path[: cut + 4], path[cut + 5 :])


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
            if key is None:  # the shard is missing or cut short: one `_errors` row named by the shard
                if skip is None or not doneset.contains(skip, [shard])[0]:
                    rows.append((shard, "", None, members[BROKEN].decode()))
            else:
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
            if key is None:
                log.warning("%s", members[BROKEN].decode())
            elif REPEATED not in members and any(e in members for e in IMAGE_EXTENSIONS):
                try:
                    label = label_of(members, label_field)
                except ImageError:
                    label = ""
                paths.append(f"{shard}#{key}")
                labels.append(label)
    return {"path": np.array(paths, dtype=object), "label": np.array(labels, dtype=object)}


def samples(shard: str) -> Iterator[tuple[str | None, dict[str, bytes]]]:
    """(KEY, {extension: bytes}) per sample: WebDataset keeps a sample's members next to each other. A shard
    that is missing or cut short ends with (None, {BROKEN: the reason}) after the samples read before the
    cut: the run goes on, and a rerun reads the shard again only if its `_errors` row is gone."""
    count = 0
    try:
        for sample in _members(shard):
            count += 1
            yield sample
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        reason = f"shard is not a readable tar after {count} samples: {exc}"
        yield None, {BROKEN: storage.redact(reason).encode()}
    except FileNotFoundError as exc:
        if not storage.is_missing_file(exc):  # the bucket itself: the run's problem, not the shard's
            raise StorageError(storage.failure(f"read shard {shard}", exc)) from None
        yield None, {BROKEN: b"shard does not exist"}


# The member that carries the reason of a broken shard, in `samples`' last item.
BROKEN = "__broken__"
# The member that marks a sample with a member that is not a regular file (symlink, hardlink, device).
LINK = "__link__"
# The member that marks a key met again after other samples: only its first sample is read.
REPEATED = "__repeated__"


def _members(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    fs, path = storage.filesystem(shard)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key: str | None = None
            members: dict[str, bytes] = {}
            seen: set[str] = set()
            for info in tar:
                if info.isdir():
                    continue
                name_key, extension = split_name(info.name)
                if name_key != key and members:
                    yield key, members  # type: ignore[misc]
                    members = {}
                if name_key != key and name_key in seen:  # WebDataset keeps a sample's members together
                    members[REPEATED] = b""
                seen.add(name_key)
                key = name_key
                if info.isfile():
                    members[extension] = tar.extractfile(info).read()  # type: ignore[union-attr]
                else:  # a symlink, hardlink or device: never followed, but reported (`_row`)
                    members[LINK] = info.name.encode()
            if members:
                yield key, members  # type: ignore[misc]
    except (tarfile.TarError, EOFError, FileNotFoundError, zlib.error):
        raise  # the shard's own problem: `samples` makes it an `_errors` row
    except OSError as exc:  # s3fs has retried already; a rerun continues from the samples written
        raise StorageError(storage.failure(f"read shard {shard}", exc)) from None


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def label_of(members: dict[str, bytes], label_field: str | None) -> str:
    """`cls` or `txt`: that member's text; `json:FIELD`: a field of the .json member. None: the .json
    member's `label` when it has one (raytl pack writes the label there, and the class index in .cls as
    WebDataset does), else .cls's text (other datasets' integer classes, read as their digits)."""
    field = label_field or (_json_label(members) and "json:label") or ("cls" if "cls" in members else None)
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


def _json_label(members: dict[str, bytes]) -> bool:
    """True when the sample's .json member is an object with a `label` field."""
    if "json" not in members:
        return False
    try:
        meta = json.loads(members["json"])
    except ValueError:
        return False
    return isinstance(meta, dict) and meta.get("label") not in (None, "")


def _row(path: str, members: dict[str, bytes], transform: Transform, label_field: str | None) -> tuple:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    try:
        if REPEATED in members:
            raise ImageError("the key comes again after other samples: only its first sample is read")
        if LINK in members:
            raise ImageError(f"{members[LINK].decode()} is a link, not a file: not read")
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
