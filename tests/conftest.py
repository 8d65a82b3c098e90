"""Fixtures: a loopback S3 server (moto), one Ray for the whole session, generated image corpora."""

from __future__ import annotations

import os
import re
import socket
import uuid

import pytest

# Ray Train's controller polls its workers every 2 s by default: each training run in the suite (there are
# about ten, some in clusters of their own that inherit this environment) then waits out a poll at every
# step. A shorter interval changes no result; it only lets the suite fit its 15 minutes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Data 2.60 reads Parquet footers in a pool of 32 new actor processes on every read_parquet, however
# few the files; the suite's reads have a handful of files, and the process starts cost it more than
# anything else Ray does. One reader, the same code path.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# A raylet keeps idle worker processes only while it runs fewer than `num_workers_soft_limit` (its CPU count,
# 2 here) and kills the others after a second idle; Ray Data's and Ray Train's actors count, so every
# task worker was killed between two stages and a new one started (importing pyarrow, Ray Data, raytl: ~2
# CPU-seconds each). Kept here for reuse, as they would be on a node with more CPUs.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# Ray Train starts a PreemptionWatcher actor (a process: ~2 CPU-seconds) for every run, to act on a node's
# drain notice; no test drains a node (a lost node is killed, not drained), and the suite has ~20 runs.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Data records each run's usage in a detached actor of its own, one per cluster (a process: ~5
# CPU-seconds, in each of the suite's ~15 clusters), for Ray's usage server, which no test reaches.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The tests track runs in MLflow's file store (a folder), which MLflow 3 takes only when asked to.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

