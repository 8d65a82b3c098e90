"""`raytl predict`: from images and from their embeddings alike; output schema; errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_user_error, exported_scores

import raytl
from raytl.commands import extract, train
from raytl.config import ExtractConfig, TrainConfig
from raytl.modeling.classifier import Model
from raytl.vision.preprocess import Transform


@pytest.fixture(scope="module")
def trained(predict_models):
    return predict_models


@pytest.mark.parametrize("model", ["model", "model-svm"])
def test_images_and_embeddings_give_the_same_predictions(trained, model):
    """Predicting straight from the images (decode, embed, classify in one pipeline) gives what the model
    gives on the stored embeddings of the same images (logreg: probability; SVM: margin)."""
    from_img = raytl.predict(str(trained / model), str(trained / "corpus"), str(trained / f"p-img-{model}"))
    classifier = Model.load(str(trained / model))
    embedded = pq.read_table(trained / "emb").to_pylist()
    index, score = classifier.predict(np.array([r["embedding"] for r in embedded], np.float32))
    a = {
        r["path"]: {"predicted_label": classifier.classes[i], "score": s, "label": r["label"]}
        for r, i, s in zip(embedded, index, score, strict=True)
    }
    b = {r["path"]: r for r in pq.read_table(trained / f"p-img-{model}").to_pylist()}
    assert set(a) == set(b) and len(a) == 52
    for path in a:
        assert a[path]["predicted_label"] == b[path]["predicted_label"]
        assert a[path]["score"] == pytest.approx(b[path]["score"], abs=1e-4)
        assert a[path]["label"] == b[path]["label"] == path.split("/")[-2]
    correct = np.mean([a[p]["predicted_label"] == a[p]["label"] for p in a])
    assert from_img["accuracy"] == pytest.approx(correct)
    assert classifier.info.head == ("svm" if model == "model-svm" else "logreg")
    assert (from_img["seen"], from_img["predicted"], from_img["failed"]) == (56, 52, 4)
    errors = pq.read_table(trained / f"p-img-{model}" / "_errors").to_pylist()
    assert sorted(e["path"].rsplit("/", 1)[-1] for e in errors) == sorted(
        ["empty.jpg", "notes-as-image.jpg", "truncated.jpg", "bomb.png"]
    )


def same_answers(a: list[dict], b: list[dict]) -> bool:
    """The same labels, scores within float rounding (batches of other sizes)."""
    return [x["label"] for x in a] == [y["label"] for y in b] and all(
        x["scores"] == pytest.approx(y["scores"], abs=1e-5) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("model", ["model", "model-svm"])
def test_raytl_load_predicts_in_process_as_predict_does(trained, model, tmp_path):
    """raytl.load(MODEL_DIR).predict(...) without Ray: file bytes, uint8 arrays and PIL images of the same
    images get predict's labels and scores (logreg: probability; SVM: margin); top_k keeps the best class;
    an image that cannot be used, a bad option and a MODEL_DIR that is not one are one sentence each."""
    from PIL import Image, ImageOps

    from raytl.errors import ConfigError, ImageError, StorageError

    raytl.predict(str(trained / model), str(trained / "corpus"), str(tmp_path / "pred"))
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    predictor = raytl.load(str(trained / model))
    files = [open(r["path"], "rb").read() for r in rows]
    answers = predictor.predict(files, batch_size=8)
    assert [a["label"] for a in answers] == [r["predicted_label"] for r in rows]
    assert [a["score"] for a in answers] == pytest.approx([r["score"] for r in rows], abs=1e-4)
    assert all(a["scores"][a["label"]] == a["score"] and set(a["scores"]) == {"cat", "dog"} for a in answers)
    pictures = [Image.open(r["path"]) for r in rows[:4]]
    assert same_answers(predictor.predict(pictures), answers[:4])
    jpeg = next(i for i, r in enumerate(rows) if r["path"].endswith(".jpg"))
    pixels = np.asarray(ImageOps.exif_transpose(Image.open(rows[jpeg]["path"])).convert("RGB"))
    assert same_answers(predictor.predict([pixels]), answers[jpeg : jpeg + 1])  # the decoded file, as pixels
    (best,) = predictor.predict(files[:1], top_k=1)
    assert best["scores"] == {best["label"]: best["score"]}
    with pytest.raises(ImageError, match="^image 1 is not a usable image: "):
        predictor.predict([files[0], b"not an image"])
    with pytest.raises(ConfigError, match="--device must be one of"):
        raytl.load(str(trained / model), device="tpu")
    with pytest.raises(StorageError, match="holds no raytl model"):
        raytl.load(str(tmp_path / "none"))


@pytest.mark.parametrize("model", ["model", "model-svm"])
def test_an_exported_model_scores_images_as_predict_does_without_raytl(trained, model, tmp_path, capsys):
    """raytl export -> one .pt2 that plain torch loads (raytl never imported) and runs on the images' uint8
    crops: the labels and scores (logreg: probability; SVM: margin) of raytl predict on the same images."""
    summary = raytl.export(str(trained / model), str(tmp_path / "m.pt2"))
    assert summary["bytes"] == (tmp_path / "m.pt2").stat().st_size > 100_000
    raytl.predict(str(trained / model), str(trained / "corpus"), str(tmp_path / "pred"))
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    backbone = Model.load(str(trained / model)).info.recorded_backbone
    transform = Transform(int(backbone["image_size"]), int(backbone["preprocessing"]["resize"]))
    crops = np.stack([transform(open(r["path"], "rb").read()) for r in rows])
    got = exported_scores(tmp_path / "m.pt2", crops, tmp_path)
    assert got["raytl_imported"] == [] and len(rows) == 52
    info, scores = got["info"], np.array(got["scores"])
    assert info["classes"] == summary["classes"] == ["cat", "dog"] and scores.shape == (52, 2)
    assert info["scores"] == ("SVM margins" if model == "model-svm" else "softmax probabilities")
    assert info["preprocessing"]["crop"] == 32 and info["backbone"] == backbone
    assert [info["classes"][i] for i in scores.argmax(1)] == [r["predicted_label"] for r in rows]
    np.testing.assert_allclose(scores.max(1), [r["score"] for r in rows], atol=1e-4)
    assert_user_error(
        capsys, ["export", str(trained / model), str(tmp_path / "m.pt2")], "exists; pass --overwrite"
    )


def test_export_errors(trained, tmp_path, capsys):
    out = str(tmp_path / "m.pt2")
    assert_user_error(capsys, ["export", str(tmp_path / "nomodel"), out], "holds no raytl model")
    assert_user_error(
        capsys, ["export", str(trained / "model"), str(tmp_path / "m.onnx")], "OUT must name a .pt2 file"
    )
    train.run(
        TrainConfig.create(
            embeddings=str(trained / "emb"), model_dir=str(tmp_path / "rbf"), backend="sklearn", head="svm",
            kernel="rbf", val_fraction=0.25,
        )
    )  # fmt: skip
    assert_user_error(capsys, ["export", str(tmp_path / "rbf"), out], "train it with --kernel linear")
    assert not (tmp_path / "m.pt2").exists()


def _edited(model_dir, tmp_path, edit) -> str:
    """A copy of model_dir whose model.json's backbone `edit` changed."""
    import shutil

    copy = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(model_dir, copy)
    info = json.loads((copy / "model.json").read_text())
    edit(info)
    (copy / "model.json").write_text(json.dumps(info))
    return str(copy)


