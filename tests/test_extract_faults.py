"""Nothing lost: an embedding actor or the driver killed mid-run, flaky or forbidden S3, --max-errors.

Every test counts rows exactly: each image in the output once, none missing, none twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import assert_user_error, own_processes
from images import encode, picture, write_corpus
from s3faults import Rule

from raytl.cli import main

IMAGES = 1000
OPTIONS = ["--weights", "random", "--image-size", "32", "--precision", "fp32", "--decode-batch", "50"]
SMALL_PARTS = ["--rows-per-file", "100"]  # many small parts, so that a run can be stopped between them
# Without --rows-per-file a part holds about RAYTL_PART_SECONDS of the expected rate: 245 images/s at 32 px.
DEFAULT_PART_ROWS, PART_SECONDS = 98, "0.4"


def upload_pictures(bucket: str, prefix: str, count: int) -> dict[str, str]:
    """count small JPEGs in two classes under s3://bucket/prefix; returns {uri: label}."""
    client = boto3.client("s3")
    keys = {f"{prefix}/{'ab'[i % 2]}/{i:04d}.jpg": "ab"[i % 2] for i in range(count)}

    def put(item: tuple[int, str]) -> None:
        i, key = item
        client.put_object(Bucket=bucket, Key=key, Body=encode(picture(i, 40, 32), "JPEG", quality=90))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, enumerate(keys)))
    return {f"s3://{bucket}/{key}": label for key, label in keys.items()}


@pytest.fixture(scope="module")
def corpus(ray_session):
    bucket = f"raytl-faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket, upload_pictures(bucket, "corpus", IMAGES)


def start_cli(ray_session, tmp_path, *args, **env_vars: str) -> subprocess.Popen:
    """`raytl ARGS` as its own driver process on the session's Ray, as a user would start it."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, **env_vars)
    log = open(tmp_path / f"driver-{uuid.uuid4().hex[:6]}.log", "w")  # noqa: SIM115 (lives with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "raytl.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _s3() -> s3fs.S3FileSystem:
    # One client for all polling: a new one per poll costs the (in-process) S3 server's CPU.
    return s3fs.S3FileSystem(use_listings_cache=False)


def parts(output: str) -> list[str]:
    fs = _s3()
    if not fs.exists(output.removeprefix("s3://")):
        return []
    return [
        p
        for p in fs.ls(output.removeprefix("s3://"), refresh=True)
        if p.rsplit("/", 1)[-1].startswith("part-")
    ]


def written_paths(output: str) -> list[str]:
    """Every row's path over all part files, duplicates kept."""
    return [path for part in part_paths(output) for path in part]


def part_paths(output: str) -> list[list[str]]:
    """The paths of each part file's rows."""
    fs = _s3()
    paths = []
    for part in parts(output):
        with fs.open(part, "rb") as f:
            paths.append(pq.read_table(f, columns=["path"]).column("path").to_pylist())
    return paths


def summary(output: str) -> dict:
    return json.loads(
        s3fs.S3FileSystem(skip_instance_cache=True).cat_file(f"{output.removeprefix('s3://')}/_summary.json")
    )


def pipeline_processes(stage: bytes = b"MapBatches") -> set[int]:
    """Ray worker processes now running a stage of an extract (their process title names it)."""
    return {pid for pid, title in own_processes().items() if title.startswith(b"ray::") and stage in title}


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)  # polling S3 and /proc costs CPU the run under test needs


