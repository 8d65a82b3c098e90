"""The error tree (raytl.errors): one home, redaction in the message itself, Ray's pickling survived, and
a task's error back to its one sentence on the driver."""

from __future__ import annotations

import ast
import pathlib
import pickle

import pytest

import raytl
from raytl import errors
from raytl.errors import ConfigError, DatasetError, EmbeddingsError, RaytlError, StorageError

PACKAGE = pathlib.Path(raytl.__file__).parent


def test_messages_are_redacted_however_they_are_built(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    error = StorageError("cannot read s3://bucket/a.jpg with s3cr3t-value via https://user:pw@host/x")
    assert str(error) == "cannot read s3://bucket/a.jpg with *** via https://***@host/x"
    assert "s3cr3t-value" not in f"{error}" and "pw@" not in str(DatasetError(error))


@pytest.mark.parametrize(
    "cls", [ConfigError, StorageError, DatasetError, errors.WeightsError, errors.ImageError]
)
def test_every_error_survives_pickling_as_itself(cls):
    back = pickle.loads(pickle.dumps(cls("one sentence.")))
    assert type(back) is cls and str(back) == "one sentence." and isinstance(back, RaytlError)


def test_embeddings_and_images_share_one_dataset_error():
    assert EmbeddingsError is DatasetError


def test_a_foreign_error_is_not_a_user_error():
    assert errors.user_error(ValueError("a bug")) is None
    error = ConfigError("--lr must be a positive number, not -1.")
    assert errors.user_error(error) is error
    try:
        try:
            raise error
        except ConfigError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert errors.user_error(outer) is error


def test_every_error_class_is_defined_and_imported_from_errors():
    """No exception class outside errors.py, and every error name imported inside raytl comes from there."""
    names = {
        n
        for n in dir(errors)
        if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), Exception)
    }
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name != "errors.py":
            defined = [
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef)
                and any(ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases)
            ]
            assert defined == [], f"{path.name} defines {defined}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raytl"):
                imported = {a.name for a in node.names} & names
                assert not imported or node.module == "raytl.errors", f"{path.name} imports {imported}"
            if isinstance(node, ast.Attribute) and node.attr in names:
                assert ast.unparse(node.value) in ("errors", "raytl.errors"), (
                    f"{path.name}: {ast.unparse(node)}"
                )


@pytest.mark.ray
def test_an_error_raised_in_a_ray_task_is_its_sentence_on_the_driver(ray_session):
    import ray

    @ray.remote
    def refuse() -> None:
        raise DatasetError("EMBEDDINGS /x has a single class ('a'); a classifier needs two.")

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(refuse.remote())
    found = errors.user_error(raised.value)
    assert type(found) is DatasetError
    assert str(found) == "EMBEDDINGS /x has a single class ('a'); a classifier needs two."

    def batch(rows):
        raise StorageError("cannot read s3://b/a.jpg: access denied.")

    with (
        pytest.raises(StorageError, match=r"^cannot read s3://b/a\.jpg: access denied\.$"),
        errors.unwrapped(),
    ):
        ray.data.range(4).map_batches(batch).materialize()
    with pytest.raises(ZeroDivisionError), errors.unwrapped():
        ray.get(ray.remote(lambda: 1 / 0).remote())
