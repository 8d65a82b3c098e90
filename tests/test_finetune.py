"""`raytl finetune`: learning, resuming after a killed worker and a killed driver, MODEL_DIR for predict."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import torchvision
from conftest import assert_user_error, exported_scores, own_processes, upload_dir
from images import random_state_dict, write_colour_corpus
from PIL import Image

import raytl
from raytl.cli import main
from raytl.commands import finetune
from raytl.config import Decode, FinetuneConfig, Freeze, Head, Layer, Pool, Precision
from raytl.modeling import split
from raytl.modeling.classifier import Model, default_weights, weights_content
from raytl.modeling.model_dir import WRITTEN, Backbone, ModelInfo
from raytl.modeling.network import build_network, trainable_state, warmup_cosine
from raytl.vision.models import IMAGENET_MEAN, IMAGENET_STD
from raytl.vision.preprocess import TrainTransform, Transform, crop_box

# A tiny learnable problem (three colours, 32 px) that a random VGG16 with a trained head separates in a
# few epochs on two CPU workers.
OPTIONS = {
    "weights": None,  # set by the fixture: a state_dict file in S3
    "image_size": 32,
    "epochs": 6,
    "batch_size": 8,
    "lr": 0.2,  # random conv weights give pool5 features of ~0.05: the head needs large steps
    "backbone_lr": 0.0001,  # block 5 still trains, gently, so that backbone.pt differs from --weights
    "warmup_epochs": 0.5,
    "min_crop_scale": 0.5,
    "workers": 2,
    "precision": "fp32",  # as on CPUs without fast bf16, on every CPU: the exported model computes in fp32
}


def _cli(source: str, model_dir: str, options: dict) -> list[str]:
    args = ["finetune", source, model_dir]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _checkpoints(fs: s3fs.S3FileSystem, model_dir: str) -> set[str]:
    """Checkpoints Ray Train has registered (named in its snapshot), not just uploaded."""
    snapshot = model_dir.removeprefix("s3://") + "/train/checkpoint_manager_snapshot.json"
    fs.invalidate_cache()
    if not fs.exists(snapshot):
        return set()
    return set(re.findall(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+", fs.cat(snapshot).decode()))


def _wait_for_new_checkpoint(fs, model_dir: str, seen: set[str], timeout: float = 240) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _checkpoints(fs, model_dir)
        if now - seen:
            return seen | now
        time.sleep(0.2)
    raise AssertionError(f"no new checkpoint in {model_dir} within {timeout} s")


def _run_killing_a_worker(config, fs, seen: set[str], stale: set[int], workers: int) -> tuple[dict, int]:
    """finetune.run(config) in a thread; once a checkpoint beyond `seen` is registered, one of its `workers`
    training workers (those not in `stale`) is killed. Returns the metrics and the killed worker's pid."""
    result: dict = {}

    def run() -> None:
        try:
            result["metrics"] = finetune.run(config)
        except BaseException as exc:  # handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait_for_new_checkpoint(fs, config.model_dir, seen)
    found = sorted(set(_training_workers()) - stale)
    assert len(found) == workers, found
    os.kill(found[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in result:
        raise result["error"]
    return result["metrics"], found[-1]


def _training_workers() -> list[int]:
    """Process ids of live Ray Train workers (their process titles read `ray::RayTrainWorker...`)."""
    return [pid for pid, title in own_processes().items() if title.startswith(b"ray::RayTrainWorker")]


@pytest.fixture(scope="module")
def resumed_run(ray_session, tmp_path_factory, s3_endpoint):
    """The issue's "done when": a 2-worker CPU run on images in S3 whose driver is killed mid-run; the same
    command run again resumes it, and one of its training workers is killed mid-epoch as well."""
    import boto3

    tmp = tmp_path_factory.mktemp("finetune")
    boto3.client("s3").create_bucket(Bucket="raytl-finetune")
    write_colour_corpus(tmp / "corpus", per_class=20, seed=0)
    write_colour_corpus(tmp / "new", per_class=6, seed=1)
    torch.save(random_state_dict(5), tmp / "w.pt")
    loose = upload_dir(tmp / "corpus", "raytl-finetune", "corpus")
    new = upload_dir(tmp / "new", "raytl-finetune", "new")
    boto3.client("s3").upload_file(str(tmp / "w.pt"), "raytl-finetune", "weights/w.pt")
    # Trained from WebDataset shards of the corpus (labels from a json field); predicted from loose files.
    assert main(["pack", loose, "s3://raytl-finetune/shards", "--shard-size", "25"]) == 0
    source = "s3://raytl-finetune/shards/{00000..00002}.tar"
    model_dir = "s3://raytl-finetune/models/ft"
    options = dict(
        OPTIONS,
        weights="s3://raytl-finetune/weights/w.pt",
        label_field="json:label",
        mlflow_uri=str(tmp / "mlruns"),  # MLflow's file store: the killed run and its resumption
    )
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False)

    # 1. `raytl finetune` as its own driver on this Ray cluster, killed after its first checkpoint.
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    driver = subprocess.Popen(
        [sys.executable, "-m", "raytl.cli", *_cli(source, model_dir, options)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen = _wait_for_new_checkpoint(fs, model_dir, set())
    finally:
        driver.kill()
        driver.wait()
    assert not fs.exists(model_dir.removeprefix("s3://") + "/model.json")

    # 2. The same command again resumes; a training worker killed mid-epoch makes Ray Train restart the
    # worker group from the latest checkpoint.
    stale = set(_training_workers())  # the killed driver's workers, if Ray has not reaped them yet
    config = FinetuneConfig.create(source=source, model_dir=model_dir, **options)
    metrics, killed = _run_killing_a_worker(config, fs, seen, stale, workers=2)
    return {
        "metrics": metrics,
        "killed": killed,
        "model_dir": model_dir,
        "new": new,
        "fs": fs,
        "tmp": tmp,
        "source": source,
        "loose": loose,
        "options": options,
    }


def test_loss_falls_and_accuracy_beats_chance(resumed_run):
    metrics = resumed_run["metrics"]
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(OPTIONS["epochs"]))
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05
    # Three classes: chance is 1/3. Validation holds 12 images (20% of each class).
    assert metrics["samples"] == 12 and metrics["val_samples"] == {"blue": 4, "green": 4, "red": 4}
    assert metrics["accuracy"] >= 0.75, history
    assert metrics["train_samples"] == {"blue": 16, "green": 16, "red": 16}
    assert all(h["failed_images"] == 0 for h in history)


def test_resumed_after_the_driver_and_a_worker_were_killed(resumed_run):
    metrics = resumed_run["metrics"]
    resumed = metrics["resumed_at_epochs"]
    # Once when the command ran again (after the first run's checkpoint), once after the killed worker.
    assert len(resumed) == 2 and 1 <= resumed[0] < resumed[1] < OPTIONS["epochs"], resumed
    stored = json.loads(
        resumed_run["fs"].cat(resumed_run["model_dir"].removeprefix("s3://") + "/metrics.json")
    )
    assert stored["resumed_at_epochs"] == resumed and stored["accuracy"] == metrics["accuracy"]
    assert stored["confusion_matrix"] and sum(map(sum, stored["confusion_matrix"])) == 12


def test_the_resumed_run_continues_its_mlflow_run(resumed_run):
    """The killed driver's MLflow run is the one the rerun continues and finishes: every epoch is there
    (those trained again after a kill logged again: the latest point of each step is the kept one)."""
    from mlflow import MlflowClient

    client = MlflowClient(resumed_run["options"]["mlflow_uri"])
    experiment = client.get_experiment_by_name("raytl").experiment_id
    (run,) = client.search_runs(
        [experiment], filter_string="tags.`raytl.model_dir` = '" + resumed_run["model_dir"] + "'"
    )
    assert run.info.status == "FINISHED" and run.data.tags["raytl.command"] == "finetune"
    assert run.info.run_name == "ft" and run.data.params["freeze"] == "block4"
    assert run.data.params["backbone.layer"] == "pool5" and run.data.params["backbone.dim"] == "512"
    history = resumed_run["metrics"]["history"]
    for key in ("train_loss", "val_accuracy", "lr", "workers"):
        latest: dict[int, tuple[int, float]] = {}
        for point in client.get_metric_history(run.info.run_id, key):
            if point.step not in latest or point.timestamp >= latest[point.step][0]:
                latest[point.step] = (point.timestamp, point.value)
        assert sorted(latest) == [h["epoch"] for h in history], key
        assert [latest[h["epoch"]][1] for h in history] == pytest.approx([h[key] for h in history]), key
    assert run.data.metrics["accuracy"] == pytest.approx(resumed_run["metrics"]["accuracy"])
    assert {"model.json", "model.pt", "metrics.json", "report.html", "report"} == {
        a.path for a in client.list_artifacts(run.info.run_id)
    }  # backbone.pt is inside the MLflow model's program
    (logged,) = run.outputs.model_outputs
    model = client.get_logged_model(logged.model_id)
    assert model.status == "READY" and model.source_run_id == run.info.run_id


def test_model_dir_in_s3_holds_what_predict_needs(resumed_run):
    fs, root = resumed_run["fs"], resumed_run["model_dir"].removeprefix("s3://")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    assert {"backbone.pt", "model.pt", "model.json", "metrics.json", "finetune.json", "train"} <= names
    assert names <= set(WRITTEN)  # everything a run writes is what --overwrite removes
    info = json.loads(fs.cat(f"{root}/model.json"))
    assert info["kind"] == "finetune" and info["classes"] == ["blue", "green", "red"]
    assert info["backbone"]["layer"] == "pool5" and info["backbone"]["dim"] == 512
    # The best checkpoint is kept beside the latest (Ray Train's num_to_keep=1 by validation accuracy).
    kept = [
        p for p in fs.ls(f"{root}/train", detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")
    ]
    assert 1 <= len(kept) <= 2 and set(p.rsplit("/", 1)[-1] for p in kept) <= _checkpoints(fs, f"s3://{root}")
    out = resumed_run["tmp"] / "predictions"
    summary = raytl.predict(resumed_run["model_dir"], resumed_run["new"], str(out))
    rows = pq.read_table(out).to_pylist()
    assert summary["predicted"] == len(rows) == 18
    correct = sum(r["predicted_label"] == r["path"].split("/")[-2] for r in rows)
    assert correct / 18 == pytest.approx(summary["accuracy"]) and summary["accuracy"] >= 0.75


def test_backbone_matches_the_trained_network(resumed_run):
    """backbone.pt + model.pt reproduce the network's own logits (fine-tuned block 5, frozen blocks 1-4)."""
    fs, root = resumed_run["fs"], resumed_run["model_dir"].removeprefix("s3://")
    import io

    backbone = torch.load(io.BytesIO(fs.cat(f"{root}/backbone.pt")), weights_only=True)
    initial = random_state_dict(5)
    assert torch.equal(backbone["features.0.weight"], initial["features.0.weight"])  # frozen
    assert not torch.equal(backbone["features.28.weight"], initial["features.28.weight"])  # trained
    assert "classifier.0.weight" not in backbone  # --head avg needs no fc layers


def test_finetune_and_predict_read_tar_shards(resumed_run):
    """The run above trained from shards: it listed their samples (labels from a json field) and split
    them as files; predict on the shards agrees with predict on the same images as loose files."""
    tmp, fs, pattern = resumed_run["tmp"], resumed_run["fs"], resumed_run["source"]
    metrics = resumed_run["metrics"]
    train, val = metrics["train_samples"], metrics["val_samples"]
    assert {c: train[c] + val[c] for c in train} == {"blue": 20, "green": 20, "red": 20}
    assert sum(val.values()) == 12 and metrics["failed_val_images"] == 0  # round(0.2 * 20) per class

    model_dir = resumed_run["model_dir"]
    by_shard = raytl.predict(model_dir, pattern, str(tmp / "p-tar"))
    by_file = raytl.predict(model_dir, resumed_run["loose"], str(tmp / "p-loose"))
    assert by_shard["predicted"] == by_file["predicted"] == 60 and by_shard["failed"] == 0
    assert by_shard["accuracy"] == pytest.approx(by_file["accuracy"])
    source_of = {}  # SHARD#KEY -> its loose file, from the .json member raytl pack wrote
    for shard in sorted(p for p in fs.ls("raytl-finetune/shards") if p.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(shard))) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    source_of[f"s3://{shard}#{m.name[:-5]}"] = json.load(tar.extractfile(m))["source"]
    loose = {r["path"]: r for r in pq.read_table(tmp / "p-loose").to_pylist()}
    for row in pq.read_table(tmp / "p-tar").to_pylist():
        twin = loose[source_of[row["path"]]]
        assert (row["label"], row["predicted_label"]) == (twin["label"], twin["predicted_label"])
        assert row["score"] == pytest.approx(twin["score"], rel=1e-4)


def test_the_exported_network_scores_images_as_predict_does_without_raytl(resumed_run, tmp_path):
    """raytl export of the fine-tuned model to S3 -> one .pt2 that plain torch runs (raytl never imported)
    on the images' uint8 crops: the labels and probabilities of raytl predict on the same images."""
    fs, model_dir = resumed_run["fs"], resumed_run["model_dir"]
    raytl.export(model_dir, "s3://raytl-finetune/exported/ft.pt2")
    fs.get("raytl-finetune/exported/ft.pt2", str(tmp_path / "ft.pt2"))
    raytl.predict(model_dir, resumed_run["new"], str(tmp_path / "pred"))
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    backbone = Model.load(model_dir).info.recorded_backbone
    transform = Transform(int(backbone["image_size"]), int(backbone["preprocessing"]["resize"]))
    crops = np.stack([transform(fs.cat(r["path"].removeprefix("s3://"))) for r in rows])
    got = exported_scores(tmp_path / "ft.pt2", crops, tmp_path)
    scores = np.array(got["scores"])
    assert got["raytl_imported"] == [] and scores.shape == (18, 3)
    assert got["info"]["model"]["kind"] == "finetune" and got["info"]["scores"] == "softmax probabilities"
    assert [got["info"]["classes"][i] for i in scores.argmax(1)] == [r["predicted_label"] for r in rows]
    np.testing.assert_allclose(scores.max(1), [r["score"] for r in rows], atol=1e-4)
    np.testing.assert_allclose(scores.sum(1), 1, atol=1e-5)


def test_a_finished_model_dir_is_not_overwritten(resumed_run, capsys):
    args = _cli(resumed_run["source"], resumed_run["model_dir"], resumed_run["options"])
    assert_user_error(capsys, args, "already holds a finished model; pass --overwrite")


def test_a_rerun_with_other_options_is_refused(tmp_path, capsys):
    write_colour_corpus(tmp_path / "corpus", per_class=3)
    options = dict(OPTIONS, weights="random")
    config = FinetuneConfig.create(source=str(tmp_path / "corpus"), model_dir=str(tmp_path / "m"), **options)
    assert finetune.prepare_model_dir(config) is False  # a new run: its options are recorded
    assert finetune.prepare_model_dir(config) is True  # the same command resumes it
    args = _cli(str(tmp_path / "corpus"), str(tmp_path / "m"), dict(options, lr=0.5))
    assert_user_error(capsys, args, "holds an unfinished run with other options (--lr was 0.2, now 0.5)")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    args = _cli(str(tmp_path / "corpus"), str(tmp_path / "other"), options)
    assert_user_error(capsys, args, "is not empty and holds no raytl fine-tuning run")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"freeze": "block9"}, "--freeze must be one of none, block1, block2, block3, block4, block5"),
        ({"head": "fc8"}, "--head must be one of avg, fc7, not 'fc8'"),
        ({"optimizer": "adam"}, "--optimizer must be one of adamw, sgd"),
        ({"lr": 0}, "--lr must be positive, not 0.0"),
        ({"warmup_epochs": 6}, "--warmup-epochs must be at least 0 and less than --epochs (6)"),
        ({"label_smoothing": 1.5}, "--label-smoothing must be in [0, 1)"),
        ({"min_crop_scale": 0}, "--min-crop-scale must be in (0, 1]"),
        ({"workers": 0}, "--workers must be a count (4) or a range MIN-MAX (1-8; MIN at least 1), not '0'."),
        (
            {"workers": "3-2"},
            "--workers must be a count (4) or a range MIN-MAX (1-8; MIN at least 1), not '3-2'.",
        ),
    ],
)
def test_bad_options_get_one_sentence(tmp_path, capsys, change, message):
    write_colour_corpus(tmp_path / "corpus", per_class=2)
    args = _cli(str(tmp_path / "corpus"), str(tmp_path / "m"), dict(OPTIONS, weights="random", **change))
    assert_user_error(capsys, args, message)
    assert not (tmp_path / "m").exists()


