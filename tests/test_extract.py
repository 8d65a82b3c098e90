"""End to end: `raytl extract` from a loopback S3 corpus, compared with torchvision's own computation."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from conftest import SECRET_KEY, assert_user_error, upload_dir
from images import (
    BROKEN_REASONS,
    cosine,
    encode,
    picture,
    random_state_dict,
    reference_embeddings,
    write_corpus,
)

from raytl.cli import main
from raytl.commands import extract
from raytl.config import ExtractConfig, Precision
from raytl.errors import ConfigError
from raytl.vision.models import resolve_precision

CLASSES = {"cat": [1, 2], "dog": [3]}


def run_cli(ray_session, *args):
    """`raytl …` in a subprocess attached to the session's Ray, as a user would run it."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    return subprocess.run(
        [sys.executable, "-m", "raytl.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def read_dataset(fs, uri):
    files = sorted(p for p in fs.ls(uri) if p.rsplit("/", 1)[-1].startswith("part-"))
    return {k: v for f in files for k, v in _rows(fs, f).items()}, files


def _rows(fs, path):
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return {
        p: (label, np.asarray(e, np.float32))
        for p, label, e in zip(*(table[c].to_pylist() for c in table.column_names), strict=False)
    }


@pytest.fixture(scope="module")
def s3_run(ray_session, tmp_path_factory):
    """One CLI run: a corpus of every encoding plus broken and stray files, weights from s3://."""
    import boto3

    tmp = tmp_path_factory.mktemp("s3run")
    bucket = "raytl-extract-e2e"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    good = write_corpus(tmp / "corpus", CLASSES)
    state = random_state_dict(7)
    (tmp / "weights").mkdir()
    torch.save(state, tmp / "weights" / "vgg16.pt")
    source = upload_dir(tmp / "corpus", bucket, "corpus")
    upload_dir(tmp / "weights", bucket, "models")
    output = f"s3://{bucket}/embeddings/run1"
    proc = run_cli(
        ray_session,
        "extract",
        source,
        output,
        "--weights",
        f"s3://{bucket}/models/vgg16.pt",
        "--precision",
        "fp32",
        "--image-size",
        "32",
        "--decode-batch",
        "8",
        "--rows-per-file",
        "16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "good": good, "state": state, "source": source, "output": output, "proc": proc}


def test_every_image_embedded_once_with_its_label(s3_run):
    fs = s3fs.S3FileSystem()
    rows, files = read_dataset(fs, s3_run["output"])
    expected = {f"{s3_run['source']}/{rel}": label for rel, label in s3_run["good"].items()}
    assert len(files) >= 3  # rows-per-file 16 over 39 rows
    total = sum(pq.ParquetFile(fs.open(f, "rb")).metadata.num_rows for f in files)
    assert total == len(expected) == 39  # no duplicates across part files
    assert {p: label for p, (label, _) in rows.items()} == expected


def test_embeddings_match_torchvision_fp32(s3_run):
    rows, _ = read_dataset(s3fs.S3FileSystem(), s3_run["output"])
    corpus = s3_run["tmp"] / "corpus"
    rels = sorted(s3_run["good"])
    expected = reference_embeddings([(corpus / rel).read_bytes() for rel in rels], s3_run["state"], 32)
    got = np.stack([rows[f"{s3_run['source']}/{rel}"][1] for rel in rels])
    assert got.shape == (39, 512) and got.dtype == np.float32
    assert cosine(got, expected).min() >= 0.999
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_errors_table_holds_each_broken_file_once(s3_run):
    fs = s3fs.S3FileSystem()
    tables = [pq.read_table(fs.open(f, "rb")) for f in fs.ls(s3_run["output"] + "/_errors")]
    errors = [row for t in tables for row in t.to_pylist()]
    assert sorted(e["path"] for e in errors) == sorted(f"{s3_run['source']}/cat/{n}" for n in BROKEN_REASONS)
    for e in errors:
        assert BROKEN_REASONS[e["path"].rsplit("/", 1)[-1]] in e["error"]


def test_summary_counts(s3_run):
    summary = json.loads(s3fs.S3FileSystem().cat_file(s3_run["output"] + "/_summary.json"))
    assert (summary["seen"], summary["embedded"], summary["failed"], summary["skipped"]) == (43, 39, 4, 0)
    assert summary["ignored_non_images"] == 3
    assert summary["images_per_second"] > 0 and summary["wall_seconds"] > 0
    assert json.loads(s3_run["proc"].stdout.strip().splitlines()[-1])["embedded"] == 39


def test_schema_readable_without_ray(s3_run):
    script = f"""
import json, sys, s3fs, pyarrow.parquet as pq
fs = s3fs.S3FileSystem()
part = sorted(p for p in fs.ls({s3_run["output"]!r}) if p.rsplit('/', 1)[-1].startswith('part-'))[0]
schema = pq.read_schema(fs.open(part, 'rb'))
assert 'ray' not in sys.modules
print(json.dumps({{'types': [str(f.type) for f in schema], 'names': schema.names,
                  'meta': json.loads(schema.metadata[b'raytl'])}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["names"] == ["path", "label", "embedding"]
    assert got["types"] == ["string", "string", "fixed_size_list<element: float>[512]"]
    meta = got["meta"]
    assert (meta["model"], meta["layer"], meta["pool"], meta["dim"], meta["image_size"]) == (
        "vgg16",
        "pool5",
        "avg",
        512,
        32,
    )
    assert meta["weights"].startswith("s3://raytl-extract-e2e/models/vgg16.pt#sha256:")
    assert meta["preprocessing"]["resize"] == 37 and meta["preprocessing"]["center_crop"] == 32
    assert meta["schemes"] == ["s3"]  # where its paths may be: what the report's thumbnails may read
    assert meta["raytl_version"]


def test_secret_appears_nowhere(s3_run):
    fs = s3fs.S3FileSystem()
    proc = s3_run["proc"]
    assert SECRET_KEY not in proc.stdout + proc.stderr
    for path in fs.find(s3_run["output"]):
        assert SECRET_KEY.encode() not in fs.cat_file(path), path


def test_default_precision_and_224px_against_torchvision(ray_session, tmp_path):
    """The 224 px path on a few photographs-sized JPEGs at the default precision (bf16 is compared with
    torchvision in test_models), and JPEGs decoded in the model actors (--decode gpu; torchvision's decoder
    on a CPU-only cluster)."""
    (tmp_path / "src" / "x").mkdir(parents=True)
    files = [encode(picture(s, 500, 375), "JPEG", quality=90) for s in range(3)]
    for i, data in enumerate(files):
        (tmp_path / "src" / "x" / f"{i}.jpg").write_bytes(data)
    state = random_state_dict(5)
    torch.save(state, tmp_path / "w.pt")
    expected = {size: reference_embeddings(files, state, size) for size in (224, 64)}
    runs = (("auto", "cpu", 224, 0.99), ("fp32", "gpu", 64, 0.999))
    for precision, decode, size, least in runs:
        out = tmp_path / f"out-{precision}-{decode}"
        config = ExtractConfig.create(
            source=str(tmp_path / "src"),
            output=str(out),
            weights=str(tmp_path / "w.pt"),
            precision=precision,
            decode=decode,
            image_size=size,
        )
        summary = extract.run(config)
        table = pq.read_table(out)
        meta = json.loads(table.schema.metadata[b"raytl"])
        assert summary["embedded"] == 3 and summary["embedding"] == meta  # _summary.json says the same
        assert meta["preprocessing"]["decode"] == decode
        # the precision that ran, as this CPU's actors resolve auto; and what was asked when they differ
        ran = str(resolve_precision(Precision(precision), torch.device("cpu")))
        assert meta["precision"] == ran and meta.get("precision_option") == (
            precision if ran != precision else None
        )
        rows = {r["path"]: r["embedding"] for r in table.to_pylist()}
        got = np.array([rows[str(tmp_path / "src" / "x" / f"{i}.jpg")] for i in range(3)], np.float32)
        assert cosine(got, expected[size]).min() >= least, (precision, decode)


def test_manifest_and_flatten(ray_session, tmp_path, bucket):
    write_corpus(tmp_path / "src", {"cat": [4]}, broken=False, strays=False)
    uri = upload_dir(tmp_path / "src", bucket, "m")
    (tmp_path / "m.csv").write_text(f"path,label\n{uri}/cat/plain-4.png,kitten\n{uri}/cat/gray16-4.png,\n")
    state = random_state_dict(9)
    torch.save(state, tmp_path / "w.pt")
    config = ExtractConfig.create(
        source=None,
        manifest=str(tmp_path / "m.csv"),
        output=str(tmp_path / "out"),
        weights=str(tmp_path / "w.pt"),
        pool="flatten",
        image_size=64,
        precision="fp32",
        allow_schemes="s3",  # a local manifest naming S3 objects: another filesystem than its own
    )
    assert extract.run(config)["embedded"] == 2
    table = pq.read_table(tmp_path / "out")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[2048]"
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows[f"{uri}/cat/plain-4.png"]["label"] == "kitten"
    assert rows[f"{uri}/cat/gray16-4.png"]["label"] is None
    expected = reference_embeddings(
        [(tmp_path / "src/cat/plain-4.png").read_bytes()], state, 64, pool="flatten"
    )
    assert cosine(np.array([rows[f"{uri}/cat/plain-4.png"]["embedding"]]), expected).min() >= 0.999


def test_a_manifest_streams_through_ray_and_resumes(ray_session, tmp_path, bucket, monkeypatch):
    """A gzipped CSV manifest in S3 is never read on the driver (only its first line); a resumed run drops
    the done rows in the tasks that read it."""
    import gzip

    good = write_corpus(tmp_path / "src", {"cat": [1, 2], "dog": [3]}, broken=False, strays=False)
    uri = upload_dir(tmp_path / "src", bucket, "imgs")
    lines = ["path,label", *(f"imgs/{name},{label}" for name, label in sorted(good.items()))]
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{bucket}/m.csv.gz", gzip.compress("\n".join(lines).encode()))
    manifest = f"s3://{bucket}/m.csv.gz"
    monkeypatch.setattr("raytl.corpus.reader.read_manifest", None)  # the driver must not load it
    out = f"s3://{bucket}/emb"
    config = ExtractConfig.create(
        source=None, manifest=manifest, output=out, weights="random", image_size=32, precision="fp32",
        rows_per_file=len(good) // 3, decode_batch=4,
    )  # fmt: skip
    first = extract.run(config)
    assert (first["seen"], first["embedded"], first["failed"], first["skipped"]) == (
        len(good),
        len(good),
        0,
        0,
    )
    rows, parts = read_dataset(fs, out)
    assert {p: label for p, (label, _) in rows.items()} == {f"{uri}/{n}": lab for n, lab in good.items()}
    assert len(parts) >= 3
    lost = parts[-1]
    lost_rows = _rows(fs, lost)
    fs.rm(lost)
    again = extract.run(config)  # the reading tasks drop the done rows (a done set built by Ray tasks)
    assert again["skipped"] == len(good) - len(lost_rows)
    assert (again["embedded"], again["failed"]) == (len(lost_rows), 0)
    now, _ = read_dataset(fs, out)
    assert sorted(now) == sorted(rows)
    for path, (_, vector) in lost_rows.items():
        np.testing.assert_allclose(now[path][1], vector, rtol=1e-5, atol=1e-6)


# --- bad input: one sentence, exit 2, nothing written, before any heavy work ---------------------------


@pytest.fixture
def small_corpus(tmp_path):
    write_corpus(tmp_path / "src", {"cat": [1]}, broken=False, strays=False)
    return str(tmp_path / "src")


def test_bad_input_errors(capsys, tmp_path, bucket, small_corpus, s3_endpoint):
    out = str(tmp_path / "out")
    assert_user_error(
        capsys, ["extract", "s3://raytl-missing-bucket-zz/x", out, "--weights", "random"], "does not exist"
    )
    assert_user_error(
        capsys, ["extract", f"s3://{bucket}/nothing/here", out, "--weights", "random"], "does not exist"
    )
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert_user_error(
        capsys, ["extract", str(tmp_path / "empty"), out, "--weights", "random"], "holds no image files"
    )
    assert_user_error(
        capsys, ["extract", small_corpus, out, "--layer", "pool9"], "--layer must be one of pool5, fc6, fc7"
    )
    assert_user_error(
        capsys, ["extract", small_corpus, out, "--precision", "int4"], "--precision must be one of"
    )
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "junk.pt").write_bytes(b"\x00garbage")
    uri = upload_dir(tmp_path / "staged", bucket, "w")
    assert_user_error(
        capsys, ["extract", small_corpus, out, "--weights", f"{uri}/junk.pt"], "is not a PyTorch state_dict"
    )
    assert_user_error(capsys, ["extract", small_corpus, out, "--weights", f"{uri}/none.pt"], "no such file")
    state = random_state_dict(1)
    state["features.28.weight"] = torch.zeros(256, 512, 3, 3)
    torch.save(state, tmp_path / "wrong.pt")
    assert_user_error(
        capsys,
        ["extract", small_corpus, out, "--weights", str(tmp_path / "wrong.pt")],
        "features.28.weight has shape (256, 512, 3, 3), expected (512, 512, 3, 3)",
    )
    assert not os.path.exists(out)


def test_rerun_continues_other_options_are_refused_unless_overwrite(
    capsys, ray_session, tmp_path, small_corpus
):
    out = tmp_path / "out"
    args = ["extract", small_corpus, str(out), "--weights", "random", "--image-size", "32"]
    assert main(args) == 0
    parts = {p.name: p.read_bytes() for p in out.glob("part-*")}
    assert main(args) == 0  # the same command again: everything is already there
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["seen"], summary["skipped"], summary["embedded"], summary["failed"]) == (13, 13, 0, 0)
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == parts
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_user_error(capsys, [*args[:-1], "64"], "holds embeddings made with --image-size 32, not 64;")
    assert_user_error(
        capsys,
        [*args, "--seed", "1"],
        "holds embeddings made with --weights 'random:seed=0', not 'random:seed=1'",
    )
    # Exact and draft decodes are not mixed in one OUTPUT.
    assert_user_error(capsys, [*args, "--decode", "draft"], "made with --decode 'cpu', not 'draft'")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main([*args[:-1], "64", "--overwrite"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 13 and str(table.schema.field("embedding").type).endswith("[512]")
    assert json.loads(table.schema.metadata[b"raytl"])["image_size"] == 64


def test_parts_come_about_every_minute_without_rows_per_file(monkeypatch):
    """What a killed driver loses is bounded in time: the default part holds about a minute of the expected
    rate (600 images at 224 px on 2 CPU cores used to be one part, so a driver killed halfway lost it all).
    tests/test_extract_faults.py kills a driver running with the default part size."""
    from raytl.cluster.pipeline import Resources, rows_per_part

    cpu, gpu = Resources(gpus=0, cpus=2, use_gpu=False), Resources(gpus=4, cpus=32, use_gpu=True)

    def rows(resources, **options):
        return rows_per_part(ExtractConfig.create(source="s", output="o", **options), resources)

    assert rows(cpu) == 300  # ~5 images/s at 224 px on 2 AVX2 cores: one minute
    assert rows(cpu, num_actors=2) == rows(cpu, num_actors="2-4") == 600
    assert rows(cpu, image_size=448) == 75
    assert rows(cpu, image_size=32) == 8192  # fast enough: the largest parts
    assert rows(gpu) == rows(Resources(gpus=0, cpus=2, use_gpu=True)) == 8192  # --device cuda, none up yet
    assert rows(cpu, rows_per_file=100) == rows(gpu, rows_per_file=100) == 100
    monkeypatch.setenv("RAYTL_PART_SECONDS", "30")
    assert rows(cpu) == 150
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("RAYTL_PART_SECONDS", bad)
        with pytest.raises(
            ConfigError, match=f"RAYTL_PART_SECONDS must be a positive number of seconds, not '{bad}'"
        ):
            rows(cpu)


def test_embeddings_of_unknown_options_are_refused_as_such(tmp_path):
    """An OUTPUT with embedding parts but no _run.json (options unknown) is refused without --overwrite,
    with the sentence for results of unknown options (not one about predictions)."""
    from synthetic import write

    from raytl.errors import StorageError
    from raytl.files import output

    write(str(tmp_path / "out"), np.zeros((4, 8), np.float32), ["a", "b", "a", "b"], parts=1)
    config = ExtractConfig.create(source=str(tmp_path), output=str(tmp_path / "out"), weights="random")
    with pytest.raises(StorageError, match=r"already holds raytl results \(1 files\); pass --overwrite"):
        output.resume(config, output.run_record(config, "random:seed=0"))


def test_a_listing_is_read_in_blocks_of_decode_batch_rows_each_task_holding_its_own():
    """The driver's listing becomes one read task a block of --decode-batch rows (the last one shorter),
    in order; each task pickles only its own rows, not the whole listing (a slice would)."""
    import pickle

    import pyarrow as pa

    from raytl.cluster.pipeline import BlocksOf

    table = pa.table({"path": [f"/corpus/{i:05d}.jpg" for i in range(1000)], "label": ["a", "b"] * 500})
    blocks = BlocksOf(table, 128)
    assert [task.metadata.num_rows for task in blocks.tasks] == [128] * 7 + [104]
    read = pa.concat_tables([block for task in blocks.tasks for block in task()])
    assert read.equals(table)
    assert len(pickle.dumps(blocks.tasks[0])) < len(pickle.dumps(table)) / 4
    assert blocks.get_read_tasks(parallelism=200) == blocks.tasks  # as listed, whatever Ray asks for
