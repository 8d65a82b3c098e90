"""`raytl curve`: the few-shot learning curve, each point against scikit-learn fitted on the same rows."""

import hashlib
import json

import numpy as np
import pytest
from conftest import assert_user_error
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from synthetic import blobs, names, write

import raytl
from raytl.cli import main
from raytl.config import CurveConfig
from raytl.errors import ConfigError
from raytl.modeling import curve


def _draw_order(paths: list[str], seed: int, draw: int) -> list[int]:
    """The documented ranking: blake2b-64 of "seed\\0draw\\0path", lowest first."""
    key = [hashlib.blake2b(f"{seed}\0{draw}\0{p}".encode(), digest_size=8).digest() for p in paths]
    return sorted(range(len(paths)), key=lambda i: key[i])


def _sklearn_accuracy(x, y, xv, yv) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x, y)
    return float((model.predict(xv) == yv).mean())


@pytest.mark.ray
def test_each_point_is_scikit_learn_on_k_rows_a_class_of_each_draw(ray_session, tmp_path, capsys):
    """EMBEDDINGS with unlabelled rows (left out) and a --val set: every draw of every point is the
    accuracy of scikit-learn's logistic regression (C=1, standardised) on the k best-ranked labelled rows
    of each class; "all" is the fit on every labelled row; the JSON, figure and page are written."""
    x, y = blobs(420, 3, 12, seed=0, spread=5)
    labels = [label if i % 7 else None for i, label in enumerate(names(y))]
    paths = write(str(tmp_path / "emb"), x, labels)
    xv, yv = blobs(150, 3, 12, seed=1, spread=5)
    write(str(tmp_path / "val"), xv, names(yv), prefix="val")
    args = ["curve", str(tmp_path / "emb"), str(tmp_path / "out"), "--val", str(tmp_path / "val")]
    assert main([*args, "--shots", "1,4,16", "--repeats", "2", "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = json.loads((tmp_path / "out" / "curve.json").read_text())

    labelled = [i for i, label in enumerate(labels) if label is not None]
    assert got["train_samples"] == {f"class-{c}": int((y[labelled] == c).sum()) for c in range(3)}
    assert [p["shots"] for p in got["points"]] == [1, 4, 16, "all"]
    for p in got["points"][:-1]:
        k = p["shots"]
        assert p["labels"] == 3 * k and len(p["draws"]) == 2
        for draw, result in enumerate(p["draws"]):
            order = [i for i in _draw_order(paths, 3, draw) if labels[i] is not None]
            chosen = [i for c in range(3) for i in [j for j in order if y[j] == c][:k]]
            expected = _sklearn_accuracy(x[chosen], y[chosen], xv, yv)
            assert result["accuracy"] == pytest.approx(expected, abs=1e-9), (k, draw)
        accuracies = [r["accuracy"] for r in p["draws"]]
        assert p["accuracy"] == pytest.approx(np.mean(accuracies))
        assert p["accuracy_std"] == pytest.approx(np.std(accuracies))
    full = got["points"][-1]
    assert full["labels"] == len(labelled)
    assert full["accuracy"] == pytest.approx(_sklearn_accuracy(x[labelled], y[labelled], xv, yv), abs=1e-9)
    reached = next(p for p in got["points"] if p["accuracy"] >= 0.9 * full["accuracy"])
    assert got["answer"]["shots"] == printed["shots"] == reached["shots"]
    assert (tmp_path / "out" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert got["sentence"] in (tmp_path / "out" / "curve.html").read_text()

    assert_user_error(capsys, args, "already holds a curve (curve.json); pass --overwrite")
    assert raytl.curve(str(tmp_path / "emb"), str(tmp_path / "out"), val=str(tmp_path / "val"),
                       shots=(), overwrite=True)["points"][0]["shots"] == "all"  # fmt: skip


@pytest.mark.ray
def test_embeddings_without_labels_get_one_sentence(ray_session, tmp_path, capsys):
    x, _ = blobs(30, 2, 4, seed=0)
    write(str(tmp_path / "emb"), x, [None] * 30)
    assert_user_error(
        capsys, ["curve", str(tmp_path / "emb"), str(tmp_path / "out")], "holds no labelled rows"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"shots": "1,two"},
            "--shots must be labels per class as whole numbers above 0, e.g. 1,2,4, not '1,two'",
        ),
        ({"shots": "0,4"}, "--shots must be labels per class"),
        ({"repeats": 0}, "--repeats must be"),
        ({"l2": -1.0}, "--l2 must be zero or positive, or auto, not -1.0"),
    ],
)
def test_bad_options_get_one_sentence(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CurveConfig.create(embeddings="e", output="o", **options)


def test_shots_parse_and_the_default_ladder_stops_below_the_largest_class():
    assert CurveConfig.create(embeddings="e", output="o", shots="8, 2,all,2").shots == (2, 8)
    assert curve.ladder(None, 40) == [1, 2, 4, 8, 16, 32]
    assert curve.ladder(None, 32) == [1, 2, 4, 8, 16]
    assert curve.ladder((1, 5, 50), 40) == [1, 5]


def test_subsets_merged_batch_by_batch_are_the_best_ranked_rows_of_the_whole_split():
    rng = np.random.default_rng(0)
    n, k = 300, 7
    batch = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.integers(0, 3, n),
             "path": np.array([f"p{i}" for i in range(n)], dtype=object)}  # fmt: skip
    whole = curve.Subsets(k)
    whole.add(curve.best_ranked(batch, seed=1, draws=2, k=k))
    merged = curve.Subsets(k)
    for rows in np.array_split(np.arange(n), 5):
        merged.add(curve.best_ranked({name: v[rows] for name, v in batch.items()}, seed=1, draws=2, k=k))
    for draw in range(2):
        for shots in (1, 3, 7):
            x, y = merged.subset(draw, shots)
            expected_x, expected_y = whole.subset(draw, shots)
            np.testing.assert_array_equal(x, expected_x)
            np.testing.assert_array_equal(y, expected_y)
            assert np.bincount(y).tolist() == [shots] * 3
        # nested: the 3-shot rows are the first 3 of the 7-shot rows of each class
        x7, y7 = merged.subset(draw, 7)
        x3, _ = merged.subset(draw, 3)
        np.testing.assert_array_equal(x3, np.concatenate([x7[y7 == c][:3] for c in range(3)]))
    assert not np.array_equal(merged.subset(0, 7)[0], merged.subset(1, 7)[0])  # the draws differ


