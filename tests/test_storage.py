"""Storage faults against the loopback S3 server: transient errors retried, permanent ones one sentence."""

from __future__ import annotations

import os

import boto3
import fsspec
import fsspec.implementations.memory
import pytest
from s3faults import Rule

from raytl.cluster import session
from raytl.errors import StorageError
from raytl.files import storage


@pytest.fixture
def objects(bucket, monkeypatch):
    monkeypatch.setattr(storage, "_FIRST_WAIT", 0.01)  # the same back-off, faster
    client = boto3.client("s3")
    uris = []
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"in/{i}.jpg", Body=f"image {i}".encode())
        uris.append(f"s3://{bucket}/in/{i}.jpg")
    return uris


def test_transient_errors_are_retried(objects, bucket, s3_faults):
    rule = s3_faults.add(Rule(bucket=bucket, prefix="in/", status=500, times=2))
    assert storage.fetch_many(objects) == [f"image {i}".encode() for i in range(6)]
    assert rule.injected == 12 and set(rule.attempts.values()) == {3}  # two failures, then the read


def test_objects_are_read_with_one_get_each_and_no_head(objects, bucket, s3_faults):
    """fetch_many's S3 reads (boto3 from threads): a GET an object, nothing else asked of the store."""
    gets = s3_faults.add(Rule(bucket=bucket, prefix="in/", method="GET", times=0))
    heads = s3_faults.add(Rule(bucket=bucket, prefix="in/", method="HEAD", times=0))
    got = storage.fetch_many([*objects, f"s3://{bucket}/in/gone.jpg"])
    assert got[:-1] == [f"image {i}".encode() for i in range(6)] and isinstance(got[-1], FileNotFoundError)
    assert gets.attempts == {f"in/{i}.jpg": 1 for i in [*range(6), "gone"]} and heads.attempts == {}
    assert gets.injected == heads.injected == 0


def test_writes_are_retried(bucket, s3_faults):
    rule = s3_faults.add(Rule(bucket=bucket, method="PUT", status=500, times=3))
    storage.write_bytes(f"s3://{bucket}/out/part-1.parquet", b"rows")
    assert storage.read_bytes(f"s3://{bucket}/out/part-1.parquet") == b"rows"
    assert rule.injected == 3


def test_retries_run_out_with_one_sentence(objects, bucket, s3_faults, monkeypatch):
    monkeypatch.setenv("RAYTL_RETRIES", "2")
    rule = s3_faults.add(Rule(bucket=bucket, prefix="in/3", status=500, times=None))
    with pytest.raises(StorageError) as info:
        storage.fetch_many(objects)
    assert str(info.value).startswith(f"cannot read s3://{bucket}/in/3.jpg: ")
    assert "still failing after 2 retries" in str(info.value)
    assert rule.attempts == {"in/3.jpg": 3}


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_sustained_throttling_is_retried_by_one_layer_only(bucket, s3_faults, monkeypatch, method):
    """SlowDown on every request: botocore retries --retries times and nothing multiplies that (s3fs's own
    loop and raytl's would make 5 x 6 x botocore's requests of each)."""
    monkeypatch.setenv("RAYTL_RETRIES", "3")
    boto3.client("s3").put_object(Bucket=bucket, Key="in/slow.jpg", Body=b"image")
    rule = s3_faults.add(
        Rule(bucket=bucket, prefix="in/slow", method=method, status=503, code="SlowDown", times=None)
    )
    uri = f"s3://{bucket}/in/slow.jpg"
    with pytest.raises(StorageError, match=f"cannot (read|write) {uri}: .*still failing after 3 retries"):
        storage.read_bytes(uri) if method == "GET" else storage.write_bytes(uri, b"new")
    assert rule.attempts == {"in/slow.jpg": 4}


class Flaky(fsspec.implementations.memory.MemoryFileSystem):
    """A filesystem without retries of its own (as http and local ones), whose reads fail `fails` times."""

    protocol = "flaky"
    fails = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def cat_file(self, path, start=None, end=None, **kwargs):
        if Flaky.fails > 0:
            Flaky.fails -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().cat_file(path, start, end, **kwargs)


