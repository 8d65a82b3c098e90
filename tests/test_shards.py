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

from raytl import doneset, storage
from raytl.cli import main
from raytl.preprocess import Transform
from raytl.shards import expand, read_shards, split_name

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
    assert split_name("train/0001.seg.JPG") == ("train/0001", "seg.jpg")


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
    assert rows[key + "k1"][0] == "3" and rows[key + "k2"][0] == ""  # default: .cls when present
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


def test_a_broken_shard_stops_the_run(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(storage.StorageError, match="bad.tar is not a readable tar"):
        list(read_shards({"path": np.array([str(tmp_path / "bad.tar")])}, TRANSFORM, None, 4))


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
                    if n.startswith(key + ".") and n[len(key) :] not in (".json", ".cls")
                )
                relative = meta["source"].removeprefix(loose + "/")
                assert (members[key + ".cls"].decode(), meta["label"]) == (good[relative], good[relative])
                assert image == (tmp_path / "loose" / relative).read_bytes()
                source_of[f"s3://{shard}#{key}"] = relative
    assert sorted(source_of.values()) == sorted(good)

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
