"""`raytl audit`: label issues against cleanlab on out-of-fold probabilities recomputed with scikit-learn,
planted near-duplicates grouped, a leaked validation row found and the accuracy without it recomputed."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from cleanlab.filter import find_label_issues
from conftest import assert_user_error
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from synthetic import blobs, names, write

import raytl
from raytl.cli import main
from raytl.commands import audit as command
from raytl.modeling import audit
from raytl.modeling.select import hashed


def _logreg(x, y, c: float = 1.0):
    """What train --backend sklearn fits: with --l2 left out (1/n) C = 1; l2 = s/n is C = 1/s."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=0)).fit(x, y)


def _planted_flips(n: int, seed: int, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-separated classes, and a share of the rows given another class's label."""
    x, y = blobs(n, 3, 16, seed=seed, spread=0.6)
    flipped = np.random.default_rng(seed).random(n) < share
    given = np.where(flipped, (y + 1) % 3, y)
    return x, given, flipped


@pytest.mark.ray
def test_label_issues_are_cleanlab_on_out_of_fold_probabilities(ray_session, tmp_path, capsys):
    """5 % of 600 labels flipped: the table is cleanlab's find_label_issues (ranked by self-confidence) on
    the out-of-fold probabilities of scikit-learn's logistic regression, folds by the documented path hash,
    its penalty (1, 10 or 100 / n) the one of the lowest out-of-fold log loss; it finds the flips;
    unlabelled rows are left out."""
    x, given, flipped = _planted_flips(600, seed=4, share=0.05)
    labels = [None if i % 50 == 7 else label for i, label in enumerate(names(given))]
    paths = np.array(write(str(tmp_path / "emb"), x, labels), dtype=object)
    out = tmp_path / "out"
    assert (
        main(["audit", str(tmp_path / "emb"), str(out), "--checks", "labels", "--folds", "4", "--seed", "2"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    keep = np.array([label is not None for label in labels])
    xs, ys, ps = x[keep], given[keep], paths[keep]
    fold = np.minimum((hashed(list(ps), 2) * 4).astype(int), 3)
    losses = {}
    for times_n in (1.0, 10.0, 100.0):
        probs = np.zeros((len(ys), 3))
        for f in range(4):
            model = _logreg(xs[fold != f], ys[fold != f], c=1.0 / times_n)
            probs[fold == f] = model.predict_proba(xs[fold == f])
        losses[times_n] = (float(-np.log(np.clip(probs[np.arange(len(ys)), ys], 1e-15, 1)).mean()), probs)
    chosen = min(losses, key=lambda s: losses[s][0])
    probs = losses[chosen][1]
    # n_jobs=1 as raytl calls it: a Pool forked from this Ray-connected process can be SIGTERMed while
    # starting, which Ray's handler turns into SystemExit inside the forked copy of pytest.
    expected = find_label_issues(ys, probs, return_indices_ranked_by="self_confidence", n_jobs=1)

    table = pq.read_table(out / "label_issues.parquet")
    assert table.schema.names == ["path", "label", "suggested_label", "self_confidence", "rank"]
    got = table.to_pydict()
    assert got["path"] == list(ps[expected])
    assert got["label"] == [f"class-{c}" for c in ys[expected]]
    assert got["suggested_label"] == [f"class-{c}" for c in probs[expected].argmax(axis=1)]
    assert got["self_confidence"] == pytest.approx(probs[expected, ys[expected]], abs=1e-6)
    assert got["rank"] == list(range(1, len(expected) + 1))
    planted = set(ps[flipped[keep]])
    found = set(got["path"])
    assert len(found & planted) >= 0.9 * len(planted) and len(found & planted) >= 0.8 * len(found)
    summary = json.loads((out / "audit.json").read_text())
    assert summary["labels"]["labelled"] == len(ys) and summary["labels"]["issues"] == printed["label_issues"]
    assert summary["labels"]["out_of_fold_accuracy"] == pytest.approx(float((probs.argmax(1) == ys).mean()))
    assert summary["labels"]["l2"] == f"{chosen:g}/n"
    assert [s["log_loss"] for s in summary["labels"]["l2_sweep"]] == pytest.approx(
        [losses[s][0] for s in (1.0, 10.0, 100.0)], abs=1e-5
    )
    assert not (out / "duplicates.parquet").exists() and "duplicates" not in summary
    page = (out / "audit.html").read_text()
    assert "Likely label errors" in page and got["path"][0].rsplit("/", 1)[-1] in page


def _near_copy(row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (row * (1 + rng.normal(0, 0.01, row.shape))).astype(np.float32)


@pytest.mark.ray
def test_planted_duplicates_grouped_and_leaked_rows_scored(ray_session, tmp_path, monkeypatch):
    """Training rows with a group of three near-copies and a pair; a --val set with two near-copies of
    training rows: duplicates.parquet holds exactly those groups (the same with the search split into
    cells), leakage.parquet the two validation rows, and the validation accuracy with and without them is
    scikit-learn's."""
    rng = np.random.default_rng(0)
    x, y = blobs(300, 3, 64, seed=0, spread=2.5)
    xv, yv = blobs(80, 3, 64, seed=1, spread=2.5)
    x[11], x[12], x[41] = _near_copy(x[10], rng), _near_copy(x[10], rng), _near_copy(x[40], rng)
    xv[5], xv[6] = _near_copy(x[100], rng), _near_copy(x[200], rng)
    train_paths = write(str(tmp_path / "emb"), x, names(y))
    val_paths = write(str(tmp_path / "val"), xv, names(yv), prefix="val")
    out = tmp_path / "out"
    args = ["--val", str(tmp_path / "val"), "--checks", "duplicates,leakage"]
    summary = raytl.audit(str(tmp_path / "emb"), str(out), val=str(tmp_path / "val"),
                          checks="duplicates,leakage")  # fmt: skip

    groups = pq.read_table(out / "duplicates.parquet").to_pylist()
    assert {r["group"]: r["size"] for r in groups} == {1: 3, 2: 2, 3: 2, 4: 2}
    by_group: dict[int, set] = {}
    for r in groups:
        by_group.setdefault(r["group"], set()).add(r["path"])
    t, v = train_paths, val_paths
    assert by_group[1] == {t[10], t[11], t[12]}
    assert sorted(map(sorted, [by_group[2], by_group[3], by_group[4]])) == sorted(
        [sorted([t[40], t[41]]), sorted([t[100], v[5]]), sorted([t[200], v[6]])]
    )
    for r in groups:
        crossing = r["path"] in (t[100], v[5], t[200], v[6])
        assert r["crosses_splits"] == crossing and r["split"] == ("val" if r["path"] in v else "train")
        assert (
            r["similarity"] > 0.99
            and r["label"]
            == (names(yv) if r["path"] in v else names(y))[(v if r["path"] in v else t).index(r["path"])]
        )
    assert sum(r["keep"] for r in groups) == 4 and not any(r["keep"] for r in groups if r["path"] in v)
    assert summary["duplicates"]["groups"] == 4 and summary["duplicates"]["groups_crossing_splits"] == 2
    assert sum(summary["duplicates"]["nearest_similarity"]["counts"]) == 380

    leaked = pq.read_table(out / "leakage.parquet").to_pylist()
    assert [(r["path"], r["duplicate"]) for r in leaked] == [(v[5], t[100]), (v[6], t[200])]
    assert [r["label"] for r in leaked] == [names(yv)[5], names(yv)[6]]
    predicted = _logreg(x, y).predict(xv)
    clean = np.ones(80, bool)
    clean[[5, 6]] = False
    leak = summary["leakage"]
    assert leak["validation_rows"] == 80 and leak["leaked"] == 2
    assert leak["accuracy"] == pytest.approx(float((predicted == yv).mean()))
    assert leak["accuracy_without_leaked"] == pytest.approx(float((predicted[clean] == yv[clean]).mean()))

    # The same search split into cells (as for millions of rows) finds the same groups.
    monkeypatch.setattr(audit, "EXACT_ROWS", 100)
    monkeypatch.setattr(audit, "CELL_ROWS", 60)
    again = raytl.audit(str(tmp_path / "emb"), str(tmp_path / "cells"), val=str(tmp_path / "val"),
                        checks="duplicates")  # fmt: skip
    assert again["duplicates"]["cells"] == 6
    assert pq.read_table(tmp_path / "cells" / "duplicates.parquet").to_pylist() == groups
    assert not (tmp_path / "cells" / "leakage.parquet").exists()
    assert main(["audit", str(tmp_path / "emb"), str(out), *args, "--overwrite"]) == 0


@pytest.mark.ray
def test_bad_input_gets_one_sentence(ray_session, tmp_path, capsys):
    x, y = blobs(40, 2, 64, seed=0)
    write(str(tmp_path / "unlabelled"), x, [None] * 40)
    write(str(tmp_path / "emb"), x, names(y))
    write(str(tmp_path / "other"), x, names(y), image_size=64)
    write(str(tmp_path / "empty"), x[:0], [], parts=1)
    out = str(tmp_path / "out")
    assert_user_error(
        capsys,
        ["audit", str(tmp_path / "unlabelled"), out],
        "has no labelled rows: label issues and leakage need labels",
    )
    assert_user_error(capsys, ["audit", str(tmp_path / "emb"), out, "--val", str(tmp_path / "other")],
                      "has image_size 64")  # fmt: skip
    assert_user_error(capsys, ["audit", str(tmp_path / "empty"), out], "has no rows")
    assert_user_error(
        capsys, ["audit", str(tmp_path / "emb"), out, "--checks", "typos"], "--checks must name"
    )
    assert_user_error(capsys, ["audit", str(tmp_path / "emb"), out, "--folds", "1"], "--folds must be 2")
    assert_user_error(
        capsys, ["audit", str(tmp_path / "emb"), out, "--l2", "auto"], "does not take --l2 auto"
    )
    assert not (tmp_path / "out").exists()
    # Duplicates alone need no labels.
    assert main(["audit", str(tmp_path / "unlabelled"), out, "--checks", "duplicates"]) == 0
    assert pq.read_table(tmp_path / "out" / "duplicates.parquet").num_rows == 0


def test_groups_are_connected_components():
    groups = audit.Groups()
    groups.add([("a", "b", 0.95), ("c", "d", 0.97), ("b", "e", 0.99), ("x", "y", 0.91)])
    assert groups.groups() == [["a", "b", "e"], ["c", "d"], ["x", "y"]]
    assert groups.best == {"a": 0.95, "b": 0.99, "e": 0.99, "c": 0.97, "d": 0.97, "x": 0.91, "y": 0.91}
    assert command.audit.keeper(["a", "b"], ["val", "train"]) == 1


@pytest.mark.ray
def test_exclude_feeds_the_tables_back_into_training(ray_session, tmp_path, capsys, bucket):
    """train --exclude with raytl audit's tables, the audit in S3 (loopback moto): the top-5 label issues and
    every duplicate but the kept one are left out; the metrics are scikit-learn's on the rows left. (train
    reads a local copy of the same rows: its report would fetch the rows' made-up s3:// images.)"""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    rng = np.random.default_rng(3)
    x, y = blobs(300, 3, 64, seed=5, spread=2.5)
    x[1], x[3] = _near_copy(x[0], rng), _near_copy(x[2], rng)
    given = np.where(rng.random(300) < 0.05, (y + 1) % 3, y)
    emb = f"s3://{bucket}/emb"
    paths = write(emb, x, names(given))
    assert write(str(tmp_path / "emb"), x, names(given)) == paths
    xv, yv = blobs(90, 3, 64, seed=6, spread=2.5)
    write(str(tmp_path / "val"), xv, names(yv), prefix="val")
    audited = f"s3://{bucket}/audit"
    raytl.audit(emb, audited, checks="labels,duplicates", folds=3)
    issues = pq.read_table(f"{bucket}/audit/label_issues.parquet", filesystem=fs)["path"].to_pylist()
    groups = pq.read_table(f"{bucket}/audit/duplicates.parquet", filesystem=fs).to_pylist()
    assert fs.exists(f"{bucket}/audit/audit.html") and fs.exists(f"{bucket}/audit/audit.json")
    assert {r["path"] for r in groups} == {paths[0], paths[1], paths[2], paths[3]} and len(issues) > 5
    dropped = set(issues[:5]) | {r["path"] for r in groups if not r["keep"]}
    tables = f"{audited}/label_issues.parquet,{audited}/duplicates.parquet"
    model = tmp_path / "model"
    args = [
        "train",
        str(tmp_path / "emb"),
        str(model),
        "--backend",
        "sklearn",
        "--val",
        str(tmp_path / "val"),
    ]
    assert main([*args, "--exclude", tables, "--exclude-rank", "5"]) == 0
    metrics = json.loads((model / "metrics.json").read_text())
    kept = np.array([p not in dropped for p in paths])
    assert metrics["train_samples"] == {f"class-{c}": int((given[kept] == c).sum()) for c in range(3)}
    expected = float((_logreg(x[kept], given[kept]).predict(xv) == yv).mean())
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["excluded"]["paths"] == len(dropped) == 7

    capsys.readouterr()  # the audit's page warned of the rows' made-up s3:// images: not what is judged next
    (tmp_path / "no-path.csv").write_text("file\na.jpg\n")
    assert_user_error(capsys, [*args, "--exclude", str(tmp_path / "no-path.csv"), "--overwrite"],
                      "has no `path` column (columns: file)")  # fmt: skip
    assert_user_error(capsys, [*args, "--exclude", str(tmp_path / "gone.parquet"), "--overwrite"],
                      "gone.parquet: no such file")  # fmt: skip
    assert_user_error(
        capsys, [*args, "--exclude-rank", "5"], "--exclude-rank must be 1 or more and come with"
    )


def test_finetune_and_list_leave_out_the_listed_images(tmp_path, capsys):
    """finetune's split and list's manifest lose exactly the images an --exclude table lists."""
    from images import write_corpus

    from raytl.commands import finetune
    from raytl.config import FinetuneConfig

    good = write_corpus(tmp_path / "images", {"cat": [1, 2], "dog": [3, 4]}, broken=False, strays=False)
    root = str(tmp_path / "images")
    gone = sorted(good)[:3]
    (tmp_path / "leakage.csv").write_text("path,label\n" + "".join(f"{root}/{p},x\n" for p in gone))
    config = FinetuneConfig.create(
        source=root, model_dir=str(tmp_path / "m"), exclude=str(tmp_path / "leakage.csv")
    )
    train, val, classes = finetune.split_corpus(config)
    seen = set(train.table["path"].to_pylist()) | set(val.table["path"].to_pylist())
    assert seen == {f"{root}/{p}" for p in good} - {f"{root}/{p}" for p in gone} and classes == ["cat", "dog"]

    assert (
        main(["list", root, str(tmp_path / "clean.parquet"), "--exclude", str(tmp_path / "leakage.csv")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["excluded"] == 3
    listed = pq.read_table(tmp_path / "clean.parquet")["path"].to_pylist()
    assert sorted(listed) == sorted(seen)