def test_bad_corpora_get_one_sentence(tmp_path, capsys):
    options = dict(OPTIONS, weights="random")
    write_colour_corpus(tmp_path / "one", per_class=3)
    for label in ("green", "blue"):
        for f in (tmp_path / "one" / label).iterdir():
            f.unlink()
    args = _cli(str(tmp_path / "one"), str(tmp_path / "m"), options)
    one = str(tmp_path / "one")
    assert_user_error(capsys, args, f"SOURCE {one} has a single class ('red'); a classifier needs two.")
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "loose.png")
    assert_user_error(capsys, args, "SOURCE has images without a label (1 of 4)")
    write_colour_corpus(tmp_path / "ok", per_class=3)
    args = _cli(str(tmp_path / "ok"), str(tmp_path / "m"), dict(options, val=str(tmp_path / "missing")))
    assert_user_error(capsys, args, "--val: SOURCE")
    args = _cli(str(tmp_path / "ok"), str(tmp_path / "m"), dict(options, workers=50))
    assert_user_error(capsys, args, "--workers 50 is more than the")
    assert not (tmp_path / "m").exists()


def test_split_is_stratified_and_seeded(tmp_path):
    write_colour_corpus(tmp_path / "c", per_class=10)
    config = FinetuneConfig.create(
        source=str(tmp_path / "c"), model_dir=str(tmp_path / "m"), weights="random"
    )
    train, val, classes = finetune.split_corpus(config)
    assert classes == ["blue", "green", "red"] and train.shards is None is val.shards
    # Each class sends its lowest hash bins to validation until it holds round(0.2 * 10) = 2 images. Two
    # paths can share one of the 1024 bins (and tmp_path's paths differ between runs): validation is then
    # every image of the class whose bin is at most the bin of its second lowest.
    expected = set()
    for colour in classes:
        paths = sorted((tmp_path / "c" / colour).iterdir())
        row_bins = split.bins([str(p) for p in paths], config.seed)
        expected |= {str(p) for p, b in zip(paths, row_bins, strict=True) if b <= np.sort(row_bins)[1]}
    assert set(val.table["path"].to_pylist()) == expected
    assert min(val.table["label"].to_pylist().count(colour) for colour in classes) >= 2
    paths = set(train.table["path"].to_pylist())
    assert train.table.num_rows == 30 - len(expected) and not paths & set(val.table["path"].to_pylist())
    again = finetune.split_corpus(config)[1]
    assert again.table["path"].to_pylist() == val.table["path"].to_pylist()


