"""MLflow tracking (raytl/reporting/tracking.py): the options, a tracker that is down, MLFLOW_TRACKING_URI.
The tracked Ray Train runs are read back in test_probe (train) and test_finetune (a resumed fine-tune)."""

import logging
import os

import pytest
from conftest import _free_port, assert_user_error
from synthetic import blobs, names, write

from raytl.commands import train
from raytl.config import TrainConfig
from raytl.reporting import tracking


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    x, y = blobs(300, 3, 8, seed=5)
    write(str(tmp / "emb"), x, names(y))
    return tmp


def test_a_tracker_that_is_down_costs_a_warning_not_the_model(ray_session, embeddings, tmp_path, caplog):
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    config = TrainConfig.create(
        embeddings=str(embeddings / "emb"), model_dir=str(tmp_path / "m"), backend="sklearn", mlflow_uri=down
    )
    with caplog.at_level(logging.WARNING, logger="raytl.reporting.tracking"):
        metrics = train.run(config)
    assert (tmp_path / "m" / "model.json").is_file() and (tmp_path / "m" / "metrics.json").is_file()
    assert metrics["accuracy"] > 0.5
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "raytl.reporting.tracking"]
    assert warning.startswith(f"MLflow tracking at {down} could not start a run in experiment 'raytl' (")
    assert warning.endswith("); the run goes on without it.")


def test_the_uri_from_the_environment_and_a_run_that_fails(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI, as MLflow's own clients read it, with a relative path (made absolute: rank 0
    runs elsewhere); a command that raises leaves its run FAILED, with what was logged until then."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.URI_ENV, "runs")
    config = TrainConfig.create(embeddings="emb", model_dir="models/first")
    with pytest.raises(RuntimeError, match="the command failed"):
        with tracking.run("train", config, {"dim": 8, "preprocessing": {"resize": 37}}) as tracker:
            tracker.log_epoch({"epoch": 0, "val_loss": 0.5, "lr": 0.01, "selected": True})
            tracker.log_epoch({"epoch": 1, "val_loss": 0.25, "lr": 0.005})
            raise RuntimeError("the command failed")
    client = MlflowClient(str(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("raytl").experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FAILED"
    assert run.data.params["embeddings"] == str(tmp_path / "emb") and run.data.params["head"] == "logreg"
    assert run.data.params["backbone.dim"] == "8" and run.data.params["backbone.preprocessing.resize"] == "37"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(p.step, p.value) for p in history] == [(0, 0.5), (1, 0.25)]
    assert set(run.data.metrics) == {"val_loss", "lr"}  # `selected` is a flag, not a metric


def test_tracking_options(embeddings, tmp_path, capsys):
    args = ["train", str(embeddings / "emb"), str(tmp_path / "m"), "--backend", "sklearn"]
    assert_user_error(capsys, [*args, "--mlflow-experiment", ""], "--mlflow-experiment is empty")
    assert tracking.uri_of("runs") == os.path.abspath("runs")
    assert tracking.uri_of("http://mlflow:5000") == "http://mlflow:5000"
    assert tracking.uri_of("databricks") == "databricks"
