"""`ray job submit` of jobs/extract.py then jobs/train.py to a cluster of their own, with the loopback S3."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from clusters import start_head, stop
from conftest import upload_dir
from images import write_corpus

pytestmark = pytest.mark.ray  # every test here starts a Ray cluster of its own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _submit(address, env, *args):
    # No runtime_env: the credentials are in the nodes' environment, where the README says they belong.
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


@pytest.fixture
def head_node(s3_endpoint):
    """A Ray cluster of this test's own (clusters.py): a head with 2 CPUs and the job API. The S3 settings
    are in the environment of its `ray start`, as the README advises, never in a job's runtime_env."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = start_head(env)
    yield head
    stop(head)


def test_submit_extract_then_train(head_node, tmp_path, bucket):
    address, env = head_node.dashboard, head_node.env
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