def test_filesystems_without_retries_of_their_own_get_raytls(monkeypatch):
    monkeypatch.setattr(storage, "_FIRST_WAIT", 0.001)
    fsspec.register_implementation("flaky", Flaky, clobber=True)
    fsspec.filesystem("flaky").pipe_file("/in/a.jpg", b"image")
    monkeypatch.setattr(Flaky, "fails", 2)
    assert storage.read_bytes("flaky:///in/a.jpg") == b"image"
    monkeypatch.setenv("RAYTL_RETRIES", "1")
    monkeypatch.setattr(Flaky, "fails", 2)
    with pytest.raises(StorageError, match="still failing after 1 retry;"):
        storage.read_bytes("flaky:///in/a.jpg")
    assert Flaky.fails == 0  # two attempts, both failed


@pytest.mark.ray
def test_retries_on_the_command_line_reach_this_process_and_rays_workers(bucket, s3_faults, monkeypatch):
    """--retries N: storage calls here make N + 1 attempts; a Ray started here gets RAYTL_RETRIES in its
    job's runtime_env (the workers' storage calls read it); the environment is as it was afterwards."""
    import ray

    from raytl.cli import main
    from raytl.reporting import logs

    monkeypatch.delenv("RAYTL_RETRIES", raising=False)
    rule = s3_faults.add(Rule(bucket=bucket, prefix="m/", status=500, times=None))
    boto3.client("s3").put_object(Bucket=bucket, Key="m/model.json", Body=b"{}")
    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(logs, "quiet_ray", lambda: None)
    others: list[str] = []  # the Ray instances already on this host (none, then one)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: others)
    assert main(["--retries", "1", "inspect", f"s3://{bucket}/m"]) == 2
    assert set(rule.attempts.values()) == {2}
    assert "RAYTL_RETRIES" not in os.environ
    session.init_ray()
    assert inits[-1]["runtime_env"] == {"env_vars": {"RAYTL_RETRIES": "1"}}
    logs.setup()
    session.init_ray()
    assert inits[-1]["runtime_env"] is None
    others.append("127.0.0.1:6379")  # another Ray here: the workers name their own (session.name_own_ray)
    session.init_ray()
    assert inits[-1]["runtime_env"] == {"worker_process_setup_hook": "raytl.cluster.session.name_own_ray"}


@pytest.mark.ray  # calls init_ray, with ray.init replaced
def test_a_ray_started_here_runs_no_preemption_watcher_and_a_clusters_keeps_it(monkeypatch):
    """Ray Train's preemption watcher (an actor a run) acts on a node's drain notice: a Ray that raytl starts
    on this host gets none; a cluster's nodes may (spot), so there it stays on."""
    import ray

    from raytl.reporting import logs

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(logs, "quiet_ray", lambda: None)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    session.init_ray()
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    session.init_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_access_denied_fails_at_once(objects, bucket, s3_faults):
    rule = s3_faults.add(
        Rule(
            bucket=bucket, prefix="in/2", status=403, code="AccessDenied", message="Access Denied", times=None
        )
    )
    with pytest.raises(StorageError, match=f"cannot read s3://{bucket}/in/2.jpg: access denied"):
        storage.fetch_many(objects)
    assert rule.attempts == {"in/2.jpg": 1}  # permanent: not retried


def test_a_missing_file_is_the_files_problem_a_missing_bucket_the_runs(objects, bucket):
    got = storage.fetch_many([objects[0], f"s3://{bucket}/in/gone.jpg"])
    assert got[0] == b"image 0" and isinstance(got[1], FileNotFoundError)
    with pytest.raises(StorageError, match="cannot read s3://raytl-no-such-bucket/a.jpg: .*no such bucket"):
        storage.fetch_many(["s3://raytl-no-such-bucket/a.jpg"])


def test_transient_is_told_from_permanent():
    assert storage.is_transient(TimeoutError("read timed out"))
    assert storage.is_transient(
        OSError("An error occurred (SlowDown) when calling GetObject: reduce your request rate")
    )
    assert storage.is_transient(OSError("Server disconnected"))
    assert not storage.is_transient(PermissionError("Access Denied"))
    assert not storage.is_transient(FileNotFoundError("/data/500/image.jpg"))
    assert not storage.is_transient(OSError("[Errno 28] No space left on device"))