def test_crop_box_follows_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width = int(rng.integers(100, 300))
        height = int(width * rng.uniform(0.8, 1.25))
        top, left, h, w = crop_box((width, height), 0.3, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Area share in [0.3, 1] and aspect in [3/4, 4/3], up to rounding to whole pixels.
        assert 0.3 * 0.97 <= h * w / (width * height) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # A strip no crop in the ratio range fits: torchvision's fallback, the largest centred 4:3 crop.
    assert crop_box((300, 20), 0.3, rng) == (0, 136, 20, 27)


def test_train_transform_crops_and_flips_at_random():
    image = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    data = __import__("io").BytesIO()
    image.save(data, "PNG")
    transform = TrainTransform(image_size=32, resize_size=37, min_scale=0.3)
    crops = [transform(data.getvalue()) for _ in range(8)]
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 8


@pytest.mark.parametrize(
    "freeze, head, first_trained",
    [
        (Freeze.BLOCK4, Head.AVG, 24),
        (Freeze.NONE, Head.AVG, 0),
        (Freeze.BLOCK5, Head.AVG, None),
        (Freeze.BLOCK5, Head.FC7, None),
    ],
)
def test_freeze_leaves_exactly_the_later_blocks_trainable(freeze, head, first_trained):
    config = FinetuneConfig.create(source="in", model_dir="out", head=head, freeze=freeze, image_size=32)
    network = build_network(random_state_dict(1, classifier=head == Head.FC7), config, classes=3)
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    conv = {int(n.split(".")[2]) for n in trainable if n.startswith("trunk.features.")}
    assert conv == (
        {i for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) if i >= first_trained}
        if first_trained is not None
        else set()
    )
    assert {"head.weight", "head.bias"} <= trainable
    fc = {n for n in trainable if n.startswith("trunk.classifier.")}
    assert fc == (
        {
            "trunk.classifier.0.weight",
            "trunk.classifier.0.bias",
            "trunk.classifier.3.weight",
            "trunk.classifier.3.bias",
        }
        if head == Head.FC7
        else set()
    )
    assert network(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.01)
    assert warmup_cosine(5, 10, 110) == pytest.approx(0.01 + 0.99 * 0.5)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


