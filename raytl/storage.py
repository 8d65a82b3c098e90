"""URIs to filesystems: local paths, file://, s3:// and any fsspec protocol behave the same."""

from __future__ import annotations

import os
import posixpath
import re
import threading
from collections.abc import Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


class StorageError(ValueError):
    """A path or URI that cannot be used: missing, unreadable or not allowed."""


_OBJECT_STORES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path inside it) for a local path or URI."""
    options: dict[str, Any] = {}
    if uri.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        # botocore reads AWS_ENDPOINT_URL itself, but older s3fs releases build clients that don't.
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://") :]
    if uri.split("://", 1)[0] in _OBJECT_STORES:
        # Other processes (Ray workers) write where this one looks: a cached listing would hide their files.
        options["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def pyarrow_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None for local, path) for APIs that take pyarrow's, such as Ray Train's storage.

    pyarrow's own S3FileSystem ignores AWS_ENDPOINT_URL, so object stores go through fsspec's.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return None, os.path.abspath(path)
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of a path inside fs: s3://bucket/key for object stores, an absolute path locally."""
    if isinstance(fs, LocalFileSystem):
        return fs._strip_protocol(path)
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def read_bytes(uri: str) -> bytes:
    """Read a whole object."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old object or the new one, never half of it."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # an object-store PUT is atomic
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def fetch_many(uris: Sequence[str]) -> list[bytes | Exception]:
    """Read many objects at once (concurrently on object stores); a failed read returns its exception."""
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri)
        by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
    out: list[bytes | Exception] = [b""] * len(uris)
    for fs, items in by_fs.values():
        paths = [p for _, p in items]
        got = _cat(fs, paths)
        for i, path in items:
            out[i] = got.get(path, FileNotFoundError(path))
    return out


def _cat(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | Exception]:
    try:
        got = fs.cat(paths, on_error="return")
    except Exception as exc:  # a filesystem without on_error support: fall back to one by one
        got = {}
        for path in paths:
            try:
                got[path] = fs.cat_file(path)
            except Exception as one:
                got[path] = one
        del exc
    if not isinstance(got, dict):  # a single path comes back bare
        got = {paths[0]: got}
    # Some filesystems key the result by a normalised path: map back to what was asked.
    normalised = {fs._strip_protocol(k): v for k, v in got.items()}
    return {p: got.get(p, normalised.get(fs._strip_protocol(p), FileNotFoundError(p))) for p in paths}


def redact(text: str) -> str:
    """Remove secrets (AWS secret keys, session tokens, URI passwords) from a message."""
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return _USERINFO.sub(r"\g<scheme>***@", text)


def describe_error(exc: BaseException) -> str:
    """One redacted line naming an exception, for logs and error tables."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return redact(f"{name}: {message}" if message else name)
