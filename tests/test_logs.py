"""--log-format json: every line on a raytl process's stderr is one JSON object, and each line comes once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from raytl.cluster import session
from raytl.reporting import logs


def test_lines_written_past_logging_become_json_objects():
    glog = (
        "[2026-11-29 01:56:19,162 E 3454 3454] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(Embedder))' has constructor arguments in the object store"
    )
    assert json.loads(logs.json_line(glog)) == {
        "time": "2026-11-29T01:56:19",
        "level": "error",
        "logger": "ray.core_worker.cc",
        "message": "Actor with class name: 'MapWorker(MapBatches(Embedder))' has constructor arguments in "
        "the object store",
    }
    forwarded = json.loads(logs.json_line("\x1b[36m(MapWorker(MapBatches(Embedder)) pid=9784)\x1b[0m oops"))
    assert (forwarded["worker"], forwarded["logger"], forwarded["message"]) == (
        "MapWorker(MapBatches(Embedder)) pid=9784",
        "ray.worker",
        "oops",
    )
    rays = '{"asctime": "2026-11-29 01:59:44,691", "levelname": "WARNING", "message": "m", "job_id": "01"}'
    inner = json.loads(logs.json_line(f"(RayTrainWorker pid=7, ip=10.0.0.3) {rays}"))
    assert inner == {
        "time": "2026-11-29T01:59:44",
        "level": "warning",
        "logger": "ray",
        "message": "m",
        "job_id": "01",
        "worker": "RayTrainWorker pid=7, ip=10.0.0.3",
    }
    plain = json.loads(logs.json_line("Traceback (most recent call last):"))
    assert (plain["logger"], plain["message"]) == ("stderr", "Traceback (most recent call last):")
    ours = '{"time": "2026-11-29T02:00:00", "level": "warning", "logger": "raytl.x", "message": "kept"}'
    assert logs.json_line(ours) == ours


SCRIPT = """
import logging, os, sys, time
import ray
from raytl.cluster import session
from raytl.reporting import logs
logs.setup("warning", json_lines=True)
logs.relay_stderr_as_json()
session.init_ray()
logging.getLogger("raytl.check").warning("said once")
os.write(2, b"[2026-11-29 01:56:19,162 E 1 1] core_worker.cc:2465: straight to the descriptor\\n")

@ray.remote
def shout():
    print("from a worker", file=sys.stderr)

ray.get(shout.remote())
time.sleep(2)  # Ray forwards worker output to the driver asynchronously
"""


def test_the_final_error_line_is_an_error_under_json(tmp_path, capsys):
    """The command's last line is graded as what it is: `raytl: error:` at level error (it was "info", as a
    line written past logging), `raytl: interrupted` a warning; plain text without --log-format json."""
    from raytl.cli import main

    missing = str(tmp_path / "missing")
    assert main(["--log-format", "json", "train", missing, str(tmp_path / "m")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("error", "raytl")
    assert entry["message"] == f"raytl: error: {missing} does not exist."
    logs.setup("warning", json_lines=True)
    logs.final_line("raytl: interrupted; rerun the same command to resume.", logging.WARNING)
    assert json.loads(capsys.readouterr().err)["level"] == "warning"
    assert main(["train", missing, str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"raytl: error: {missing} does not exist."
    # argparse's own refusals come before logging is set up: one object too.
    for argv in (["--log-format", "json", "train", missing], ["train", "--log-format=json"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        (line,) = capsys.readouterr().err.strip().splitlines()
        entry = json.loads(line)
        assert exit_.value.code == 2 and (entry["level"], entry["logger"]) == ("error", "raytl")
        assert entry["message"].startswith("raytl train: error: the following arguments are required:")
    with pytest.raises(SystemExit):
        main(["train", missing])
    assert capsys.readouterr().err.startswith("usage: raytl train")


def test_a_json_run_writes_only_json_lines_each_once(ray_session):
    """A process that joins Ray with --log-format json: raytl's warning once (ray.init had given the root
    logger a second, Ray-shaped handler), the core worker's C++ line and a worker's forwarded line as JSON."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # each one a JSON object
    messages = [line["message"] for line in lines]
    assert messages.count("said once") == 1
    assert {
        "logger": "ray.core_worker.cc",
        "level": "error",
        "message": "straight to the descriptor",
    }.items() <= next(line for line in lines if line["logger"] == "ray.core_worker.cc").items()
    # Ray forwards a worker's plain output bare here (no "(shout pid=…)" prefix when workers log JSON).
    assert messages.count("from a worker") == 1


_OWN_RAY = """
import json, ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from raytl.cluster import session

session.init_ray()  # a local Ray of its own, beside the test session's

@ray.remote(num_cpus=0)
def look_up():  # as Ray Train's placement group cleaner does through the state API: no address given
    try:
        return canonicalize_bootstrap_address_or_die(None)
    except ConnectionError as exc:
        return str(exc)

print(json.dumps([ray.get_runtime_context().gcs_address, ray.get(look_up.remote())]))
"""


def test_a_second_ray_on_the_host_changes_nothing_for_raytls_workers(ray_session):
    """With another Ray running on the host (this session's), Ray's own lookups inside raytl's workers find
    raytl's Ray, not "Found multiple active Ray instances" (a traceback in every `raytl train`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", _OWN_RAY], env=env, capture_output=True, text=True, timeout=180, check=True
    )
    own, found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == own != ray_session.get_runtime_context().gcs_address


@pytest.mark.ray
def test_ray_start_up_is_retried_once_then_one_sentence(monkeypatch, capsys):
    """Under heavy load a local Ray's start-up times out (a traceback from session.init_ray): raytl tries once
    more, and a second failure is one `raytl: error:` sentence naming the likely causes."""
    import ray

    calls = []

    def init(**options):
        calls.append(options)
        if len(calls) == 1 or fail_always:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(logs, "quiet_ray", lambda: None)
    fail_always = False
    session.init_ray()
    assert len(calls) == 2
    fail_always, calls[:] = True, []
    from raytl.errors import USER_ERRORS, RayStartError

    with pytest.raises(RayStartError) as raised:
        session.init_ray()
    assert len(calls) == 2 and issubclass(RayStartError, USER_ERRORS)  # the CLI prints it in one line
    assert str(raised.value) == (
        "raytl could not start a local Ray instance, twice (Exception: The current node timed out during "
        "startup): the machine may be overloaded, /tmp (Ray's session folder) full, or Ray's ports taken."
    )
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RayStartError, match=r"^raytl could not join the Ray cluster at 10.0.0.1:6379, twice"):
        session.init_ray()
