"""MLflow tracking for `train` and `finetune` (optional: `pip install "raytl[mlflow]"`).

The driver opens the run and logs the options and the embeddings' metadata as params; rank 0 logs each
epoch's metrics as the epoch ends (Ray Train has no tracker callback: its docs say to log from rank 0);
the driver logs the final metrics and MODEL_DIR's metrics.json, report.html and figures as artifacts,
then closes the run. A rerun that resumes a fine-tune continues its MLflow run. A tracker that cannot be
reached, or that fails midway, costs a warning, never the model.

Rank 0 gets the tracking URI, the run's id and MLflow's non-secret settings from the driver; credentials
(MLFLOW_TRACKING_TOKEN, ...) belong in the workers' environment, as the object storage's do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from raytl.config import Tracking
from raytl.errors import RaytlError
from raytl.files import storage

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
INSTALL = 'pip install -c requirements/lock.txt "raytl[mlflow]"'
# MLflow's HTTP client tries a request 8 times with growing pauses, up to 120 s each: minutes of a
# stalled training step when the server is down. raytl asks for less unless the user set these.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# MLflow settings that are not secrets, passed from the driver to rank 0 (whose environment is the
# cluster's): MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set.
_FORWARDED = ("MLFLOW_ALLOW_FILE_STORE", *_HTTP_DEFAULTS)
_PARAM_CHARS = 6000  # MLflow's limit on a param's value
_OWN_OPTIONS = ("overwrite", *(f.name for f in fields(Tracking)))
MODEL_DIR_TAG, COMMAND_TAG = "raytl.model_dir", "raytl.command"

_failed: set[str] = set()  # runs whose tracking failed in this process: not tried again


@dataclass(frozen=True)
class Tracker:
    """Where a run's metrics go; sent to the Ray Train workers. run_id None: nothing is tracked."""

    uri: str | None = None
    run_id: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    register: str | None = None  # --mlflow-register

    def log_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's numbers (losses, accuracies, lr, workers, ...) at step = its epoch; rank 0 only."""
        metrics = _numbers({k: v for k, v in record.items() if k != "epoch"})
        self._safely(
            "log an epoch's metrics", lambda client: _log_metrics(client, self, metrics, record["epoch"])
        )

    def finish(self, model_dir: str, metrics: dict[str, Any]) -> None:
        """The final metrics, MODEL_DIR's files and the MLflow model (registered with --mlflow-register);
        the run marked finished."""
        self._safely("log the final metrics", lambda client: _log_metrics(client, self, _numbers(metrics)))
        self._safely("log MODEL_DIR's files", lambda client: _log_model_dir(client, self.run_id, model_dir))
        if self.run_id is not None and self.run_id not in _failed:
            self._log_model(model_dir)
        self.close("FINISHED")

    def _log_model(self, model_dir: str) -> None:
        """MODEL_DIR's model as the run's MLflow model (reporting/mlflow_model.py); a model that cannot be
        one (an RBF-kernel SVM, backbone weights not found) costs a warning."""
        from raytl.modeling import portable
        from raytl.modeling.classifier import Model

        try:
            program, _ = portable.export(Model.load(model_dir), model_dir)
        except Exception as exc:  # MODEL_DIR is written: whatever fails here costs the model nothing
            reason = str(exc) if isinstance(exc, RaytlError) else storage.describe_error(exc)
            log.warning("The MLflow run gets no model: %s", reason)
            return
        what = f"log the model{f' and register it as {self.register!r}' if self.register else ''}"

        def log_model(client: Any) -> None:
            from raytl.reporting import mlflow_model

            mlflow_model.log(self.uri, str(self.run_id), program, self.register)

        self._safely(what, log_model)

    def close(self, status: str) -> None:
        self._safely("close the run", lambda client: client.set_terminated(self.run_id, status))

    def _safely(self, what: str, action: Callable[[Any], Any]) -> Any:
        """action(client), or a warning (once per run and process) when the tracker fails."""
        if self.run_id is None or self.run_id in _failed:
            return None
        try:
            return action(_client(self.uri, self.env))
        except Exception as exc:
            _failed.add(self.run_id)
            _warn(self.uri, what, exc)
            return None


def _warn(uri: str | None, what: str, exc: Exception) -> None:
    log.warning(
        "MLflow tracking at %s could not %s (%s); the run goes on without it.",
        storage.redact(str(uri)), what, storage.describe_error(exc),
    )  # fmt: skip


