"""Listing class-per-folder corpora (local and S3) and reading manifests."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import upload_dir
from images import BROKEN_REASONS, NON_IMAGES, write_corpus

from raytl.corpus.reader import is_image, list_corpus
from raytl.errors import StorageError


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
    corpus = list_corpus(None, str(tmp_path / "m.csv"), allow_schemes=("s3",))
    assert corpus.table.to_pylist() == [
        {"path": str(tmp_path / "cat/plain-1.png"), "label": "cat"},
        {"path": f"{uri}/cat/gray-1.jpg", "label": ""},
    ]
    pq.write_table(pa.table({"path": [f"{uri}/cat/gray-1.jpg"]}), tmp_path / "m.parquet")
    assert list_corpus(None, str(tmp_path / "m.parquet"), allow_schemes=("s3",)).table.to_pylist() == [
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


def test_manifest_paths_stay_on_the_manifests_filesystem(tmp_path, bucket, monkeypatch):
    """A manifest from object storage cannot make the workers read their own disks or fetch URLs: paths on
    another filesystem than the manifest's are refused in one sentence unless --allow-schemes names them;
    relative paths become full URIs beside the manifest."""
    import s3fs

    monkeypatch.chdir(tmp_path)
    s3 = s3fs.S3FileSystem()
    hostile = [
        "/etc/hostname",
        "file:///etc/passwd",
        "http://127.0.0.1:9/internal.jpg",
        "https://user:hunter2@example.invalid/a.jpg",
        f"zip://a.jpg::{tmp_path}/local.zip",
    ]
    for path in hostile:
        s3.pipe(f"{bucket}/m.csv", f"path,label\nimgs/a.jpg,x\n{path},y\n".encode())
        for stream in (False, True):
            with pytest.raises(StorageError) as raised:
                corpus = list_corpus(None, f"s3://{bucket}/m.csv", stream=stream)
                if stream:  # rows are checked where Ray Data tasks read them
                    from raytl.corpus.reader import _manifest_block

                    block = pa.table({"path": ["imgs/a.jpg", path], "label": ["x", "y"]})
                    _manifest_block(block, corpus.manifest.uri, corpus.manifest.allow_schemes)
            message = str(raised.value)
            scheme = "file" if path.startswith(("/", "file:", "zip:")) else path.split(":")[0]
            assert f"which is on another filesystem ({scheme}) than the manifest (s3)" in message
            assert message.endswith(f"pass --allow-schemes {scheme} to read it.")
            assert "hunter2" not in message
    s3.pipe(f"{bucket}/m.csv", b"path,label\nimgs/a.jpg,x\n/etc/hostname,z\n")
    rows = list_corpus(None, f"s3://{bucket}/m.csv", allow_schemes=("file",)).table.to_pylist()
    assert [r["path"] for r in rows] == [f"s3://{bucket}/imgs/a.jpg", "/etc/hostname"]
    # A local manifest: relative paths become absolute, beside the manifest, whatever the working directory.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text("path,label\na.jpg,x\n../b.png,y\n")
    monkeypatch.chdir(tmp_path / "sub")
    rows = list_corpus(None, "m.csv").table.to_pylist()
    assert [r["path"] for r in rows] == [str(tmp_path / "sub" / "a.jpg"), str(tmp_path / "b.png")]


# fsspec's protocols that read through another filesystem named after `::` (its registry's wrappers), and
# those a segment before `::` can name to read something of its own (local disk, memory).
_CHAINING = ["zip", "tar", "simplecache", "filecache", "blockcache", "cached", "reference", "dir", "local",
             "file", "memory"]  # fmt: skip


def test_chained_urls_in_a_manifest_read_only_archive_members_on_its_filesystem(tmp_path, bucket):
    """fsspec opens a chained URL `A::B::C` with A's filesystem: every segment decides what is read. From an
    S3 manifest, only `zip://MEMBER::` / `tar://MEMBER::` segments before an S3 object pass; every other chain
    (`a::b` and `a::b::c` over each chaining protocol in fsspec's registry, a plain path or URL first) is
    refused in one sentence, with or without --allow-schemes."""
    import fsspec
    import s3fs

    from raytl.corpus.reader import resolve_manifest_paths

    assert set(_CHAINING) <= set(fsspec.available_protocols())
    secret = tmp_path / "x.png"
    secret.write_bytes(b"worker-local bytes")
    s3fs.S3FileSystem().pipe(f"{bucket}/any.png", b"s3 bytes")
    target = f"s3://{bucket}/any.png"
    # The regression: a local path before `::` reads the worker's disk, whatever follows.
    with fsspec.open(f"{secret}::{target}", "rb") as f:
        assert f.read() == b"worker-local bytes"
    refused = [f"{secret}::{target}", f"file://{secret}::{target}", f"local://{secret}::{target}",
               f"http://127.0.0.1:9/x.png::{target}", f"https://h.invalid/x.png::{target}"]  # fmt: skip
    for protocol in _CHAINING:
        refused.append(f"{protocol}::{target}")
        if protocol not in ("zip", "tar"):  # `zip://MEMBER::ARCHIVE` is a member of the S3 object ARCHIVE
            refused += [f"{protocol}://x.png::{target}", f"{protocol}://{secret}::{target}"]
            refused += [f"zip://x.png::{protocol}::{target}", f"zip://x.png::{protocol}://a.zip::{target}",
                        f"{protocol}::zip://x.png::{target}",
                        f"zip://x.png::tar://a.zip::{protocol}::{target}"]  # fmt: skip
    refused += ["zip://::" + target, "tar://::" + target, f"zip://x.png::{secret}::{target}"]
    manifest = f"s3://{bucket}/m.csv"
    for path in refused:
        for allowed in ((), ("file", "memory", "http", "https", *_CHAINING)):
            with pytest.raises(StorageError) as raised:
                resolve_manifest_paths([path], manifest, allowed)
            message = str(raised.value)
            assert message.startswith(f"--manifest {manifest} lists "), path
            assert "only archive members are read that way" in message, path
    members = [f"zip://x.png::s3://{bucket}/a.zip", f"tar://d/x.png::s3://{bucket}/a.tar",
               f"zip://x.png::tar://in.zip::s3://{bucket}/a.tar"]  # fmt: skip
    assert resolve_manifest_paths(members, manifest) == members
    assert all(is_image(m) for m in members)
    # An archive on another filesystem is another filesystem, as before.
    with pytest.raises(StorageError, match=r"on another filesystem \(file\) than the manifest \(s3\)"):
        resolve_manifest_paths([f"zip://x.png::{tmp_path}/a.zip"], manifest)


def test_manifest_rows_that_are_not_images_are_never_read(tmp_path, monkeypatch):
    """A manifest row naming a file without an image extension is an `_errors` row; the file is not read."""
    import numpy as np

    from raytl.files import storage
    from raytl.vision.preprocess import Transform, decode_batch, fetch_batch

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the workers")
    paths = [str(secret), f"zip://x/notes.txt::{tmp_path}/c.zip", "https://h.invalid/a.jpg.txt?x=.jpg"]
    batch = {"path": np.array(paths), "label": np.array(["a", "b", "c"])}
    fetched: list[str] = []
    original = storage.fetch_many
    monkeypatch.setattr(storage, "fetch_many", lambda ps: fetched.extend(ps) or original(ps))
    for stage in (decode_batch, fetch_batch):
        out = stage(batch, Transform(32, 37))
        assert all(e.startswith("not read: not an image file name (.bmp .gif .jpeg") for e in out["error"])
    assert fetched == []


def test_a_file_name_that_is_not_utf8_is_left_out_not_fatal(tmp_path, caplog):
    """Linux file names are bytes: one that is not UTF-8 used to end every command (UnicodeEncodeError)."""
    import os

    write_corpus(tmp_path / "src", {"cat": [1]}, broken=False, strays=False)
    good = (tmp_path / "src" / "cat" / "plain-1.png").read_bytes()
    with open(os.path.join(os.fsencode(tmp_path / "src" / "cat"), b"caf\xe9-latin1.png"), "wb") as f:
        f.write(good)
    corpus = list_corpus(str(tmp_path / "src"))
    assert str(tmp_path / "src" / "cat" / "plain-1.png") in corpus.table["path"].to_pylist()
    assert not any("latin1" in p for p in corpus.table["path"].to_pylist())
    assert corpus.ignored == 1
    assert "caf\\xe9-latin1.png" in caplog.text and "not valid UTF-8" in caplog.text