def _set(path: str, value=None, delete: bool = False):
    def edit(info):
        *parents, leaf = path.split(".")
        node = info
        for key in parents:
            node = node[key]
        if delete:
            del node[leaf]
        else:
            node[leaf] = value

    return edit


HAND_EDITED = [  # (edit of model.json, what the one sentence says)
    (_set("backbone.image_size", "abc"), "backbone.image_size is 'abc', not a positive integer"),
    (_set("backbone", delete=True), "has a damaged model.json (no `backbone` record)"),
    (_set("backbone.model", "../../x"), "backbone.model is '../../x', not a torchvision classification"),
    (_set("backbone.model", "fasterrcnn_resnet50_fpn"), "'fasterrcnn_resnet50_fpn', not a torchvision"),
    (_set("backbone.preprocessing.mean", [0.5]), "backbone.preprocessing.mean is [0.5], not three finite"),
    (_set("backbone.preprocessing.std", [1, 0, 1]), "preprocessing.std is [1, 0, 1], not three positive"),
    (_set("backbone.preprocessing.resize", delete=True), "backbone.preprocessing.resize is missing"),
    (_set("backbone.preprocessing", delete=True), "backbone.preprocessing is missing"),
    (_set("backbone.preprocessing.interpolation", "cubic"), "interpolation is 'cubic', not one of nearest"),
    (_set("backbone.dim", True), "backbone.dim is True, not a positive integer"),
    (_set("backbone.layer", "fc9"), "backbone.layer is 'fc9', not one of pool5, fc6, fc7"),
    (_set("backbone.precision", 16), "backbone.precision is 16, not one of auto"),
    (_set("backbone.weights", None), "backbone.weights is None, not a weights id"),
]


