"""What a raytl run tells its user: log setup (text or JSON lines), Ray started without its own chatter,
one live progress line per stage, and the summary table at the end."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Settings:
    level: int = logging.WARNING
    json: bool = False  # JSON lines on stderr, for clusters' log collectors
    quiet: bool = False  # no progress line and no summary table (errors and the JSON result only)
    # Settings given on the command line that Ray workers read from their environment (e.g. RAYTL_RETRIES):
    # a Ray started or joined here hands them on in its job's runtime_env (never secrets: those stay in the
    # nodes' own environment).
    worker_env: dict[str, str] = field(default_factory=dict)


SETTINGS = Settings()
HANDLER = "raytl"  # the name of raytl's handler on the root logger


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def final_line(text: str, level: int = logging.ERROR, json_lines: bool | None = None) -> None:
    """The command's last line on stderr (`raytl: error: ...`, `raytl: interrupted; ...`): the text itself, or
    under --log-format json (`json_lines`, else the settings') one object at `level` from the logger
    `raytl`, as log collectors grade it."""
    if SETTINGS.json if json_lines is None else json_lines:
        record = logging.LogRecord("raytl", level, __file__, 0, text, None, None)
        text = JsonFormatter().format(record)
    # One write: print() writes the newline apart, and a Ray thread's line could fall in between.
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def setup(
    level: str = "warning", json_lines: bool = False, quiet: bool = False, worker_env: dict | None = None
) -> None:
    """Configure logging for a `raytl` command (each call replaces the last: tests call main() often)."""
    SETTINGS.level = getattr(logging, level.upper())
    SETTINGS.json, SETTINGS.quiet = json_lines, quiet
    SETTINGS.worker_env = dict(worker_env or {})
    if SETTINGS.level > logging.DEBUG:
        # Ray Data's own lines (execution plans, each dataset's start and finish, the progress-bar notice),
        # in this process and in the workers of a Ray it starts: read when its loggers are configured.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER)
    handler.addFilter(_redact_record)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=SETTINGS.level, handlers=[handler], force=True)
    from raytl.files.storage import quiet_wire_logs

    quiet_wire_logs()
    quiet_ray()


# What other code writes straight to this process's stderr: Ray's C++ core worker (glog: `[2026-11-29
# 01:56:19,162 E 3454 3454] core_worker.cc:2465: ...`) and the worker lines Ray forwards (`(MapWorker
# pid=12) ...`, whose text may itself be a JSON object when the workers log JSON).
_GLOG = re.compile(r"\[(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)[,.]\d+ ([IWEF]) \d+ \d+\] (\S+?):\d+: (.*)")
_GLOG_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_FORWARDED = re.compile(r"(?:\x1b\[[0-9;]*m)*\(((?:\S+ )?pid=\d+(?:, ip=[^)]+)?)\)(?:\x1b\[[0-9;]*m)* ?(.*)")
_RELAYED = False


def json_line(text: str) -> str:
    """One line written to stderr by code other than raytl's handler, as a JSON object like raytl's own."""
    entry: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "level": "info", "logger": "stderr"}
    if text.startswith("{"):
        try:
            entry.update(_ray_json(json.loads(text)))
        except (ValueError, TypeError):
            entry["message"] = text
    elif glog := _GLOG.fullmatch(text):
        day, clock, level, source, message = glog.groups()
        entry.update(time=f"{day}T{clock}", level=_GLOG_LEVELS[level], logger=f"ray.{source}")
        entry["message"] = message
    elif forwarded := _FORWARDED.fullmatch(text):
        worker, message = forwarded.groups()
        try:
            inner = json.loads(message)
        except ValueError:
            inner = None
        plain = {"logger": "ray.worker", "message": message}
        entry.update(_ray_json(inner) if isinstance(inner, dict) else plain)
        entry["worker"] = worker
    else:
        entry["message"] = text
    return json.dumps(entry)


def _ray_json(entry: dict) -> dict:
    """Ray's JSON log shape (asctime, levelname, ...) in raytl's keys (time, level, logger, message)."""
    if "levelname" not in entry:
        return entry
    entry = dict(entry)
    stamp = str(entry.pop("asctime", "")).split(",")[0].replace(" ", "T")
    level = str(entry.pop("levelname")).lower()
    return {"time": stamp, "level": level, "logger": entry.pop("name", "ray"), **entry}


def relay_stderr_as_json() -> None:
    """Under --log-format json in a `raytl` process: every line that reaches the process's stderr (file
    descriptor 2, where Ray's C++ core worker and Ray's forwarding of worker output write, not through
    Python's logging) comes out as one JSON object, for log collectors that parse each line."""
    global _RELAYED
    try:
        if _RELAYED or sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):  # a captured sys.stderr (tests): not the process's own
        return
    _RELAYED = True
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def relay() -> None:
        with open(read_end, "rb", buffering=0) as pipe, open(real, "wb", buffering=0, closefd=False) as out:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if text.strip():
                    out.write((json_line(text) + "\n").encode())

    thread = threading.Thread(target=relay, name="raytl-stderr-json", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last write end here closes: the relay reads to its end
        thread.join(timeout=1.0)  # (a Ray process started here may hold a copy of it open)

    atexit.register(restore)


def _redact_record(record: logging.LogRecord) -> bool:
    """No secret key, session token or URI password in any line raytl's handler writes."""
    from raytl.files.storage import redact

    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, ()
    return True


def quiet_ray() -> None:
    """Ray's internal INFO lines (execution plans, per-dataset start and finish, progress-bar notices) are
    off unless --log-level debug."""
    chatter = logging.DEBUG if SETTINGS.level <= logging.DEBUG else logging.ERROR
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(chatter)


class Progress:
    """One live line for a stage: images done (of how many, when known), images per second, ETA. On a
    terminal it rewrites itself; elsewhere (a Ray job's log) it is printed every `every` seconds."""

    def __init__(self, stage: str, total: int | None, stream: TextIO | None = None, every: float = 30.0):
        self.stage, self.total = stage, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every = 0.5 if self.live else every
        self.started = self.last = time.monotonic()
        self.shown = ""
        self.enabled = not SETTINGS.quiet and not SETTINGS.json

    def update(self, totals: dict[str, int]) -> None:
        """The running counts (embedded/predicted and failed) after each written part."""
        now = time.monotonic()
        if not self.enabled or now - self.last < self.every:
            return
        self.last = now
        self._show(self.line(totals, now - self.started))

    def done(self, totals: dict[str, int]) -> None:
        if self.enabled and self.live and self.shown:
            self._show(self.line(totals, time.monotonic() - self.started))
            self.stream.write("\n")
            self.stream.flush()

    def line(self, totals: dict[str, int], seconds: float) -> str:
        done = totals.get("embedded", 0)
        failed = totals.get("failed", 0)
        rate = done / seconds if seconds > 0 else 0.0
        count = f"{done + failed:,}" + (f"/{self.total:,}" if self.total else "")
        eta = ""
        if self.total and rate > 0:
            eta = f" · ETA {duration(max(0.0, (self.total - done - failed) / rate))}"
        return (
            f"{self.stage}: {count} images · {failed:,} failed · {rate:,.1f} img/s{eta} · {duration(seconds)}"
        )

    def _show(self, text: str) -> None:
        if self.live:
            self.stream.write("\r" + text.ljust(len(self.shown)))
        else:
            self.stream.write(text + "\n")
        self.shown = text
        self.stream.flush()


def quiet_train_worker(debug: bool) -> None:
    """In a Ray Train worker: Ray Train's per-report INFO line (logged under its file's path, outside the
    `ray` logger tree) and Ray's deprecation notices about its own internals are off unless debugging."""
    if debug:
        return
    warnings.filterwarnings("ignore", module=r"ray\.")
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def show_epoch(line: str) -> None:
    """From rank 0 of a training run: straight to the worker's stderr (Ray forwards it to the driver;
    Ray Train's own capture of stdout would print it twice)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def ray_debug() -> bool:
    return SETTINGS.level <= logging.DEBUG


def epoch_line(stage: str, entry: dict[str, Any], epochs: int, started: float, first_epoch: int) -> str:
    """A training epoch's line: losses, validation accuracy, time per epoch and the ETA of the run."""
    done = entry["epoch"] + 1 - first_epoch
    each = (time.monotonic() - started) / max(done, 1)
    return (
        f"{stage}: epoch {entry['epoch'] + 1}/{epochs} · train loss {entry['train_loss']:.4f} · "
        f"val loss {entry['val_loss']:.4f} · val accuracy {entry['val_accuracy']:.4f} · "
        f"{duration(each)}/epoch · ETA {duration(each * (epochs - entry['epoch'] - 1))}"
    )


def show_epochs() -> bool:
    """Training workers print their epoch lines (Ray forwards them to the driver) unless quiet."""
    return not SETTINGS.quiet and not SETTINGS.json


def duration(seconds: float) -> str:
    """3.2 s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def summary_table(title: str, rows: list[tuple[str, Any]], stream: TextIO | None = None) -> None:
    """The final table of a run, on stderr (stdout keeps the one JSON line scripts read)."""
    if SETTINGS.quiet or SETTINGS.json:
        return
    stream = stream or sys.stderr
    width = max(len(name) for name, _ in rows)
    lines = [title] + [f"  {name.ljust(width)}  {_cell(value)}" for name, value in rows]
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
