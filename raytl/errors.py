"""The errors raytl shows its user as one sentence and exit status 2 (anything else is a bug and keeps its
traceback), and the redaction that keeps secrets out of them. Every module takes its error classes from
here. No heavy imports: the CLI names them without loading torch or Ray."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

# Secrets that must never reach a message, a log line or a file: these variables' values, URI passwords.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Remove secrets (AWS secret keys, session tokens, URI passwords) from a message."""
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            text = text.replace(secret, "***")
    return _USERINFO.sub(r"\g<scheme>***@", text)


class RaytlError(ValueError):
    """What the user did that raytl cannot use, as one sentence naming it and what is allowed. Its text is
    redacted however it is built, and it crosses Ray's pickling (a task's error) as it was raised."""

    def __str__(self) -> str:
        return redact(super().__str__())

    def __reduce__(self) -> tuple:
        return type(self), self.args


class ConfigError(RaytlError):
    """A bad option value; the message is one sentence naming the option and what is allowed."""


class StorageError(RaytlError):
    """A path or URI that cannot be used: missing, unreadable or not allowed."""


class WeightsError(RaytlError):
    """Weights that cannot be used: unreadable, or not the shapes the model needs."""


class DatasetError(RaytlError):
    """A dataset that cannot be used as given: embeddings (schema, dimensions, backbone) or labelled images
    (their labels, the split), for `train` and `finetune` alike."""


# The name raytl's API had for DatasetError before finetune shared it (kept: user code catches it).
EmbeddingsError = DatasetError


class ExtractError(RaytlError):
    """The run stopped on purpose (too many broken files); the message says why and what to do."""


class RayStartError(RaytlError):
    """Ray could not be started or joined (after one retry); the message names the likely causes."""


class ImageError(RaytlError):
    """A file that is not a usable image; the message is the reason stored in a row's `_errors`."""


# What `raytl` prints as one line (kept as a tuple: `except USER_ERRORS` in user code).
USER_ERRORS = (RaytlError,)

_BY_NAME = {cls.__name__: cls for cls in (ConfigError, StorageError, WeightsError, DatasetError, ExtractError,
                                          RayStartError, ImageError)}  # fmt: skip
_REMOTE = re.compile(rf"raytl\.(?:\w+\.)*({'|'.join(_BY_NAME)}): (.+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _wrapped_by_ray(exc: BaseException) -> bool:
    return any(cls.__module__.startswith("ray.") for cls in type(exc).__mro__)


def user_error(exc: BaseException) -> RaytlError | None:
    """The RaytlError that `exc` is, or that a Ray task or actor raised and Ray re-raised on the driver
    wrapped (RayTaskError, Ray Data's UserCodeException); None when `exc` is something else (a bug)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RaytlError) and not _wrapped_by_ray(current):
            return current
        for inner in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                stack.append(inner)
    if not _wrapped_by_ray(exc):
        return None
    # Ray Data can keep a task's error only as text in the remote traceback (and a RayTaskError(StorageError)
    # *is* a StorageError whose message is that whole traceback): its last raytl error line is the sentence.
    found = _REMOTE.findall(_ANSI.sub("", str(exc)))
    if not found:
        return None
    name, sentence = found[-1]
    return _BY_NAME[name](sentence.strip())


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Around driver code that waits on Ray tasks: a RaytlError a task raised is re-raised as itself."""
    try:
        yield
    except Exception as exc:
        error = user_error(exc)
        if error is None or error is exc:
            raise
        raise error from None
