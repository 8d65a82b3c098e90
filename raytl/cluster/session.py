"""The Ray session a raytl command runs in: join RAY_ADDRESS's cluster or start a local one (retried once),
with raytl's log settings in the driver and in every worker."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from raytl.errors import RayStartError
from raytl.reporting import logs


def init_ray() -> None:
    """Start or join Ray (RAY_ADDRESS, else a local instance) with raytl's log settings."""
    import ray

    if ray.is_initialized():
        logs.quiet_ray()
        return
    debug = logs.SETTINGS.level <= logging.DEBUG
    if not debug:
        # Ray's deprecation notices about its own internals are off too (here, and in the workers of a
        # Ray started here).
        warnings.filterwarnings("ignore", module=r"ray\.")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    if logs.SETTINGS.level > logging.INFO:
        # Before init: its first lines come early (e.g. that a local Ray uses token authentication).
        for name in ("ray", "ray._private.authentication"):
            logging.getLogger(name).setLevel(logging.ERROR)
    starts_local = _starts_local()
    if starts_local:
        # Ray Train's preemption watcher (an actor a run: a process, and an "actor restart" warning of Ray's
        # on stderr) acts on a cloud node's drain notice; a Ray that raytl starts on this host gets none.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    _start_ray(
        # Ray's own warnings (e.g. that a local instance uses token authentication) from --log-level info.
        logging_level=logs.SETTINGS.level if logs.SETTINGS.level <= logging.INFO else logging.ERROR,
        # Workers log at WARNING (Ray Data's and Ray Train's INFO lines off); raytl's own progress comes
        # from the driver.
        logging_config=ray.LoggingConfig(
            encoding="JSON" if logs.SETTINGS.json else "TEXT", log_level="DEBUG" if debug else "WARNING"
        ),
        runtime_env=_runtime_env(starts_local),
    )
    # ray.init's logging_config also gives this process's root logger a handler of Ray's: every raytl line
    # would print twice (once in Ray's own JSON shape). The workers keep Ray's.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() != logs.HANDLER:
            root.removeHandler(handler)
    logs.quiet_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = debug
    ray.data.DataContext.get_current().print_on_execution_start = debug


def _start_ray(**options: Any) -> None:
    """ray.init, tried twice: under heavy load a local Ray's start-up times out ("The current node timed out
    during startup") and a second try usually works; a second failure is one sentence (RayStartError)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    for attempt in (1, 2):
        try:
            ray.init(**options)
            return
        except Exception as exc:
            ray.shutdown()  # whatever half-started
            if attempt == 1:
                logging.getLogger(__name__).warning("Ray did not start (%s); once more", _first_line(exc))
                continue
            what = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
            causes = (
                "is the cluster up and its address right?"
                if address
                else "the machine may be overloaded, /tmp (Ray's session folder) full, or Ray's ports taken"
            )
            raise RayStartError(f"raytl could not {what}, twice ({_first_line(exc)}): {causes}.") from None


def _first_line(exc: BaseException) -> str:
    """The exception's first sentence (Ray's start-up errors run to a paragraph)."""
    text = str(exc).strip().split("\n", 1)[0].split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _runtime_env(starts_local: bool) -> dict[str, Any] | None:
    """The job's runtime_env: raytl's worker environment, and, when this process starts a local Ray on a
    host where another Ray runs, `name_own_ray` in every worker (a runtime_env makes each worker start
    through Ray's runtime-env agent: ~10 s more for the quickstart, paid only where it is needed)."""
    from ray._private.services import find_gcs_addresses

    env: dict[str, Any] = {"env_vars": logs.SETTINGS.worker_env} if logs.SETTINGS.worker_env else {}
    if starts_local and find_gcs_addresses():
        env["worker_process_setup_hook"] = "raytl.cluster.session.name_own_ray"
    return env or None


def _starts_local() -> bool:
    """Whether ray.init will start a Ray on this host (no RAY_ADDRESS, no `ray start` cluster here)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None) is None  # type: ignore[arg-type]
    except Exception:  # Ray names a bad RAY_ADDRESS itself, in ray.init
        return False


def name_own_ray() -> None:
    """Every worker process of a raytl job starts here (Ray's worker_process_setup_hook): RAY_ADDRESS names
    the cluster the worker belongs to. What Ray looks up by address inside a worker (Ray Train's placement
    group cleaner asks the state API, which, given no address, refuses a host running several Ray
    instances: "Found multiple active Ray instances") then finds its own, whatever else runs on the host."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