UNTRACKED = Tracker()


def uri_of(option: str | None) -> str | None:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else None (no tracking). A local path is made absolute:
    rank 0 runs in another working directory."""
    uri = option or os.environ.get(URI_ENV) or None
    if uri and ":" not in uri and uri != "databricks":
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


@contextlib.contextmanager
def run(command: str, config: Any, metadata: dict[str, Any], resume: bool = False) -> Iterator[Tracker]:
    """The MLflow run of one train or finetune, as a Tracker (UNTRACKED when not tracking). Closed as
    FAILED (KILLED on Ctrl-C) if the command raises; `Tracker.finish` closes it when all went well."""
    tracker = _open(command, config, metadata, resume)
    try:
        yield tracker
    except BaseException as exc:
        tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _open(command: str, config: Any, metadata: dict[str, Any], resume: bool) -> Tracker:
    uri = uri_of(config.mlflow_uri)
    if uri is None:
        return UNTRACKED
    if not installed():
        log.warning("%s is set but MLflow is not installed (%s): the run is not tracked.", URI_ENV, INSTALL)
        return UNTRACKED
    settings = {**_HTTP_DEFAULTS, **{k: os.environ[k] for k in _FORWARDED if os.environ.get(k)}}
    env = tuple(sorted(settings.items()))
    try:
        run_id = _start(_client(uri, env), command, config, metadata, resume)
    except Exception as exc:
        _warn(uri, f"start a run in experiment {config.mlflow_experiment!r}", exc)
        return UNTRACKED
    log.info("MLflow run %s in experiment %r at %s", run_id, config.mlflow_experiment, storage.redact(uri))
    return Tracker(uri, run_id, env, config.mlflow_register)


def _start(client: Any, command: str, config: Any, metadata: dict[str, Any], resume: bool) -> str:
    """A new run with the options and metadata as params, or (resume) the unfinished run of MODEL_DIR."""
    from mlflow.entities import Param

    experiment = client.get_experiment_by_name(config.mlflow_experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(config.mlflow_experiment)
    )
    model_dir = storage.redact(config.model_dir)
    if resume:
        unfinished = f"tags.`{MODEL_DIR_TAG}` = '{_quoted(model_dir)}' and attributes.status != 'FINISHED'"
        found = client.search_runs(
            [experiment_id],
            filter_string=unfinished,
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    from raytl.version import VERSION

    options = {k: v for k, v in json.loads(config.to_json()).items() if k not in _OWN_OPTIONS}
    params = {**_flat(options), **_flat(metadata, "backbone.")}
    items = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in sorted(params.items())]
    name = config.mlflow_run_name or model_dir.rstrip("/").rsplit("/", 1)[-1]
    tags = {COMMAND_TAG: command, MODEL_DIR_TAG: model_dir, "raytl.version": VERSION}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params in one batch
        client.log_batch(run_id, params=items[start : start + 100])
    return run_id


def _client(uri: str | None, env: tuple[tuple[str, str], ...]) -> Any:
    for key, value in env:
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_metrics(client: Any, tracker: Tracker, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(tracker.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def _log_model_dir(client: Any, run_id: str | None, model_dir: str) -> None:
    """model.json, model.pt, kernel.skops, metrics.json, report.html and report/*.png, copied from MODEL_DIR
    (local or object storage); a fine-tune's backbone.pt is in the MLflow model's program."""
    from raytl.modeling.model_dir import (
        FIGURES_DIR,
        KERNEL_FILE,
        METRICS_FILE,
        MODEL_FILE,
        MODEL_JSON,
        REPORT_FILE,
    )

    fs, root = storage.filesystem(model_dir)
    root = root.rstrip("/")
    names = [MODEL_JSON, MODEL_FILE, KERNEL_FILE, METRICS_FILE, REPORT_FILE]
    names += [f"{FIGURES_DIR}/{p.rsplit('/', 1)[-1]}" for p in sorted(fs.glob(f"{root}/{FIGURES_DIR}/*.png"))]
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            if fs.exists(f"{root}/{name}"):
                os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
                fs.get(f"{root}/{name}", os.path.join(directory, name))
        client.log_artifacts(run_id, directory)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The int and float values (not bools) of a flat dict, as floats."""
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars kept as they are."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
