"""URIs to filesystems: local paths, file://, s3:// and any fsspec protocol behave the same."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from raytl.errors import _USERINFO, RaytlError, StorageError, redact

T = TypeVar("T")


_OBJECT_STORES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path inside it) for a local path or URI."""
    quiet_wire_logs()  # every process that touches storage (driver, Ray workers) comes through here
    options: dict[str, Any] = {}
    if uri.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        # botocore reads AWS_ENDPOINT_URL itself, but older s3fs releases build clients that don't.
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://") :]
    if uri.split("://", 1)[0] in _OBJECT_STORES:
        # Other processes (Ray workers) write where this one looks: a cached listing would hide their files.
        options["use_listings_cache"] = False
    if uri.startswith("s3://"):
        # botocore is S3's one retrying layer (see retries()); s3fs's own loop around it is off (below).
        options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 1 + retries()}}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError:
        raise StorageError(_missing_backend(uri)) from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise StorageError(f"{redact(uri)}: no filesystem knows the scheme {scheme_of(uri)!r}.") from None
    if uri.startswith("s3://"):
        fs.retries = 1  # s3fs retries botocore's calls 5 times more (each with botocore's own retries)
    return fs, path


# The extra that brings the fsspec filesystem of a scheme (pyproject.toml's optional-dependencies).
_EXTRAS = {"gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
           "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs")}  # fmt: skip


def _missing_backend(uri: str) -> str:
    scheme = uri.split("://", 1)[0].lower()
    extra, package = _EXTRAS.get(scheme, (None, None))
    if extra is None:
        return f"{redact(uri)}: the filesystem for {scheme}:// is not installed."
    return (
        f"{redact(uri)}: {scheme}:// needs the package {package}, which is not installed: "
        f'pip install -c requirements/lock.txt "raytl[{extra}]".'
    )


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


def scheme_of(uri: str) -> str:
    """The filesystem a URI names: `s3`, `gs`, `http`, ... (`file` for local paths); for a chained
    `zip://MEMBER::TARGET`, the scheme of its TARGET, where the bytes come from (`check_chain` says whether
    the segments before it may be trusted to read nothing else)."""
    if "::" in uri:
        uri = uri.rsplit("::", 1)[1]
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    return {"s3a": "s3", "gcs": "gs", "local": "file"}.get(scheme, scheme)


# fsspec opens a chained URL `A::B::C` with A's filesystem, which reads through B's and C's: every segment
# decides what is read, and most can read elsewhere than the last one names (a plain path or `file://` before
# `::` reads the local disk, `simplecache::` and `filecache::` write local copies, `reference::` and `dir::`
# redirect). Of chains, raytl reads archive members only: each segment but the last `zip://MEMBER` or
# `tar://MEMBER`, the bytes coming from the last segment's filesystem.
ARCHIVE_SCHEMES = ("zip", "tar")


def check_chain(uri: str, what: str) -> None:
    """Refuse a chained URL other than archive members (`zip://MEMBER::ARCHIVE`, `tar://MEMBER::ARCHIVE`,
    nested ones too), naming it as `what` (e.g. "--manifest s3://b/m.csv lists s3://...")."""
    for segment in uri.split("::")[:-1]:
        scheme = segment.split("://", 1)[0].lower() if "://" in segment else ""
        if scheme not in ARCHIVE_SCHEMES or not segment[len(scheme) + 3 :]:
            raise StorageError(
                f"{what}, which chains filesystems with `::` through {redact(segment)!r}; only archive "
                "members are read that way (zip://MEMBER::ARCHIVE or tar://MEMBER::ARCHIVE)."
            )