_BACKBONE = Backbone(
    "vgg16", "s3://old/place/backbone.pt#sha256:ab", Layer.POOL5, Pool.AVG, 2, 32, 32, "bilinear",
    (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), Precision.AUTO, Decode.CPU, None,
)  # fmt: skip


def test_predict_finds_a_moved_model_dir(tmp_path):
    """A fine-tuned backbone is looked up in MODEL_DIR itself and identified by its digest."""
    model = Model(
        ["a", "b"],
        np.zeros(2),
        np.ones(2),
        np.zeros((2, 2)),
        np.zeros(2),
        ModelInfo("finetune", "avg", _BACKBONE, {"weights": "s3://old/place/backbone.pt#sha256:ab"}),
    )
    assert default_weights(model, "/new/place") == "/new/place/backbone.pt"
    assert weights_content("file:///x/backbone.pt#sha256:ab") == weights_content(model.info.backbone.weights)


def test_freeze_a_fraction_of_any_backbone_and_keep_its_frozen_batch_norms_still():
    """--freeze F on a non-VGG backbone: the first F of its parameter-holding modules are frozen; in train
    mode their batch norms stay in eval (running statistics of --weights), the trained ones update, and the
    checkpointed state holds the trained layers' buffers with their parameters."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    config = FinetuneConfig.create(source="in", model_dir="out", model="resnet18", freeze=0.5, image_size=32)
    assert config.freeze == "0.5" and config.crop == 32
    network = build_network(state, config, classes=3)
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in network.trunk.named_parameters()))
    assert len(layers) == 40 and layers[:2] == ["conv1", "bn1"] and layers[-1] == "layer4.1.bn2"
    frozen = {n.rpartition(".")[0] for n, p in network.trunk.named_parameters() if not p.requires_grad}
    assert frozen == set(layers[:20])  # conv1 to layer2: round(0.5 * 40)
    network.train()
    assert not network.trunk.bn1.training and network.trunk.layer4[1].bn2.training
    network(torch.rand(4, 3, 32, 32))
    trained_state = trainable_state(network)
    assert torch.equal(network.trunk.bn1.running_mean, state["bn1.running_mean"])
    moved = trained_state["trunk.layer4.1.bn2.running_mean"]
    assert not torch.equal(moved, state["layer4.1.bn2.running_mean"])
    assert "trunk.bn1.running_mean" not in trained_state and "trunk.conv1.weight" not in trained_state
    assert {"head.weight", "head.bias", "trunk.layer4.1.bn2.num_batches_tracked"} <= set(trained_state)
    assert network(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "resnet18", "freeze": "block4"}, "--freeze block4 names one of vgg16's conv blocks"),
        ({"model": "resnet18", "head": "fc7"}, "--head fc7 is vgg16's own fc6 and fc7"),
        ({"freeze": "1.5"}, "or a fraction of the backbone's layers in (0, 1), not '1.5'."),
        ({"model": "resnet18", "image_size": 32, "weights": "WEIGHTS"}, "is not a torchvision resnet18"),
    ],
)
def test_other_backbones_options_are_checked_before_any_ray_work(tmp_path, capsys, options, message):
    write_colour_corpus(tmp_path / "corpus", per_class=2)
    torch.save(random_state_dict(1), tmp_path / "vgg.pt")  # VGG16's tensors offered to a ResNet
    options = {k: str(tmp_path / "vgg.pt") if v == "WEIGHTS" else v for k, v in options.items()}
    args = _cli(str(tmp_path / "corpus"), str(tmp_path / "m"), dict(OPTIONS, weights="random") | options)
    assert_user_error(capsys, args, message)
    assert not (tmp_path / "m").exists()


def test_a_resnet_fine_tune_resumes_after_a_lost_worker_and_predicts(ray_session, tmp_path, capsys):
    """A fine-tune of ResNet-18 (batch norms, half its layers trained): a Ray Train worker killed after the
    first checkpoint resumes from it; MODEL_DIR predicts as torchvision's ResNet-18 with backbone.pt and
    the new head computes."""
    import fsspec

    files = write_colour_corpus(tmp_path / "corpus", per_class=16, seed=0)
    torch.manual_seed(3)
    initial = torchvision.models.resnet18().state_dict()
    torch.save(initial, tmp_path / "w.pt")
    model_dir = str(tmp_path / "ft")
    options = dict(
        OPTIONS, model="resnet18", weights=str(tmp_path / "w.pt"), freeze=0.5, lr=0.05, workers=1, epochs=3
    )
    config = FinetuneConfig.create(source=str(tmp_path / "corpus"), model_dir=model_dir, **options)
    stale = set(_training_workers())
    metrics, _ = _run_killing_a_worker(config, fsspec.filesystem("file"), set(), stale, workers=1)
    assert [h["epoch"] for h in metrics["history"]] == list(range(3))
    (resumed,) = metrics["resumed_at_epochs"]
    # Validation takes at least a fifth of each class (3 of 16) by the hash of each path, and more where the
    # cut falls between two paths in one hash bin: these paths are under pytest's temp dir, which varies.
    val = metrics["val_samples"]
    assert 1 <= resumed < 3 and metrics["samples"] == sum(val.values()) and min(val.values()) >= 3
    assert metrics["accuracy"] >= 0.75

    info = json.loads((tmp_path / "ft" / "model.json").read_text())
    backbone = info["backbone"]
    assert (backbone["model"], backbone["layer"], backbone["pool"], backbone["dim"]) == (
        "resnet18",
        "penultimate",
        None,
        512,
    )
    assert info["config"]["freeze"] == "0.5" and info["config"]["model"] == "resnet18"
    assert "resnet18 penultimate, 32 px" in (tmp_path / "ft" / "report.html").read_text()
    capsys.readouterr()
    assert main(["inspect", model_dir]) == 0
    assert "backbone    resnet18 penultimate, D=512, 32 px" in capsys.readouterr().out
    state = torch.load(tmp_path / "ft" / "backbone.pt", weights_only=True)
    assert "fc.weight" not in state and torch.equal(state["conv1.weight"], initial["conv1.weight"])
    assert torch.equal(state["bn1.running_var"], initial["bn1.running_var"])  # frozen: eval mode
    assert not torch.equal(state["layer4.1.conv2.weight"], initial["layer4.1.conv2.weight"])
    assert not torch.equal(state["layer4.1.bn2.running_var"], initial["layer4.1.bn2.running_var"])

    summary = raytl.predict(model_dir, str(tmp_path / "corpus"), str(tmp_path / "pred"))
    rows = sorted(pq.read_table(tmp_path / "pred").to_pylist(), key=lambda r: r["path"])
    assert summary["predicted"] == len(rows) == 48 and summary["failed"] == 0
    # torchvision's ResNet-18 holding backbone.pt, its fc the new head, on raytl's crops of the images.
    head = Model.load(model_dir)
    network = torchvision.models.resnet18(num_classes=3).eval()
    fc = {"fc.weight": torch.from_numpy(head.weight), "fc.bias": torch.from_numpy(head.bias)}
    network.load_state_dict({**state, **fc})
    transform = Transform(32, int(backbone["preprocessing"]["resize"]))
    paths = sorted(p for paths in files.values() for p in paths)
    crops = torch.from_numpy(np.stack([transform(open(p, "rb").read()) for p in paths]))
    x = crops.permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = torch.softmax(network(x), dim=1).numpy()
    assert [r["path"] for r in rows] == paths
    assert [head.classes[i] for i in probabilities.argmax(1)] == [r["predicted_label"] for r in rows]
    np.testing.assert_allclose(probabilities.max(1), [r["score"] for r in rows], atol=1e-4)
