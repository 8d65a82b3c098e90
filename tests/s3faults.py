"""Fault injection for the loopback S3 server: a WSGI layer in front of moto, steered by the test process."""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field

_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    "<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource></Error>"
)
_STATUS = {500: "500 Internal Server Error", 503: "503 Slow Down", 403: "403 Forbidden"}


@dataclass
class Rule:
    """Requests `method` on keys under `prefix` of `bucket`: one key in `every` (by a hash of its name, so
    the choice is deterministic) fails its first `times` attempts with `status` (times=None: always)."""

    bucket: str
    prefix: str = ""
    method: str = "GET"
    status: int = 500
    code: str = "InternalError"
    message: str = "We encountered an internal error. Please try again."
    every: int = 1
    times: int | None = 2
    listing: bool = False  # only bucket listings (GET on the bucket itself)
    attempts: dict[str, int] = field(default_factory=dict)
    injected: int = 0

    def fails(self, method: str, bucket: str, key: str) -> bool:
        if method != self.method or bucket != self.bucket or not key.startswith(self.prefix):
            return False
        if self.listing and key:
            return False
        if zlib.crc32(key.encode()) % self.every:
            return False
        seen = self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.times is not None and seen > self.times:
            return False
        self.injected += 1
        return True


class Faults:
    """The rules in force; the moto thread consults them on every request."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.lock = threading.Lock()

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def middleware(self, app):
        def serve(environ, start_response):
            parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
            bucket, key = parts[0], parts[1] if len(parts) > 1 else ""
            with self.lock:
                rule = next((r for r in self.rules if r.fails(environ["REQUEST_METHOD"], bucket, key)), None)
            if rule is None:
                return app(environ, start_response)
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # drain the upload
            body = _ERROR.format(code=rule.code, message=rule.message, path=f"/{bucket}/{key}").encode()
            start_response(_STATUS[rule.status], [("Content-Type", "application/xml")])
            return [body]

        return serve


FAULTS = Faults()


def faulty_moto_server(ip_address: str, port: int):
    """moto's ThreadedMotoServer with FAULTS in front of it."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    class FaultyMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = FAULTS.middleware(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return FaultyMotoServer(ip_address=ip_address, port=port, verbose=False)
