"""WebDataset tar shards: patterns, samples, labels, broken members, the same embeddings as loose files."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import upload_dir
from images import encode, picture, write_corpus
from s3faults import Rule

from raytl import errors
from raytl.cli import main
from raytl.corpus.shards import expand, read_shards, split_name
from raytl.errors import StorageError
from raytl.files import doneset, storage
from raytl.vision.preprocess import Transform

TRANSFORM = Transform(image_size=32, resize_size=37)


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_brace_patterns_expand_like_webdataset():
    assert expand("s3://b/s/{00008..00010}.tar") == [f"s3://b/s/{n:05d}.tar" for n in (8, 9, 10)]
    assert expand("s3://b/{a,b}/{1..2}.tar") == [
        "s3://b/a/1.tar",
        "s3://b/a/2.tar",
        "s3://b/b/1.tar",
        "s3://b/b/2.tar",
    ]
    assert expand("/data/one.tar") == ["/data/one.tar"]
    # As bash expands them (both were wrong when raytl expanded braces itself):
    assert expand("s/{10..8}.tar") == ["s/10.tar", "s/9.tar", "s/8.tar"]
    assert expand("s/{0..4..2}.tar") == ["s/0.tar", "s/2.tar", "s/4.tar"]
    assert split_name("train/0001.seg.JPG") == ("train/0001", "seg.jpg")


_HUGE_RANGE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))  # 30M names take more than that
from raytl.errors import StorageError
from raytl.corpus.shards import expand
try:
    expand("/nosuch/{00000000..30000000}.tar")
except StorageError as exc:
    print(exc)
"""


def test_a_huge_brace_range_is_one_sentence_not_all_of_memory(tmp_path, capsys):
    """`{00000000..30000000}` is expanded lazily and refused past shards.MAX_SHARDS, under an address-space
    limit that expanding it whole exceeds (MemoryError); `raytl extract` says so in one sentence."""
    import subprocess
    import sys

    from conftest import assert_user_error

    from raytl.corpus.shards import MAX_SHARDS

    proc = subprocess.run([sys.executable, "-c", _HUGE_RANGE], capture_output=True, text=True, timeout=300)
    sentence = (
        f"SOURCE /nosuch/{{00000000..30000000}}.tar names more than {MAX_SHARDS:,} shards, more than one run "
        "reads; split the range over several runs (each into its own OUTPUT), or write larger shards."
    )
    assert proc.returncode == 0 and proc.stdout.strip() == sentence, proc.stderr[-2000:]
    out = str(tmp_path / "out")
    args = ["extract", "/nosuch/{00000000..30000000}.tar", out, "--weights", "random"]
    assert_user_error(capsys, args, sentence)
    assert not (tmp_path / "out").exists()
    assert len(expand(f"s/{{1..{MAX_SHARDS}}}.tar")) == MAX_SHARDS
    # Counted without expanding, as braceexpand expands: lists multiply too (2**21 names from 105 bytes).
    with pytest.raises(StorageError, match="names more than 1,000,000 shards"):
        expand("s/" + "{a,b}" * 21 + ".tar")
    assert len(expand("s/" + "{a,b}" * 9 + "{1..0}.tar")) == 2**9 * 2
    with pytest.raises(StorageError, match=r"^SOURCE s/\{1..3.tar has unbalanced braces\.$"):
        expand("s/{1..3.tar")