def location(uri: str) -> tuple[str, str]:
    """(protocol, absolute path without a trailing slash): where a URI points, for comparing two of them."""
    fs, path = filesystem(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    return protocol, path.rstrip("/") or "/"


def is_within(inner: str, outer: str) -> bool:
    """True when `inner` is `outer` itself or a path below it (same filesystem)."""
    (p1, a), (p2, b) = location(inner), location(outer)
    return p1 == p2 and (a == b or a.startswith(b.rstrip("/") + "/"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


# Transient storage errors (throttling, 5xx, timeouts, dropped connections) are retried by one layer only,
# so that sustained throttling is not met with attempts multiplied layer by layer:
# - s3://: botocore, in its "standard" mode (throttling, 5xx and dropped connections; exponential back-off
#   with jitter up to 20 s; a retry quota per client), `retries()` times; s3fs's own retry loop is off;
# - gs:// and az://: their clients' own policies (gcsfs and azure-core retry 5xx and 429 themselves);
# - local paths, http(s):// and the rest: raytl's loop below, `retries()` times, back-off doubling from
#   0.25 s (with jitter) to at most 8 s.
# raytl itself keeps telling transient errors from permanent ones (403, a missing bucket) for its messages.
DEFAULT_RETRIES = 5
RETRIES_ENV = "RAYTL_RETRIES"  # --retries, for this process and (through Ray's runtime_env) its workers
_CLIENT_RETRIES = ("s3", "gs", "az", "abfs", "abfss")
_FIRST_WAIT = 0.25
_MAX_WAIT = 8.0


def retries() -> int:
    """How many times a transient storage error is retried (--retries; RAYTL_RETRIES in Ray workers)."""
    value = os.environ.get(RETRIES_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_RETRIES


def attempts(fs: fsspec.AbstractFileSystem) -> int:
    """How many times raytl itself tries an operation on fs: once where the client retries on its own."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return 1 if any(p in _CLIENT_RETRIES for p in protocols) else 1 + retries()


# What transient failures look like once botocore, aiohttp and s3fs have translated them.
_TRANSIENT = re.compile(
    r"slow ?down|reduce your request rate|throttl|service ?unavailable|internal ?error|request ?time ?out"
    r"|timed? ?out|connection (reset|aborted|closed)|server ?disconnected|broken pipe|bad gateway"
    r"|\b50[0234]\b|too many requests|\b429\b",
    re.IGNORECASE,
)
_NO_BUCKET = re.compile(r"NoSuchBucket|specified bucket does not exist", re.IGNORECASE)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth another try: throttling, 5xx, timeouts, dropped connections."""
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return bool(_TRANSIENT.search(f"{type(exc).__name__}: {exc}"))


def is_missing_file(exc: BaseException) -> bool:
    """A single object that is not there (deleted after listing): the file's problem, not the store's."""
    return isinstance(exc, FileNotFoundError) and not _NO_BUCKET.search(str(exc))


def retrying(fs: fsspec.AbstractFileSystem, action: Callable[[], T], what: str) -> T:
    """`action()` on fs, retried with back-off while it fails transiently (where fs's client does not retry
    itself); a missing file's FileNotFoundError passes through, anything else (403, a missing bucket,
    retries used up) becomes one StorageError."""
    limit = attempts(fs)
    for attempt in range(1, limit + 1):
        try:
            return action()
        except Exception as exc:
            if is_missing_file(exc):
                raise
            if not is_transient(exc) or attempt == limit:
                raise StorageError(failure(what, exc)) from None
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def failure(what: str, exc: BaseException) -> str:
    """One sentence for a storage operation that cannot succeed: what, why, and what to do."""
    reason = describe_error(exc)
    if isinstance(exc, PermissionError) and exc.errno is not None:  # the local OS said no
        return f"cannot {redact(what)}: permission denied ({reason})."
    if isinstance(exc, PermissionError) or re.search(r"access ?denied|forbidden|\b403\b", reason, re.I):
        return (
            f"cannot {redact(what)}: access denied ({reason}); check the credentials and the bucket policy."
        )
    if isinstance(exc, FileNotFoundError):
        return f"cannot {redact(what)}: {reason} (no such bucket or path)."
    if is_transient(exc):
        return (
            f"cannot {redact(what)}: {reason}, still failing after {_retries_text()}; "
            "the storage is overloaded or unreachable: rerun the same command later to continue "
            "(--retries sets how many)."
        )
    return f"cannot {redact(what)}: {reason}."


def _retries_text() -> str:
    n = retries()
    return "1 retry" if n == 1 else f"{n} retries"


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Storage calls inside that fail (403, a store that is down, an unwritable folder) become one
    StorageError sentence naming `what` ("list OUTPUT s3://..."); raytl's own errors pass as they are."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, RaytlError):
            raise
        raise StorageError(failure(what, exc)) from None


@contextlib.contextmanager
def opening(missing: str, unreadable: str, error: type[Exception] = StorageError) -> Iterator[None]:
    """Opening a user's input: FileNotFoundError inside is the sentence `missing`; any other failure is
    `unreadable` and the reason; raytl's own errors pass as they are."""
    try:
        yield
    except FileNotFoundError:
        raise error(missing) from None
    except Exception as exc:
        if isinstance(exc, RaytlError):
            raise
        raise error(f"{unreadable}: {describe_error(exc)}.") from None


def read_bytes(uri: str) -> bytes:
    """Read a whole object (transient errors retried)."""
    fs, path = filesystem(uri)
    return retrying(fs, lambda: fs.cat_file(path), f"read {uri}")


def read_json(uri: str) -> Any:
    """A JSON file raytl wrote; a corrupt one is one StorageError sentence (FileNotFoundError passes)."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(
            f"{redact(uri)} is not valid JSON ({exc}): it was damaged; restore it or run the command that "
            "wrote it again."
        ) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old object or the new one, never half of it."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        retrying(fs, lambda: fs.pipe_file(path, data), f"write {uri}")  # an object-store PUT is atomic
        return
    with guarded(f"write {uri}"):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def fetch_many(uris: Sequence[str]) -> list[bytes | Exception]:
    """Read many objects at once (concurrently on object stores). A missing file returns its
    FileNotFoundError; transient errors are retried; other failures raise StorageError (the run stops)."""
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        fs, path = filesystem(uri)
        by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
    out: list[bytes | Exception] = [b""] * len(uris)
    for fs, items in by_fs.values():
        pending = dict(items)  # index -> path, still to read
        limit = attempts(fs)
        for attempt in range(1, limit + 1):
            got = _cat(fs, list(pending.values()))
            for i, path in list(pending.items()):
                data = got.get(path, FileNotFoundError(path))
                if isinstance(data, Exception) and not is_missing_file(data):
                    if not is_transient(data) or attempt == limit:
                        raise StorageError(failure(f"read {uris[i]}", data))
                    continue  # read again, with the others that failed, after the back-off
                out[i] = data
                del pending[i]
            if not pending:
                break
            time.sleep(_backoff(attempt))
    return out


def _backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): doubling, capped, with jitter."""
    return min(_MAX_WAIT, _FIRST_WAIT * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _cat(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | Exception]:
    if _is_s3(fs):
        client = _s3_client(os.environ.get("AWS_ENDPOINT_URL") or None, 1 + retries())
        return dict(zip(paths, _getters().map(functools.partial(_s3_get, fs, client), paths), strict=True))
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


# Many small objects from S3 (the images): boto3's GetObject from threads, one request an object. s3fs's
# cat makes the same requests through aiobotocore's asyncio at ~5 ms of client CPU each, against ~1.9 ms
# here (bench/pipeline.py's s3_client_cpu_ms_per_get): at GPU speed that is the cores of a node. The client
# is the one s3fs's is (botocore: same credentials chain, same endpoint, the same single retrying layer);
# its errors are translated as s3fs translates them, so a read fails with the same sentence either way.
_GETTERS = 32  # concurrent GETs a process (preprocess.FETCH_AT_ONCE)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols and hasattr(fs, "split_path")


@functools.cache
def _getters() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_GETTERS, thread_name_prefix="raytl-get")


@functools.cache
def _s3_client(endpoint: str | None, attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    retrying = {"mode": "standard", "total_max_attempts": attempts}  # as filesystem()'s s3fs client
    config = Config(retries=retrying, max_pool_connections=_GETTERS)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _s3_get(fs: Any, client: Any, path: str) -> bytes | Exception:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    bucket, key, version = fs.split_path(path)
    try:
        response = client.get_object(Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
        return response["Body"].read()
    except ClientError as exc:
        return translate_boto_error(exc)
    except Exception as exc:  # dropped connections, timeouts: is_transient and failure() read them
        return exc


def public_uri(uri: str) -> str:
    """A URI without the password in its userinfo (`https://user:pw@host/a.jpg` -> `https://***@host/a.jpg`):
    how raytl writes and compares paths, so that no output holds a password."""
    return _USERINFO.sub(r"\g<scheme>***@", uri)


def public_uris(uris: Any) -> Any:
    """public_uri over a pyarrow string array (vectorised)."""
    import pyarrow.compute as pc

    return pc.replace_substring_regex(uris, pattern=_USERINFO_RE2, replacement=r"\1***@")


_USERINFO_RE2 = r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@"


def quiet_wire_logs() -> None:
    """Keep the storage clients' request logs (botocore prints every header, session tokens included) at
    WARNING even under --log-level debug, in this process; RAYTL_WIRE_LOGS=1 lets them through."""
    global _WIRE_QUIET
    if _WIRE_QUIET or os.environ.get("RAYTL_WIRE_LOGS") == "1":
        return
    for name in ("botocore", "boto3", "s3transfer", "aiobotocore", "s3fs", "urllib3", "aiohttp", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _WIRE_QUIET = True


_WIRE_QUIET = False


def describe_error(exc: BaseException) -> str:
    """One redacted line naming an exception, for logs and error tables."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return redact(f"{name}: {message}" if message else name)