@pytest.mark.ray
def test_l2_auto_sweeps_with_ray_tune_and_beats_the_default_on_few_labels(ray_session, tmp_path):
    """Few labels in many dimensions, where scikit-learn's default C=1 overfits: --l2 auto sweeps nine
    values with Ray Tune (ASHA stops the hopeless ones), keeps the most accurate on validation, and the
    model fitted with it is scikit-learn's at that C, more accurate than the default's."""
    x, y = blobs(150, 3, 120, seed=0, spread=8)
    xv, yv = blobs(300, 3, 120, seed=1, spread=8)
    write(str(tmp_path / "emb"), x, names(y))
    write(str(tmp_path / "val"), xv, names(yv), prefix="val")
    options = {"backend": "sklearn", "val": str(tmp_path / "val")}
    auto = raytl.train(str(tmp_path / "emb"), str(tmp_path / "auto"), l2="auto", **options)
    default = raytl.train(str(tmp_path / "emb"), str(tmp_path / "default"), **options)

    sweep = auto["l2_sweep"]
    assert [t["l2"] for t in sweep] == pytest.approx([10.0**e / 150 for e in range(-4, 5)])
    finished = [t for t in sweep if t["rounds"] == 8]
    assert len(finished) < len(sweep)  # early-stopped trials
    best = max(finished, key=lambda t: (t["accuracy"], t["l2"]))
    assert auto["l2"] == best["l2"] and default["l2"] == pytest.approx(1 / 150)
    saved = json.loads((tmp_path / "auto" / "model.json").read_text())
    assert (
        saved["l2"] == auto["l2"] and json.loads((tmp_path / "auto" / "metrics.json").read_text())["l2_sweep"]
    )
    c = 1 / (auto["l2"] * 150)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)
    assert auto["accuracy"] == pytest.approx(float((reference.predict(xv) == yv).mean()))
    assert auto["accuracy"] > default["accuracy"] + 0.02
    assert "chosen by --l2 auto from 9 values" in (tmp_path / "auto" / "report.html").read_text()

    # curve --l2 auto: each few-shot point chooses its own penalty by cross-validation within its rows
    # (never the validation rows that score it); one row a class has no split (the default 1/n); the last
    # point is train --l2 auto's fit.
    got = raytl.curve(str(tmp_path / "emb"), str(tmp_path / "curve"), val=str(tmp_path / "val"), l2="auto",
                      shots="1,8", repeats=1)  # fmt: skip
    one, eight, full = got["points"]
    assert one["draws"][0]["l2"] == pytest.approx(1 / 3) and "l2_sweep" not in one["draws"][0]
    draw = eight["draws"][0]
    assert [t["l2"] for t in draw["l2_sweep"]] == pytest.approx([10.0**e / 24 for e in range(-4, 5)])
    assert (
        draw["l2"] == min(draw["l2_sweep"], key=lambda t: (t["log_loss"], abs(np.log10(t["l2"] * 24))))["l2"]
    )
    done = full["draws"][0]
    assert done["l2"] in [t["l2"] for t in done["l2_sweep"]] and len(done["l2_sweep"]) == 9
    c = 1 / (done["l2"] * 150)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)
    assert full["accuracy"] == pytest.approx(float((reference.predict(xv) == yv).mean()))