def test_a_hand_edited_model_json_is_one_sentence_naming_its_bad_fields(
    trained, tmp_path, capsys, monkeypatch
):
    """export, predict and serve read model.json through one check (model_dir.parse_backbone): every bad
    field is named, no traceback, and nothing is downloaded to find out what a named model is."""
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("a MODEL_DIR made raytl download something")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    model = trained / "model"
    images = str(trained / "corpus")
    for edit, message in HAND_EDITED:
        edited = _edited(model, tmp_path, edit)
        out, pred = str(tmp_path / "m.pt2"), str(tmp_path / "p")
        verbs = [["export", edited, out], ["predict", edited, images, pred], ["serve", edited, "--port", "1"]]
        for args in verbs:
            text = assert_user_error(capsys, args, message)
            assert text.endswith("; train the model again."), text
    both = _edited(
        model, tmp_path, lambda i: [_set(f"backbone.{k}", v)(i) for k, v in (("image_size", 0), ("dim", -1))]
    )
    text = assert_user_error(capsys, ["export", both, str(tmp_path / "m.pt2")], "backbone.dim is -1, not a")
    assert "backbone.image_size is 0, not a positive integer" in text
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "p").exists()


def test_prediction_schema(trained):
    raytl.predict(str(trained / "model"), str(trained / "emb"), str(trained / "p-schema"))
    schema = pq.read_schema(next((trained / "p-schema").glob("part-*.parquet")))
    assert schema.names == ["path", "predicted_label", "score", "label"]
    assert [str(t) for t in schema.types] == ["string", "string", "float", "string"]
    table = pq.read_table(trained / "p-schema")
    scores = np.array(table["score"].to_pylist())
    assert ((scores >= 0.5) & (scores <= 1.0)).all()  # two classes: the winner has at least half
    assert set(table["predicted_label"].to_pylist()) <= {"cat", "dog"}