def test_samples_labels_and_broken_members(tmp_path):
    jpeg = encode(picture(1), "JPEG", quality=90)
    png = encode(picture(2), "PNG")
    shard = tmp_path / "s.tar"
    write_tar(
        shard,
        [
            ("a/k1.jpg", jpeg),
            ("a/k1.cls", b"3\n"),
            ("a/k2.png", png),
            ("a/k2.json", json.dumps({"label": "dog"}).encode()),
            ("a/k2.txt", b"a dog"),
            ("a/k3.txt", b"only a caption"),
            ("a/k4.jpg", jpeg[: len(jpeg) // 2]),
        ],
    )
    batches = list(read_shards({"path": np.array([str(shard)])}, TRANSFORM, None, batch_size=3))
    assert [len(b["path"]) for b in batches] == [3, 1]
    rows = {
        p: (label, image, error) for b in batches for p, label, image, error in zip(*b.values(), strict=True)
    }
    key = f"{shard}#a/"
    assert list(rows) == [key + "k1", key + "k2", key + "k3", key + "k4"]
    # default: the .json member's label when it has one, else .cls (k3 has neither)
    assert rows[key + "k1"][0] == "3" and rows[key + "k2"][0] == "dog"
    np.testing.assert_array_equal(rows[key + "k1"][1], TRANSFORM(jpeg))
    np.testing.assert_array_equal(rows[key + "k2"][1], TRANSFORM(png))
    assert rows[key + "k3"][2] == "no image member (members: txt)"
    assert "truncated" in rows[key + "k4"][2]

    by_json = list(read_shards({"path": np.array([str(shard)])}, TRANSFORM, "json:label", 10))[0]
    assert (
        by_json["label"][1] == "dog" and by_json["error"][0] == "no .json member for --label-field json:label"
    )
    by_txt = list(
        read_shards({"path": np.array([str(shard)])}, TRANSFORM, "txt", 10, skip=doneset.of([key + "k1"]))
    )[0]
    assert list(by_txt["path"]) == [key + "k2", key + "k3", key + "k4"] and by_txt["label"][0] == "a dog"


def test_missing_cut_and_broken_shards_are_error_rows_not_the_end_of_the_run(tmp_path):
    """A shard that is missing, cut short or not a tar is one `_errors` row named by the shard; the samples
    read before a cut stay; a rerun skips that row as it skips done samples."""
    jpeg = encode(picture(1), "JPEG", quality=90)
    write_tar(tmp_path / "whole.tar", [(f"k{i}.jpg", jpeg) for i in range(6)])
    data = (tmp_path / "whole.tar").read_bytes()
    member = 512 + -(-len(jpeg) // 512) * 512  # a tar header, then the data in 512-byte blocks
    (tmp_path / "cut.tar").write_bytes(data[: 3 * member + 600])  # inside the fourth sample's data
    (tmp_path / "bad.tar").write_bytes(b"not a tar archive at all" * 40)
    shards = [str(tmp_path / n) for n in ("missing.tar", "cut.tar", "bad.tar", "whole.tar")]
    batches = list(read_shards({"path": np.array(shards)}, TRANSFORM, None, 100))
    rows = {p: e for b in batches for p, e in zip(b["path"], b["error"], strict=True)}
    assert rows.pop(shards[0]) == "shard does not exist"
    assert rows.pop(shards[1]).startswith("shard is not a readable tar after 3 samples")
    assert rows.pop(shards[2]).startswith("shard is not a readable tar after 0 samples")
    assert rows == {f"{s}#k{i}": "" for s, n in ((shards[1], 3), (shards[3], 6)) for i in range(n)}
    done = doneset.of([shards[0], shards[1], f"{shards[1]}#k0"])
    again = list(read_shards({"path": np.array(shards[:2])}, TRANSFORM, None, 100, skip=done))
    assert list(again[0]["path"]) == [f"{shards[1]}#k1", f"{shards[1]}#k2"]


def test_a_storage_error_from_a_ray_task_is_one_clean_sentence():
    """Ray hands a task's StorageError to the driver as RayTaskError(StorageError), which *is* a
    StorageError whose message is the whole remote traceback (with colour codes): the driver shows only
    the sentence."""
    from ray.exceptions import RayTaskError

    sentence = "cannot read shard s3://b/s/00001.tar: access denied (PermissionError: Forbidden)."
    remote = (
        "\x1b[36mray::ReadShards()\x1b[39m (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):\n"
        '  File "raytl/shards.py", line 1, in samples\n'
        f"raytl.errors.StorageError: {sentence}"
    )
    error = RayTaskError("ReadShards", remote, StorageError(sentence)).as_instanceof_cause()
    assert isinstance(error, StorageError)
    with pytest.raises(StorageError) as raised, errors.unwrapped():
        raise error
    assert str(raised.value) == sentence


def test_pack_list_shards_zip_and_manifest_give_the_same_rows(ray_session, bucket, s3_faults, tmp_path):
    """Every encoding as loose files in S3: `raytl pack` shards hold their bytes and labels; `raytl list`
    writes a manifest, and extracts from it (never listing the bucket), from the shards and from a zip of
    the same files read in place give the same labels and embeddings."""
    import zipfile

    import boto3

    good = write_corpus(tmp_path / "loose", {"cat": [3], "dog": [4]}, broken=False, strays=False)
    loose = upload_dir(tmp_path / "loose", bucket, "loose")
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w") as z:
        for name in good:
            z.write(tmp_path / "loose" / name, f"corpus/{name}")
    boto3.client("s3").upload_file(str(tmp_path / "corpus.zip"), bucket, "corpus.zip")

    assert main(["pack", loose, f"s3://{bucket}/packed", "--shard-size", "10"]) == 0
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    shard_files = sorted(p for p in fs.ls(f"{bucket}/packed") if p.endswith(".tar"))
    assert [p.rsplit("/", 1)[-1] for p in shard_files] == ["00000.tar", "00001.tar", "00002.tar"]
    source_of = {}  # SHARD#KEY -> the loose file it came from
    for shard in shard_files:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(shard))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key, meta = name[: -len(".json")], json.loads(data)
                image = next(
                    v
                    for n, v in members.items()
                    if n.startswith(key + ".") and n[len(key) :] not in (".json", ".cls", ".txt")
                )
                relative = meta["source"].removeprefix(loose + "/")
                label = good[relative]
                assert (members[key + ".txt"].decode(), meta["label"]) == (label, label)
                # WebDataset's convention: .cls is the integer class index (Ray's read_webdataset parses it)
                assert int(members[key + ".cls"]) == meta["class"] == ["cat", "dog"].index(label)
                assert image == (tmp_path / "loose" / relative).read_bytes()
                source_of[f"s3://{shard}#{key}"] = relative
    assert sorted(source_of.values()) == sorted(good)
    import ray

    read_by_ray = ray.data.read_webdataset(  # Ray's own reader: it failed on text in .cls (int())
        list(shard_files),
        filesystem=storage.pyarrow_filesystem(f"s3://{shard_files[0]}")[0],
        suffixes=["cls", "txt"],  # the images are of mixed sizes and modes: not one tensor column
    ).take_all()
    assert len(read_by_ray) == 26 and {r["cls"] for r in read_by_ray} == {0, 1}

    assert main(["list", loose, f"s3://{bucket}/m.parquet"]) == 0
    manifest = pq.read_table(f"{bucket}/m.parquet", filesystem=fs)
    assert dict(zip(manifest["path"].to_pylist(), manifest["label"].to_pylist(), strict=True)) == {
        f"{loose}/{n}": label for n, label in good.items()
    }
    out = f"{bucket}-out"
    boto3.client("s3").create_bucket(Bucket=out)
    listings = s3_faults.add(Rule(bucket=bucket, listing=True, status=403, code="AccessDenied", times=None))
    options = ["--weights", "random", "--image-size", "32", "--precision", "fp32"]
    assert main(["extract", "--manifest", f"s3://{bucket}/m.parquet", f"s3://{out}/m", *options]) == 0
    assert main(["extract", f"s3://{bucket}/packed/{{00000..00002}}.tar", f"s3://{out}/tar", *options]) == 0
    assert main(["extract", f"s3://{bucket}/corpus.zip", f"s3://{out}/zip", *options]) == 0
    assert listings.injected == 0  # no run listed the corpus bucket

    def rows(prefix: str) -> dict:
        table = pq.read_table(f"{out}/{prefix}", filesystem=fs)
        return {
            p: (lab, e)
            for p, lab, e in zip(*(table[c].to_pylist() for c in ("path", "label", "embedding")), strict=True)
        }

    by_manifest, by_shards, by_zip = rows("m"), rows("tar"), rows("zip")
    assert len(by_manifest) == len(by_shards) == len(by_zip) == len(good) == 26
    for path, (label, vector) in by_shards.items():
        reference = by_manifest[f"{loose}/{source_of[path]}"]
        assert label == reference[0] == good[source_of[path]]
        np.testing.assert_allclose(vector, reference[1], rtol=1e-5, atol=1e-6)
    for path, (label, vector) in by_zip.items():
        name = path.split("::")[0].removeprefix("zip://corpus/")
        assert label == good[name]
        np.testing.assert_allclose(vector, by_manifest[f"{loose}/{name}"][1], rtol=1e-5, atol=1e-6)


def test_extract_from_shards_goes_past_missing_and_cut_ones(ray_session, tmp_path, monkeypatch):
    """End to end, from a relative brace pattern: a missing shard and a cut one are `_errors` rows, the
    good samples (those before the cut too) are embedded with absolute `path` URIs, a rerun skips it all;
    shards that hold no samples at all end the run in one sentence, as an empty folder does."""
    jpeg = encode(picture(3), "JPEG", quality=90)
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "00000.tar", [(f"k{i}.jpg", jpeg) for i in range(4)])
    write_tar(tmp_path / "s" / "00002.tar", [(f"k{i}.jpg", jpeg) for i in range(4)])
    data = (tmp_path / "s" / "00002.tar").read_bytes()
    (tmp_path / "s" / "00002.tar").write_bytes(data[: 2 * (512 + -(-len(jpeg) // 512) * 512) + 600])
    monkeypatch.chdir(tmp_path)
    options = ["--weights", "random", "--image-size", "32", "--precision", "fp32"]
    assert main(["extract", "s/{00000..00002}.tar", "out", *options]) == 0
    rows = pq.read_table(tmp_path / "out").to_pylist()
    shard = str(tmp_path / "s" / "00000.tar")
    assert sorted(r["path"] for r in rows) == sorted(
        [f"{shard}#k{i}" for i in range(4)] + [f"{tmp_path}/s/00002.tar#k{i}" for i in range(2)]
    )
    errors = {r["path"]: r["error"] for r in pq.read_table(tmp_path / "out" / "_errors").to_pylist()}
    assert errors[f"{tmp_path}/s/00001.tar"] == "shard does not exist"
    assert errors[f"{tmp_path}/s/00002.tar"].startswith("shard is not a readable tar after 2 samples")
    assert len(errors) == 2
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["embedded"], summary["failed"]) == (6, 2)
    assert main(["extract", "s/{00000..00002}.tar", "out", *options]) == 0  # resumes: nothing new
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["embedded"], summary["failed"], summary["skipped"]) == (0, 0, 8)
    write_tar(tmp_path / "s" / "a.tar", [])
    write_tar(tmp_path / "s" / "b.tar", [])
    assert main(["extract", "s/{a,b}.tar", "out2", *options]) == 2


def test_links_in_tars_and_dotdot_in_zips_are_reported_not_followed(tmp_path, caplog):
    """Archive members that are not plain files used to vanish without a row; a zip member `../b/up.png`
    got the label `..`."""
    import zipfile

    from raytl.corpus.reader import list_corpus

    png = encode(picture(2), "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("k1.png", png), ("k1.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k2.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(link)
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    rows = list(read_shards({"path": np.array([str(tmp_path / "s.tar")])}, TRANSFORM, None, 10))[0]
    errors = dict(zip(rows["path"], rows["error"], strict=True))
    assert errors == {
        f"{tmp_path}/s.tar#k1": "",
        f"{tmp_path}/s.tar#k2": "k2.png is a link, not a file: not read",
    }
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("cat/a.png", png)
        z.writestr("../b/up.png", png)
    corpus = list_corpus(str(tmp_path / "c.zip"))
    assert corpus.table["label"].to_pylist() == ["cat"] and "`..`" in caplog.text


def test_a_key_repeated_later_in_a_shard_is_one_error_row_not_a_second_sample(tmp_path):
    """A key met again after other samples used to give two rows with one path and two labels."""
    from raytl.corpus.shards import sample_labels

    png = encode(picture(2), "PNG")
    members = [("k1.png", png), ("k1.cls", b"cat"), ("k2.png", png), ("k2.cls", b"dog"), ("k1.jpg", png)]
    members += [("k1.cls", b"dog")]
    write_tar(tmp_path / "s.tar", members)
    batch = {"path": np.array([str(tmp_path / "s.tar")])}
    rows = list(read_shards(batch, TRANSFORM, "cls", 10))[0]
    got = list(zip(rows["path"], rows["label"], rows["error"], strict=True))
    key = f"{tmp_path}/s.tar#"
    assert got[:2] == [(key + "k1", "cat", ""), (key + "k2", "dog", "")]
    assert got[2] == (
        key + "k1",
        "",
        "the key comes again after other samples: only its first sample is read",
    )
    labels = sample_labels(batch, "cls")
    assert list(zip(labels["path"], labels["label"], strict=True)) == [
        (key + "k1", "cat"),
        (key + "k2", "dog"),
    ]
