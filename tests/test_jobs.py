"""`ray job submit` of jobs/extract.py then jobs/train.py against a local head node and the loopback S3."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import AWS_ENV, upload_dir
from images import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def head_node(tmp_path_factory, s3_endpoint):
    """`ray start --head --block` on free ports with its own temp dir; stopped even when the test fails."""
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *AWS_ENV, "AWS_ENDPOINT_URL")}
    env["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns on token auth for `ray start` by default
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=2",
            "--object-store-memory=400000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_api(address, env, head)
        yield address, env
    finally:
        _stop(head, temp_dir)


def _wait_for_job_api(address, env, head, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        probe = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", address],
            env=env,
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the job API at {address} did not come up")


def _stop(head, temp_dir):
    """Stop this head node's processes only (`ray stop` would stop the test session's Ray too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_mentioning(temp_dir) + [head.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    head.wait(timeout=30)


def _pids_mentioning(text):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


def _submit(address, env, *args):
    runtime_env = {"env_vars": {**AWS_ENV, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ROOT,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _succeeded(address, env, proc):
    """The submission returned 0 and Ray's job API reports the job SUCCEEDED."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    job = re.search(r"Job '(raysubmit_\w+)' succeeded", output)
    assert job, output[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(job.group(1)) == JobStatus.SUCCEEDED


def test_submit_extract_then_train(head_node, tmp_path, bucket):
    address, env = head_node
    good = write_corpus(tmp_path / "corpus", {"cat": [1], "dog": [2]}, broken=True, strays=True)
    source = upload_dir(tmp_path / "corpus", bucket, "corpus")
    extract = _submit(
        address,
        env,
        "jobs/extract.py",
        source,
        f"s3://{bucket}/emb",
        "--weights",
        "random",
        "--image-size",
        "32",
    )
    _succeeded(address, env, extract)
    train = _submit(
        address,
        env,
        "jobs/train.py",
        f"s3://{bucket}/emb",
        f"s3://{bucket}/model",
        "--epochs",
        "5",
        "--workers",
        "2",
    )
    _succeeded(address, env, train)
    fs = s3fs.S3FileSystem()
    parts = [p for p in fs.ls(f"{bucket}/emb") if p.rsplit("/", 1)[-1].startswith("part-")]
    rows = sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in parts)
    assert rows == len(good) == 26
    metrics = json.loads(fs.cat_file(f"{bucket}/model/metrics.json"))
    assert metrics["classes"] == ["cat", "dog"] and metrics["backend"] == "ray"
    assert len(metrics["history"]) == 5 and np.array(metrics["confusion_matrix"]).sum() == metrics["samples"]
