"""The paths a resumed run skips, for any number of them: sorted 128-bit hashes built by Ray tasks and
shared zero-copy through the object store by every reading task on a node (16 bytes a path, so 100M done
images take 1.6 GB there and nothing on the driver)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raytl.files import storage


def build(paths: ray.data.Dataset) -> Any:
    """A reference to the sorted hashes of a Dataset's `path` column; the driver only holds references."""
    blocks = paths.map_batches(_hash_block, batch_format="pyarrow", num_cpus=0.25).to_arrow_refs()
    return _sorted.options(num_cpus=0.25).remote(*blocks)


def of(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """A done set built here, in this process (small sets; `contains` takes it as it takes a reference)."""
    hi, lo = hashes(paths)
    order = np.lexsort((lo, hi))
    return {"hi": hi[order], "lo": lo[order]}


def contains(done: Any, paths: Sequence[str]) -> np.ndarray:
    """Which of paths are in the done set (a reference from `build`, fetched once per process)."""
    table = _fetch(done)
    hi, lo = hashes(paths)
    first, end = np.searchsorted(table["hi"], hi, "left"), np.searchsorted(table["hi"], hi, "right")
    found = end > first
    for i in np.flatnonzero(found):  # sorted by (hi, lo): the few sharing a `hi` are side by side
        found[i] = lo[i] in table["lo"][first[i] : end[i]]
    return found


def hashes(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """blake2b-128 of each path as two uint64 arrays (collision odds ~1e-22 at 100M paths)."""
    # Compared as written: OUTPUT holds paths without passwords (storage.public_uri).
    public = [storage.public_uri(p) if "@" in p else p for p in paths]
    digests = b"".join(hashlib.blake2b(p.encode(), digest_size=16).digest() for p in public)
    pairs = np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _hash_block(block: pa.Table) -> pa.Table:
    hi, lo = hashes([str(p) for p in block["path"].to_pylist()])
    return pa.table({"hi": hi, "lo": lo})


@ray.remote
def _sorted(*blocks: pa.Table) -> dict[str, np.ndarray]:
    table = pa.concat_tables(blocks) if blocks else pa.table({"hi": pa.array([], pa.uint64())})
    hi = table["hi"].to_numpy() if table.num_rows else np.zeros(0, np.uint64)
    lo = table["lo"].to_numpy() if table.num_rows else np.zeros(0, np.uint64)
    order = np.lexsort((lo, hi))  # by hi, then lo: `contains` relies on it
    return {"hi": hi[order], "lo": lo[order]}


_CACHE: dict[str, dict[str, np.ndarray]] = {}  # per worker process: the one done set of the running job


def _fetch(done: Any) -> dict[str, np.ndarray]:
    if isinstance(done, dict):
        return done
    key = done.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(done)
    return _CACHE[key]