def test_outputs_and_inputs_that_fail_are_one_sentence(bucket, s3_faults, capsys, tmp_path):
    """An unwritable OUTPUT, and S3 that refuses OUTPUT, EMBEDDINGS or an inspected folder (403): one
    sentence and exit 2 from every command, never a traceback (fs.exists and listings were unguarded)."""
    from conftest import assert_user_error
    from images import write_corpus

    write_corpus(tmp_path / "src", {"cat": [1]}, broken=False, strays=False)

    def extract(output: str) -> list[str]:
        return ["extract", str(tmp_path / "src"), output, "--weights", "random", "--image-size", "32"]

    line = assert_user_error(capsys, extract("/proc/raytl-x"), "cannot write /proc/raytl-x/_run.json:")
    assert line.endswith("(no such bucket or path).")
    assert_user_error(
        capsys, extract("/sys/raytl-x"), "cannot write /sys/raytl-x/_run.json: permission denied"
    )
    s3_faults.add(
        Rule(
            bucket=bucket, status=403, code="AccessDenied", message="Access Denied", times=None, listing=True
        )
    )
    s3_faults.add(
        Rule(
            bucket=bucket, status=403, code="AccessDenied", message="Access Denied", times=None, method="HEAD"
        )
    )
    for args, what in (
        (extract(f"s3://{bucket}/out"), f"cannot list OUTPUT s3://{bucket}/out: access denied"),
        (["train", f"s3://{bucket}/emb", str(tmp_path / "m")], f"cannot read EMBEDDINGS s3://{bucket}/emb:"),
        (["inspect", f"s3://{bucket}/out"], f"cannot read s3://{bucket}/out: access denied"),
    ):
        assert_user_error(capsys, args, what)


def test_a_scheme_without_its_filesystem_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here (raytl[gcs]): the message is for machines without it")
    with pytest.raises(StorageError) as raised:
        storage.filesystem("gs://bucket/photos/")
    assert str(raised.value) == (
        "gs://bucket/photos/: gs:// needs the package gcsfs, which is not installed: "
        'pip install -c requirements/lock.txt "raytl[gcs]".'
    )
    with pytest.raises(StorageError, match="no filesystem knows the scheme 'nosuch'"):
        storage.filesystem("nosuch://x/y")


def test_no_secret_reaches_logs_or_outputs(tmp_path, monkeypatch, capsys):
    """A URI password never reaches a `path` column, a config line or any line raytl logs; a session token
    is redacted from log lines; botocore's request logs (every header, tokens included) stay off under
    --log-level debug unless RAYTL_WIRE_LOGS=1."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytl.config import ExtractConfig
    from raytl.files import doneset, writer
    from raytl.reporting import logs

    url = "https://user:hunter2@images.example/cat/a.jpg"
    batch = pa.table(
        {"path": [url, "s3://b/k.jpg"], "label": ["cat", "dog"], "error": ["", "cannot decode: x"]}
    )
    schema = pa.schema([("path", pa.string()), ("label", pa.string())])
    writer.write_part(batch, str(tmp_path / "out"), schema)
    written = (
        pq.read_table(tmp_path / "out").to_pylist() + pq.read_table(tmp_path / "out" / "_errors").to_pylist()
    )
    assert [r["path"] for r in written] == ["https://***@images.example/cat/a.jpg", "s3://b/k.jpg"]
    assert doneset.contains(doneset.of([written[0]["path"]]), [url])[0]  # a rerun knows it is done
    config = ExtractConfig.create(
        source=None, manifest="https://u:hunter2@h.example/m.csv", output="s3://b/o"
    )
    assert "hunter2" not in config.to_json()

    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLETOKEN")
    monkeypatch.setattr(storage, "_WIRE_QUIET", False)
    logs.setup("debug")
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
    logging.getLogger("raytl.test").warning(
        "header X-Amz-Security-Token: FQoGZXIvYXdzEXAMPLETOKEN from %s", url
    )
    err = capsys.readouterr().err
    assert (
        "FQoGZXIvYXdzEXAMPLETOKEN" not in err and "hunter2" not in err and "X-Amz-Security-Token: ***" in err
    )
    monkeypatch.setattr(storage, "_WIRE_QUIET", False)
    monkeypatch.setenv("RAYTL_WIRE_LOGS", "1")
    logging.getLogger("botocore").setLevel(logging.NOTSET)
    logs.setup("debug")
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.DEBUG
    logs.setup("warning")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from raytl import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_list", interrupted)
    assert cli.main(["list", "s3://b/src", "m.parquet"]) == 130
    err = capsys.readouterr().err
    assert err == "raytl: interrupted; rerun the same command to resume.\n"