def test_inner_l2_is_stratified_cross_validation_within_the_point():
    """curve.inner_l2 against scikit-learn: for each factor f of the grid (C = 1/f in every inner fold),
    the out-of-fold accuracy and log loss of StratifiedKFold(min(5, smallest class), shuffled by the seed);
    the lowest log loss chosen (ties: nearest the default); the SVM by accuracy; under 4 rows of a class,
    the default 1/n."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC
    from synthetic import BACKBONE

    from raytl.config import TrainConfig
    from raytl.modeling import model_dir

    x, y = blobs(36, 3, 20, seed=3, spread=6)
    config = TrainConfig.create(embeddings="e", model_dir="m", backend="sklearn", l2="auto", seed=5)
    info = model_dir.info_of({**BACKBONE, "dim": 20}, kind="probe", head="logreg", backend="sklearn")
    chosen, sweep = curve.inner_l2(x, y, ["a", "b", "c"], config, info)
    folds = list(StratifiedKFold(min(5, int(np.bincount(y).min())), shuffle=True, random_state=5).split(x, y))
    accuracy, loss = [], []
    for factor in curve.L2_FACTORS:
        right, total = 0, 0.0
        for inside, held in folds:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1 / factor, max_iter=2000))
            model.fit(x[inside], y[inside])
            right += int((model.predict(x[held]) == y[held]).sum())
            p = model.predict_proba(x[held])[np.arange(len(held)), y[held]]
            total -= np.log(np.clip(p, 1e-15, 1.0)).sum()  # clipped as raytl's (scikit-learn's old eps)
        accuracy.append(right / 36)
        loss.append(total / 36)
    assert [t["accuracy"] for t in sweep] == pytest.approx(accuracy)
    assert [t["log_loss"] for t in sweep] == pytest.approx(loss, rel=1e-3)
    assert chosen == pytest.approx(curve.L2_FACTORS[int(np.argmin(loss))] / 36) and len(accuracy) == 9

    svm = TrainConfig.create(embeddings="e", model_dir="m", backend="sklearn", l2="auto", seed=5, head="svm")
    svm_info = model_dir.info_of({**BACKBONE, "dim": 20}, kind="probe", head="svm", backend="sklearn")
    chosen, sweep = curve.inner_l2(x, y, ["a", "b", "c"], svm, svm_info)
    right = []
    for factor in curve.L2_FACTORS:
        model = make_pipeline(StandardScaler(), LinearSVC(C=1 / factor, max_iter=10_000, random_state=5))
        right.append(sum(int((model.fit(x[i], y[i]).predict(x[h]) == y[h]).sum()) for i, h in folds) / 36)
    assert [t["accuracy"] for t in sweep] == pytest.approx(right) and "log_loss" not in sweep[0]
    best = max(range(9), key=lambda i: (right[i], -abs(np.log10(curve.L2_FACTORS[i]))))
    assert chosen == pytest.approx(curve.L2_FACTORS[best] / 36)
    three = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # 3 rows of "c": under MIN_ROWS
    assert curve.inner_l2(x[:11], three, ["a", "b", "c"], config, info) == (pytest.approx(1 / 11), [])
