"""`raytl train`: the Ray Train probe against scikit-learn, MODEL_DIR contents, bad input."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import SECRET_KEY, assert_user_error
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from synthetic import blobs, names, write

from raytl import predict, probe, split
from raytl.config import TrainConfig
from raytl.head import Model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    x, y = blobs(1500, 4, 24, seed=0)
    x_test, y_test = blobs(800, 4, 24, seed=1)
    return {"tmp": tmp, "x": x, "y": y, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def ray_run(ray_session, data):
    """One Ray Train run, 2 workers, embeddings and MODEL_DIR in S3."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="raytl-probe")
    paths = write("s3://raytl-probe/emb/train", data["x"], names(data["y"]))
    write(str(data["tmp"] / "test"), data["x_test"], names(data["y_test"]), prefix="test")
    config = TrainConfig.create(
        embeddings="s3://raytl-probe/emb/train",
        model_dir="s3://raytl-probe/models/probe",
        workers=2,
    )
    return {"metrics": probe.run(config), "paths": paths, "config": config}


def test_probe_matches_sklearn_on_test_data(ray_run, data, tmp_path):
    summary = predict.run("s3://raytl-probe/models/probe", str(data["tmp"] / "test"), str(tmp_path / "pred"))
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(data["x"], data["y"])
    sk_accuracy = reference.score(data["x_test"], data["y_test"])
    assert 0.6 < sk_accuracy < 0.98  # a problem where the two can actually differ
    assert abs(summary["accuracy"] - sk_accuracy) <= 0.015
    table = pq.read_table(tmp_path / "pred")
    assert table.num_rows == 800 == summary["predicted"]
    assert summary["labelled"] == 800
    correct = np.mean(
        [
            p == label
            for p, label in zip(table["predicted_label"].to_pylist(), table["label"].to_pylist(), strict=True)
        ]
    )
    assert correct == pytest.approx(summary["accuracy"])


def test_model_dir_in_s3_holds_model_metrics_and_checkpoints(ray_run):
    fs = s3fs.S3FileSystem()
    files = fs.find("raytl-probe/models/probe")
    names_ = {f.rsplit("/", 1)[-1] for f in files}
    assert {"model.pt", "model.json", "metrics.json"} <= names_
    assert any("/train/checkpoint_" in f for f in files)
    for f in files:
        assert SECRET_KEY.encode() not in fs.cat_file(f)


def test_metrics_json_agrees_with_the_model(ray_run, data):
    metrics = json.loads(s3fs.S3FileSystem().cat_file("raytl-probe/models/probe/metrics.json"))
    assert metrics == json.loads(json.dumps(ray_run["metrics"]))
    model = Model.load("s3://raytl-probe/models/probe")
    labels = names(data["y"])
    # recompute the validation split as the workers did, from the paths alone
    row_bins = split.bins(ray_run["paths"], seed=0)
    hists = {
        c: np.bincount(row_bins[np.array(labels) == c], minlength=split.BINS) for c in sorted(set(labels))
    }
    val = split.in_validation(labels, row_bins, split.thresholds(hists, 0.2))
    index, _ = model.predict(data["x"][val])
    expected = np.mean(np.array(model.classes)[index] == np.array(labels)[val])
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["samples"] == int(val.sum()) == sum(metrics["val_samples"].values())
    assert sum(metrics["train_samples"].values()) == 1500 - int(val.sum())
    assert np.array(metrics["confusion_matrix"]).sum() == int(val.sum())
    assert set(metrics["per_class"]) == set(model.classes) == {"class-0", "class-1", "class-2", "class-3"}
    assert 0 < metrics["macro_f1"] <= 1 and metrics["head"] == "logreg" and metrics["backend"] == "ray"
    history = metrics["history"]
    assert 1 <= len(history) <= 100 and history[-1]["val_loss"] < history[0]["val_loss"]
    assert {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(history[0])


def test_sklearn_backend_is_scikit_learn(ray_session, data, tmp_path):
    write(str(tmp_path / "train"), data["x"], names(data["y"]))
    write(str(tmp_path / "val"), data["x_test"], names(data["y_test"]), prefix="v")
    config = TrainConfig.create(
        embeddings=str(tmp_path / "train"),
        model_dir=str(tmp_path / "model"),
        val=str(tmp_path / "val"),
        backend="sklearn",
    )
    metrics = probe.run(config)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(data["x"], data["y"])
    assert metrics["accuracy"] == pytest.approx(reference.score(data["x_test"], data["y_test"]), abs=0.002)
    model = Model.load(str(tmp_path / "model"))
    index, score = model.predict(data["x_test"])
    np.testing.assert_allclose(score, reference.predict_proba(data["x_test"]).max(1), atol=1e-3)
    assert np.mean(index == reference.predict(data["x_test"])) >= 0.995
    assert json.loads((tmp_path / "model" / "model.json").read_text())["backend"] == "sklearn"


def test_binary_sklearn_head_gives_sklearn_probabilities(ray_session, tmp_path):
    x, y = blobs(300, 2, 6, seed=3)
    write(str(tmp_path / "e"), x, names(y))
    probe.run(
        TrainConfig.create(embeddings=str(tmp_path / "e"), model_dir=str(tmp_path / "m"), backend="sklearn")
    )
    model = Model.load(str(tmp_path / "m"))
    _, score = model.predict(x)
    assert model.weight.shape == (2, 6) and score.min() >= 0.5


def test_bad_training_data(ray_session, capsys, tmp_path):
    x, y = blobs(40, 3, 8, seed=2)
    write(str(tmp_path / "one"), x, ["only"] * 40)
    assert_user_error(
        capsys, ["train", str(tmp_path / "one"), str(tmp_path / "m")], "has a single class ('only')"
    )
    write(str(tmp_path / "unlabelled"), x, [None] * 5 + names(y)[5:])
    assert_user_error(
        capsys, ["train", str(tmp_path / "unlabelled"), str(tmp_path / "m")], "has 5 rows without a label"
    )
    write(str(tmp_path / "tiny"), x[:2], ["a", "b"])
    assert_user_error(
        capsys, ["train", str(tmp_path / "tiny"), str(tmp_path / "m")], "the validation split is empty"
    )
    write(str(tmp_path / "ok"), x, names(y))
    write(str(tmp_path / "odd"), x, ["other"] * 40)
    assert_user_error(
        capsys,
        ["train", str(tmp_path / "ok"), str(tmp_path / "m"), "--val", str(tmp_path / "odd")],
        "--val has labels that EMBEDDINGS does not: 'other'",
    )
    write(str(tmp_path / "fc7"), x, names(y), layer="fc7")
    assert_user_error(
        capsys,
        ["train", str(tmp_path / "ok"), str(tmp_path / "m"), "--val", str(tmp_path / "fc7")],
        "has layer 'fc7', but the model expects 'pool5'",
    )
    assert_user_error(
        capsys,
        ["train", str(tmp_path / "ok"), str(tmp_path / "m"), "--backend", "xgboost"],
        "--backend must be one of ray, sklearn",
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text("{}")
    assert_user_error(
        capsys, ["train", str(tmp_path / "ok"), str(tmp_path / "m")], "is not empty; pass --overwrite"
    )