def test_unlabelled_images_get_null_label_and_no_accuracy(trained, tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.png").write_bytes((trained / "corpus" / "cat" / "plain-1.png").read_bytes())
    summary = raytl.predict(str(trained / "model"), str(tmp_path / "new"), str(tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 1 and rows[0]["label"] is None and rows[0]["predicted_label"] in {"cat", "dog"}
    assert summary["accuracy"] is None and summary["labelled"] == 0


def test_predict_errors(trained, capsys, tmp_path):
    assert_user_error(
        capsys,
        ["predict", str(tmp_path / "nomodel"), str(trained / "emb"), str(tmp_path / "o")],
        "holds no raytl model",
    )
    extract.run(
        ExtractConfig.create(
            source=str(trained / "corpus"),
            output=str(tmp_path / "emb64"),
            weights=str(trained / "w.pt"),
            image_size=64,
            precision="fp32",
        )
    )
    assert_user_error(
        capsys,
        ["predict", str(trained / "model"), str(tmp_path / "emb64"), str(tmp_path / "o")],
        "has image_size 64, but the model expects 32",
    )


def test_output_never_replaces_the_input_or_another_commands_results(trained, capsys, tmp_path):
    """`predict MODEL EMB EMB --overwrite` used to delete its own input, then crash: OUTPUT equal to or inside
    INPUT is refused, and --overwrite replaces only predictions, never embeddings."""
    emb = tmp_path / "emb"
    import shutil

    shutil.copytree(trained / "emb", emb)
    before = sorted(p.name for p in emb.rglob("*"))
    model = str(trained / "model")
    for output in (str(emb), str(emb / "predictions"), f"file://{emb}/"):
        assert_user_error(
            capsys, ["predict", model, str(emb), output, "--overwrite"], f"{emb}: raytl would write its"
        )
    other = tmp_path / "other"
    shutil.copytree(trained / "emb", other)  # embeddings where predictions would go
    assert_user_error(
        capsys,
        ["predict", model, str(trained / "emb"), str(other), "--overwrite"],
        f"OUTPUT {other} holds embeddings, not predictions, and --overwrite only replaces predictions",
    )
    assert sorted(p.name for p in emb.rglob("*")) == before
    assert pq.read_table(other).num_rows == pq.read_table(trained / "emb").num_rows
    # extract refuses the mirror image: predictions where embeddings would go, and OUTPUT inside SOURCE.
    raytl.predict(model, str(trained / "emb"), str(tmp_path / "pred"))
    base = ["extract", "--weights", str(trained / "w.pt"), "--image-size", "32", "--overwrite"]
    assert_user_error(
        capsys,
        [*base, str(trained / "corpus"), str(tmp_path / "pred")],
        "holds predictions, not embeddings, and --overwrite only replaces embeddings",
    )
    assert_user_error(
        capsys, [*base, str(trained / "corpus"), str(trained / "corpus" / "out")], "is inside SOURCE"
    )
    assert pq.read_table(tmp_path / "pred").num_rows == 52


def test_a_gpu_decoded_model_predicts_tar_shards_decoded_on_cpu(trained, tmp_path):
    """predict copies --decode from the model; shards are always decoded by CPU tasks (read_shards), which
    a model made with --decode gpu used to skip, failing on columns the GPU decoder expects."""
    import io
    import json
    import shutil
    import tarfile

    model = tmp_path / "model-gpu"
    shutil.copytree(trained / "model", model)
    info = json.loads((model / "model.json").read_text())
    info["backbone"]["preprocessing"]["decode"] = "gpu"
    (model / "model.json").write_text(json.dumps(info))
    (tmp_path / "shards").mkdir()
    files = sorted((trained / "corpus" / "cat").glob("plain-*.png"))
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for i, file in enumerate(files):
            for name, data in ((f"k{i}.png", file.read_bytes()), (f"k{i}.cls", b"cat")):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    gpu = raytl.predict(str(model), str(tmp_path / "shards"), str(tmp_path / "p-gpu"))
    cpu = raytl.predict(str(trained / "model"), str(tmp_path / "shards"), str(tmp_path / "p-cpu"))
    assert gpu["predicted"] == cpu["predicted"] == len(files) and gpu["failed"] == 0
    a, b = pq.read_table(tmp_path / "p-gpu").to_pylist(), pq.read_table(tmp_path / "p-cpu").to_pylist()
    assert sorted(map(str, a)) == sorted(map(str, b))


def test_train_logs_and_registers_an_mlflow_model_that_predicts_as_predict_does(trained, tmp_path, caplog):
    """train --mlflow-register: the run's MLflow model (pyfunc over the exported program, its code a file,
    no pickle) loads with MLflow's own client from the registry and from runs:/ID/model and labels image
    files as raytl predict does; its signature, requirements and MODEL_DIR's files are in the run. An
    RBF-kernel SVM, which has no program, gets a warning and a finished run without a model."""
    import logging

    import mlflow
    import pandas as pd
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from raytl.version import VERSION

    uri, model_dir = str(tmp_path / "mlruns"), str(tmp_path / "model")
    options = dict(backend="sklearn", val_fraction=0.25, mlflow_uri=uri)
    raytl.train(str(trained / "emb"), model_dir, mlflow_register="pets", **options)
    raytl.predict(model_dir, str(trained / "corpus"), str(tmp_path / "pred"))
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    images = pd.DataFrame({"image": [open(r["path"], "rb").read() for r in rows]})
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("raytl").experiment_id])
    assert run.info.status == "FINISHED" and len(run.outputs.model_outputs) == 1
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "model.json", "model.pt", "metrics.json", "report.html", "report"
    }  # fmt: skip
    (version,) = client.search_model_versions("name='pets'")
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    with _use_tracking_uri(uri):
        for model_uri in ("models:/pets/1", f"runs:/{run.info.run_id}/model"):
            model = mlflow.pyfunc.load_model(model_uri)
            got = model.predict(images)
            assert list(got.columns) == ["label", "score"] and len(got) == len(rows) == 52
            assert list(got["label"]) == [r["predicted_label"] for r in rows]
            np.testing.assert_allclose(got["score"], [r["score"] for r in rows], atol=1e-4)
        signature = model.metadata.signature
        assert signature.inputs.input_names() == ["image"]
        assert signature.outputs.input_names() == ["label", "score"]
        files = client.get_logged_model(run.outputs.model_outputs[0].model_id).artifact_location
        local = mlflow.artifacts.download_artifacts(files, dst_path=str(tmp_path / "logged"))
    names = {p.name for p in (tmp_path / "logged").rglob("*")}
    assert {"MLmodel", "mlflow_code.py", "model.pt2", "input_example.json"} <= names
    assert not any(n.endswith(".pkl") for n in names)  # the model is code, not a pickle
    requirements = open(f"{local}/requirements.txt").read().split()
    assert f"raytl=={VERSION}" in requirements and any(r.startswith("torch==") for r in requirements)

    with caplog.at_level(logging.WARNING):
        raytl.train(str(trained / "emb"), str(tmp_path / "rbf"), kernel="rbf", head="svm", **options)
    assert "The MLflow run gets no model: MODEL_DIR" in caplog.text and "RBF-kernel SVM" in caplog.text
    runs = client.search_runs(
        [client.get_experiment_by_name("raytl").experiment_id], "attributes.run_name = 'rbf'"
    )
    assert runs[0].info.status == "FINISHED" and not runs[0].outputs.model_outputs