# Fake credentials, distinct enough that a test can prove the secret never leaks into any output.
SECRET_KEY = "raytl-test-secret-4b9e1f7c2d"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "raytl-test-key-id",
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    # For the boto3 clients that tests make buckets with; raytl's own S3 clients take --retries instead.
    "AWS_MAX_ATTEMPTS": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The modules that take longest, first: pytest-xdist (pyproject's addopts: -n 2 --dist loadfile, in this
# order) hands each worker a whole module at a time, and the suite ends when the later of the two does.
_LONGEST_FIRST = [
    "test_placement.py", "test_finetune.py", "test_models.py", "test_extract_faults.py", "test_predict.py",
    "test_extract.py", "test_probe.py", "test_jobs.py", "test_api.py", "test_shards.py", "test_serve.py",
    "test_registry.py", "test_report.py", "test_logs.py",
]  # fmt: skip


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two test processes (and their Rays) share two cores: the references a test computes with torch
        # itself take one thread, not two that wait on each other.
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's own tests keep their order
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request, monkeypatch):
    """A test without the `ray` mark may not start Ray (so that `-m "not ray"` runs without it)."""
    if request.node.get_closest_marker("ray") is not None:
        return

    def refused(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray")

    monkeypatch.setattr("raytl.cluster.session.init_ray", refused)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server on loopback; AWS_ENDPOINT_URL and fake credentials point every client at it."""
    import logging

    from s3faults import faulty_moto_server

    # werkzeug logs every request at INFO through a handler it creates on first use, bound to whatever
    # sys.stderr is then; under capsys that stream is later closed and every request logs a traceback.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = _free_port()
    server = faulty_moto_server("127.0.0.1", port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, tmp_path_factory):
    """One local Ray for every test (2 CPUs) in this process (pytest-xdist: one a worker); its workers
    inherit the S3 settings above from the environment (no runtime_env: every worker process would start
    through Ray's runtime-env setup first)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_faults(s3_endpoint, monkeypatch):
    """Rules that make the loopback S3 server fail chosen requests (tests/s3faults.py); cleared after.
    botocore's retries (raytl's S3 clients use its "standard" mode) go on at once in this process: they
    back off up to 1, 2, 4 ... s (jittered), which adds up to most of these tests' time and tests nothing;
    the number of attempts is what the tests count. (Ray's worker processes keep botocore's waits.)"""
    from botocore.retries.standard import ExponentialBackoff
    from s3faults import FAULTS

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)

    yield FAULTS
    FAULTS.clear()


@pytest.fixture
def bucket(s3_endpoint):
    """A new, empty bucket; its name."""
    import boto3

    name = f"raytl-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def upload_dir(local_dir, bucket: str, prefix: str) -> str:
    """Copy a local folder into s3://bucket/prefix; returns that URI."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            key = f"{prefix}/{os.path.relpath(full, local_dir)}"
            client.upload_file(full, bucket, key)
    return f"s3://{bucket}/{prefix}"


_RAY_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\S[^\n]*? pid=\d+")


def assert_user_error(capsys, args: list[str], message: str) -> str:
    """`raytl ARGS` exits 2 with one `raytl: error:` line holding `message`, no traceback, no secret."""
    from raytl.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    # Ray's worker processes may write to this process's stderr at any moment (prefixed `(Name pid=N)`, e.g.
    # a Ray Data actor of an earlier test printing its shutdown): judge only the lines that are not theirs.
    own = [line for line in err.splitlines() if not _RAY_WORKER_LINE.match(line)]
    ours = [line for line in own if line.startswith("raytl: error: ")]
    assert len(ours) == 1 and not any("Traceback" in line for line in own), err
    assert message in ours[0], ours[0]
    assert SECRET_KEY not in err
    return ours[0]


# Loads an exported model (raytl export) with plain torch, as a user without raytl would, and scores crops.
_EXPORTED = r"""
import json, sys
import numpy as np
import torch

extra = {"raytl.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
scores = program.module()(torch.from_numpy(np.load(sys.argv[2])))
print(json.dumps({
    "info": json.loads(extra["raytl.json"]),
    "scores": scores.tolist(),
    "raytl_imported": sorted(m for m in sys.modules if m.split(".")[0] == "raytl"),
}))
"""


def exported_scores(pt2, crops, tmp_path) -> dict:
    """Run an exported .pt2 on uint8 crops (N, S, S, 3) in a fresh Python that never imports raytl: its
    raytl.json, the scores, and the raytl modules it imported (none)."""
    import json
    import subprocess
    import sys

    import numpy as np

    np.save(tmp_path / "crops.npy", crops)
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORTED, str(pt2), str(tmp_path / "crops.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def predict_models(ray_session, tmp_path_factory):
    """extract (32 px, weights from a file) -> train (sklearn backend: logreg in model/, svm in model-svm/)
    on a small corpus (52 images, 4 broken files): what test_predict and test_serve classify."""
    import torch
    from images import random_state_dict, write_corpus

    from raytl.commands import extract, train
    from raytl.config import ExtractConfig, TrainConfig

    tmp = tmp_path_factory.mktemp("predict")
    write_corpus(tmp / "corpus", {"cat": [1, 2], "dog": [3, 4]}, broken=True, strays=True)
    torch.save(random_state_dict(21), tmp / "w.pt")
    extract.run(
        ExtractConfig.create(
            source=str(tmp / "corpus"),
            output=str(tmp / "emb"),
            weights=str(tmp / "w.pt"),
            image_size=32,
            precision="fp32",
        )
    )
    for head in ("logreg", "svm"):
        model_dir = "model" if head == "logreg" else f"model-{head}"
        train.run(
            TrainConfig.create(
                embeddings=str(tmp / "emb"),
                model_dir=str(tmp / model_dir),
                backend="sklearn",
                head=head,
                val_fraction=0.25,
            )  # fmt: skip
        )
    return tmp


def heavy_modules_after(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of `heavy` a fresh Python has loaded after `import IMPORTS` (a comma-separated list)."""
    import subprocess
    import sys

    code = f"import sys, {imports}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def own_processes() -> dict[int, bytes]:
    """{pid: command line} of the processes started under this test process: under pytest-xdist, the other
    worker's Ray runs workers with the same titles, and a test that finds (or kills) a Ray worker by its
    title must not take one of those. xdist's PYTEST_XDIST_WORKER, in this process's environment before
    its Ray started, is in the environment of every process that Ray starts."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    mark = f"PYTEST_XDIST_WORKER={worker}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"{entry.path}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if worker is None or mark in environ:  # one pytest process: every process is its own
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def pixels_decoded(monkeypatch):
    """The sizes of every image Pillow decodes (ImageFile.load) and of every WebP canvas it allocates."""
    from PIL import ImageFile, WebPImagePlugin

    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy_load(self):
        sizes.append(self.size)
        return load(self)

    class Webp:
        def __getattr__(self, name):
            return getattr(webp, name)

        def WebPAnimDecoder(self, data):  # noqa: N802 (Pillow's name)
            decoder = webp.WebPAnimDecoder(data)
            sizes.append(decoder.get_info()[0])
            return decoder

    webp = WebPImagePlugin._webp
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    monkeypatch.setattr(WebPImagePlugin, "_webp", Webp())
    return sizes