def test_driver_killed_then_rerun_with_an_actor_killed(corpus, ray_session, tmp_path):
    """SIGKILL the driver halfway through a run with the default part size (no --rows-per-file: parts come
    about every RAYTL_PART_SECONDS, shortened here from a minute); run the same command again, and SIGKILL
    the model actor's process during that run: the rerun skips what was written, Ray restarts the actor and
    retries its batch, and every image ends up in the output exactly once."""
    bucket, expected = corpus
    output = f"s3://{bucket}/out"
    args = ["extract", f"s3://{bucket}/corpus", output, *OPTIONS]
    # Idle actors of earlier tests in this session may linger until collected: only count new processes.
    lingering = pipeline_processes()
    driver = start_cli(ray_session, tmp_path, *args, RAYTL_PART_SECONDS=PART_SECONDS)
    wait_for(lambda: len(parts(output)) >= 3, "three part files")
    driver.kill()
    driver.wait()
    wait_for(lambda: pipeline_processes() <= lingering, "Ray to end the dead driver's tasks and actors", 120)
    # Ray Data cuts a batch_size'd batch off each bundle of blocks it gives a writer; the rest of the bundle
    # is a smaller part.
    assert max(len(part) for part in part_paths(output)) == DEFAULT_PART_ROWS
    before, written = written_paths(output), len(parts(output))
    assert 0 < len(before) < IMAGES and len(set(before)) == len(before)

    rerun = start_cli(ray_session, tmp_path, *args, RAYTL_PART_SECONDS=PART_SECONDS)
    try:
        wait_for(lambda: len(parts(output)) > written, "the rerun's first part file")
        own = pipeline_processes(b"MapBatches(Embedder)") - lingering
        assert len(own) == 1, own
        victim = min(own)
        os.kill(victim, signal.SIGKILL)
        written_at_kill = len(written_paths(output))
        actors = set()
        deadline = time.monotonic() + 300
        while rerun.poll() is None:
            actors |= pipeline_processes(b"MapBatches(Embedder)") - lingering - own
            assert time.monotonic() < deadline, "the rerun did not finish within 300 s"
            time.sleep(0.5)
    finally:
        rerun.kill()  # a failed assertion must not leave a run holding this Ray's CPUs for later tests
        rerun.wait()
    assert rerun.returncode == 0
    assert actors, "Ray started a new model actor after the kill"
    assert written_at_kill < IMAGES  # the kill came with work left to do

    done = summary(output)
    assert (done["seen"], done["skipped"], done["embedded"], done["failed"]) == (
        IMAGES,
        len(before),
        IMAGES - len(before),
        0,
    )
    paths = written_paths(output)
    assert len(paths) == IMAGES and set(paths) == set(expected)


def test_flaky_storage_is_retried(ray_session, bucket, s3_faults):
    """One read in three fails twice with a 500, one write in two once with a 503 SlowDown: all retried."""
    expected = upload_pictures(bucket, "corpus", 48)
    reads = s3_faults.add(Rule(bucket=bucket, prefix="corpus/", status=500, every=3, times=2))
    writes = s3_faults.add(
        Rule(bucket=bucket, prefix="out/", method="PUT", status=503, code="SlowDown", every=2, times=1)
    )
    output = f"s3://{bucket}/out"
    assert main(["extract", f"s3://{bucket}/corpus", output, *OPTIONS, *SMALL_PARTS]) == 0
    assert reads.injected >= 10 and writes.injected >= 1
    paths = written_paths(output)
    assert len(paths) == 48 and set(paths) == set(expected)
    assert summary(output)["failed"] == 0


def test_access_denied_stops_the_run_with_one_sentence(capsys, ray_session, bucket, s3_faults):
    upload_pictures(bucket, "corpus", 24)
    rule = Rule(
        bucket=bucket, prefix="corpus/b/0007", status=403, code="AccessDenied", message="Access Denied"
    )
    rule.times = None
    s3_faults.add(rule)
    output = f"s3://{bucket}/out"
    assert_user_error(
        capsys,
        ["extract", f"s3://{bucket}/corpus", output, *OPTIONS, *SMALL_PARTS],
        f"cannot read s3://{bucket}/corpus/b/0007.jpg: access denied",
    )
    assert rule.attempts == {"corpus/b/0007.jpg": 1}  # permanent: never retried
    assert not s3fs.S3FileSystem().exists(f"{bucket}/out/_summary.json")


def test_max_errors_stops_a_run_over_broken_files(capsys, ray_session, tmp_path):
    write_corpus(tmp_path / "src", {"cat": [1]}, broken=True, strays=False)  # 13 images, 4 broken files
    src = str(tmp_path / "src")
    message = assert_user_error(
        capsys,
        ["extract", src, str(tmp_path / "out1"), *OPTIONS, *SMALL_PARTS, "--max-errors", "2"],
        "more than --max-errors 2",
    )
    assert "files could not be read or decoded" in message and "_errors" in message
    assert (
        main(["extract", src, str(tmp_path / "out2"), *OPTIONS, *SMALL_PARTS, "--max-errors", "25%"]) == 0
    )  # 4 of 17
    done = json.loads((tmp_path / "out2" / "_summary.json").read_text())
    assert (done["embedded"], done["failed"]) == (13, 4)


