"""Listing class-per-folder corpora (local and S3) and reading manifests."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import upload_dir
from images import BROKEN_REASONS, NON_IMAGES, write_corpus

from raytl.reader import is_image, list_corpus
from raytl.storage import StorageError


def test_image_extensions_in_any_case():
    assert all(
        is_image(f"x/a{ext}") for ext in [".jpg", ".JPEG", ".Png", ".webp", ".BMP", ".gif", ".tif", ".TIFF"]
    )
    assert not any(is_image(f"x/{n}") for n in ["a.txt", "a.jpg.json", "jpg", "a.heic", "a.csv"])


def _expected(good, root):
    rows = dict(good)
    rows.update({f"cat/{name}": "cat" for name in BROKEN_REASONS})
    return {f"{root}/{rel}": label for rel, label in rows.items()}


def test_class_per_folder_local(tmp_path):
    good = write_corpus(tmp_path / "src", {"cat": [1], "dog": [2]})
    corpus = list_corpus(str(tmp_path / "src"))
    got = dict(zip(corpus.table["path"].to_pylist(), corpus.table["label"].to_pylist(), strict=False))
    assert got == _expected(good, str(tmp_path / "src"))
    assert corpus.ignored == len(NON_IMAGES)
    assert corpus.table["path"].to_pylist() == sorted(got)


def test_class_per_folder_s3(tmp_path, bucket):
    good = write_corpus(tmp_path / "src", {"cat": [1], "dog": [2]})
    uri = upload_dir(tmp_path / "src", bucket, "corpus/v1")
    corpus = list_corpus(uri + "/")
    got = dict(zip(corpus.table["path"].to_pylist(), corpus.table["label"].to_pylist(), strict=False))
    assert got == _expected(good, uri)
    assert all(p.startswith(f"s3://{bucket}/corpus/v1/") for p in got)


def test_files_at_the_top_have_no_label(tmp_path):
    write_corpus(tmp_path, {"cat": [1]}, broken=False, strays=False)
    (tmp_path / "loose.png").write_bytes((tmp_path / "cat" / "plain-1.png").read_bytes())
    corpus = list_corpus(str(tmp_path))
    labels = dict(zip(corpus.table["path"].to_pylist(), corpus.table["label"].to_pylist(), strict=False))
    assert labels[str(tmp_path / "loose.png")] == ""


def test_missing_and_empty_sources(tmp_path, bucket):
    with pytest.raises(StorageError, match="does not exist"):
        list_corpus(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="does not exist"):
        list_corpus("s3://raytl-no-such-bucket-x1/prefix")
    with pytest.raises(StorageError, match="does not exist"):
        list_corpus(f"s3://{bucket}/no/such/prefix")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(StorageError, match="holds no image files"):
        list_corpus(str(tmp_path / "empty"))


def test_manifest_csv_and_parquet(tmp_path, bucket):
    write_corpus(tmp_path / "src", {"cat": [1]}, broken=False, strays=False)
    uri = upload_dir(tmp_path / "src", bucket, "imgs")
    (tmp_path / "m.csv").write_text(f"path,label\ncat/plain-1.png,cat\n{uri}/cat/gray-1.jpg,\n")
    corpus = list_corpus(None, str(tmp_path / "m.csv"))
    assert corpus.table.to_pylist() == [
        {"path": str(tmp_path / "cat/plain-1.png"), "label": "cat"},
        {"path": f"{uri}/cat/gray-1.jpg", "label": ""},
    ]
    pq.write_table(pa.table({"path": [f"{uri}/cat/gray-1.jpg"]}), tmp_path / "m.parquet")
    assert list_corpus(None, str(tmp_path / "m.parquet")).table.to_pylist() == [
        {"path": f"{uri}/cat/gray-1.jpg", "label": ""}
    ]


def test_bad_manifests(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(StorageError, match="has no `path` column"):
        list_corpus(None, str(tmp_path / "m.csv"))
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(StorageError, match=r"must end in \.csv"):
        list_corpus(None, str(tmp_path / "m.json"))
    with pytest.raises(StorageError, match="no such file"):
        list_corpus(None, str(tmp_path / "missing.csv"))
    (tmp_path / "e.csv").write_text("path,label\n")
    with pytest.raises(StorageError, match="holds no image files"):
        list_corpus(None, str(tmp_path / "e.csv"))