def test_a_pass_that_loses_part_of_the_cluster_is_resumed(ray_session, tmp_path, monkeypatch, caplog):
    """The first pass writes part of the corpus and then loses a model actor that Ray does not bring back:
    the run goes on over what OUTPUT lacks, and counts every image once, the broken files too.
    --max-failures 0 lets the loss end the run."""
    import ray

    from raytl.commands import extract
    from raytl.config import ExtractConfig

    write_corpus(tmp_path / "src", {"cat": [1], "dog": [2]}, broken=True, strays=False)  # 26 images, 4 broken
    real, passes, share = extract._embed_all, [], 2

    def losing(stages, todo, *args):
        passes.append(todo.table.num_rows)
        if len(passes) == 1:  # the first pass gets through 1/share of its files, then loses an actor
            real(stages, type(todo)(todo.table.slice(0, todo.table.num_rows // share), 0), *args)
            raise ray.exceptions.ActorDiedError()
        return real(stages, todo, *args)

    monkeypatch.setattr(extract, "_embed_all", losing)
    options = dict(source=str(tmp_path / "src"), weights="random", image_size=32, precision="fp32")
    output = tmp_path / "out"
    done = extract.run(ExtractConfig.create(output=str(output), rows_per_file=4, **options))
    assert passes == [30, 15]
    assert (done["seen"], done["embedded"], done["failed"], done["skipped"]) == (30, 26, 4, 0)
    assert "lost part of the cluster (ActorDiedError): resuming from what" in caplog.text
    assert "(retry 1 of --max-failures 3)" in caplog.text
    embedded = pq.read_table(output, columns=["path"]).column("path").to_pylist()
    failed = pq.read_table(output / "_errors", columns=["path"]).column("path").to_pylist()
    files = {str(p) for p in (tmp_path / "src").rglob("*") if p.is_file()}
    assert len(embedded) == 26 and len(failed) == 4 and set(embedded) | set(failed) == files

    passes.clear()  # an actor lost once every file was written: nothing is left for another pass
    share = 1
    done = extract.run(ExtractConfig.create(output=str(tmp_path / "out2"), **options))
    assert passes == [30] and (done["seen"], done["embedded"], done["failed"]) == (30, 26, 4)
    assert pq.read_table(tmp_path / "out2").num_rows == 26

    passes.clear()
    share = 30  # one file
    config = ExtractConfig.create(output=str(tmp_path / "out3"), max_failures=0, **options)
    with pytest.raises(ray.exceptions.ActorDiedError):
        extract.run(config)
    assert passes == [30]


def test_only_losses_of_cluster_parts_are_retried():
    import ray

    from raytl.commands.extract import lost_cluster_part

    assert lost_cluster_part(ray.exceptions.ActorDiedError())
    assert lost_cluster_part(ray.exceptions.NodeDiedError("node gone"))
    assert lost_cluster_part(ray.exceptions.WorkerCrashedError())
    # An actor whose __init__ raised would raise again; a user's or raytl's own error is not Ray's loss.
    assert not lost_cluster_part(ray.exceptions.RayActorError(error_msg="init", actor_init_failed=True))
    assert not lost_cluster_part(ValueError("bad file"))


def test_model_actors_that_die_starting_are_replaced_a_few_times(ray_session):
    """Ray Data fails a run at the first model actor that dies before it is ready, by default; raytl allows
    a few (a pending actor given up on while an autoscaling pool shrinks). The allowance must be set on
    the Dataset that runs, which copied the DataContext when its first stage was made."""
    import ray

    from raytl.cluster.embedder import Embedder, Resources, on_actors
    from raytl.config import embed_config

    default = ray.data.DataContext.get_current().max_consecutive_actor_init_deaths
    rows = ray.data.from_items([{"x": 1}])
    embedded = on_actors(rows, Embedder, None, embed_config(), Resources(gpus=0, cpus=2, use_gpu=False))
    assert embedded.context.max_consecutive_actor_init_deaths == 3 != default
    assert ray.data.DataContext.get_current().max_consecutive_actor_init_deaths == default
