"""`raytl select`: which unlabelled rows to label next, each strategy on a case whose answer is known."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_user_error
from synthetic import write

import raytl
from raytl.cli import main
from raytl.config import SelectConfig
from raytl.corpus.reader import read_manifest
from raytl.errors import ConfigError
from raytl.modeling.classifier import Model

CENTRES = np.array([[0, 0], [40, 0], [0, 40], [40, 40]], dtype=np.float32)


def _four_blobs(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 4, n)
    return (CENTRES[blob] + rng.normal(0, 2, (n, 2))).astype(np.float32), blob


def _picked(out) -> list[str]:
    table = pq.read_table(out)
    assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))
    return table.column("path").to_pylist()


@pytest.mark.ray
def test_cold_start_strategies_cover_every_cluster_and_repeat_for_a_seed(ray_session, tmp_path, capsys):
    """Four separated blobs, unlabelled but for one row of the first: typical clusters them into four
    (labelled + budget) and picks the most typical row (the lowest mean distance to its 20 nearest
    neighbours, recomputed here) of each blob the label does not cover, kcenter one row of each of those
    blobs; random is the same for a seed and differs for another; labelled rows are never picked; the
    manifest reads back as extract's --manifest."""
    x, blob = _four_blobs()
    known = int(np.flatnonzero(blob == 0)[0])
    labels = ["a" if i == known else None for i in range(len(x))]
    paths = write(str(tmp_path / "emb"), x, labels)
    index = {p: i for i, p in enumerate(paths)}
    emb = str(tmp_path / "emb")

    assert main(["select", emb, str(tmp_path / "typical.parquet"), "--budget", "3"]) == 0
    typical = [index[p] for p in _picked(tmp_path / "typical.parquet")]
    assert sorted(blob[typical]) == [1, 2, 3]
    for row in typical:
        mine = np.flatnonzero(blob == blob[row])
        d = np.linalg.norm(x[mine, None] - x[None, mine], axis=2)
        mean = np.sort(d, axis=1)[:, 1:21].mean(axis=1)
        assert row == mine[np.argmin(mean)]

    raytl.select(emb, str(tmp_path / "kcenter.csv"), budget=3, strategy="kcenter")
    kcenter = [
        index[p]
        for p in read_manifest(str(tmp_path / "kcenter.csv"), ("s3",)).table.column("path").to_pylist()
    ]
    assert sorted(blob[kcenter]) == [1, 2, 3] and kcenter[0] == np.argmax(
        np.linalg.norm(x - x[known], axis=1)
    )

    runs = {}
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        raytl.select(emb, str(tmp_path / f"{name}.parquet"), budget=15, strategy="random", seed=seed)
        runs[name] = _picked(tmp_path / f"{name}.parquet")
    assert runs["one"] == runs["again"] != runs["other"]
    assert paths[known] not in runs["one"] and len(set(runs["one"])) == 15

    assert_user_error(capsys, ["select", emb, str(tmp_path / "one.parquet"), "--budget", "2"], "exists; pass")
    assert_user_error(capsys, ["select", emb, str(tmp_path / "n.csv"), "--budget", "200"],
                      "--budget 200 is more than the 199 unlabelled rows of EMBEDDINGS.")  # fmt: skip


@pytest.mark.ray
def test_margin_picks_the_rows_nearest_the_decision_boundary(ray_session, tmp_path, capsys):
    """A probe trained on two classes split at x = 0: margin and entropy pick the unlabelled rows nearest
    x = 0; margin-diverse takes the most uncertain row of each of two far-apart uncertain groups."""
    rng = np.random.default_rng(1)
    xl = np.concatenate([rng.normal([-5, 0], 1, (60, 2)), rng.normal([5, 0], 1, (60, 2))]).astype(np.float32)
    xl[:, 1] = rng.uniform(-35, 35, 120)  # y tells the classes nothing
    write(str(tmp_path / "labelled"), xl, ["left"] * 60 + ["right"] * 60, prefix="l")
    raytl.train(str(tmp_path / "labelled"), str(tmp_path / "model"), backend="sklearn")
    # unlabelled: spread along x, in two groups far apart in y
    xu = np.stack([np.linspace(-6, 6, 80), np.where(np.arange(80) % 2, 30.0, -30.0)], axis=1).astype(
        np.float32
    )
    xu[:, 0] += rng.normal(0, 0.01, 80).astype(np.float32)
    paths = write(str(tmp_path / "pool"), xu, [None] * 80, prefix="u")
    index = {p: i for i, p in enumerate(paths)}
    pool, model = str(tmp_path / "pool"), str(tmp_path / "model")
    logits = Model.load(model).logits(xu)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    nearest = set(np.argsort(np.abs(p[:, 0] - p[:, 1]))[:5].tolist())
    assert all(abs(xu[i, 0]) < 1 for i in nearest)  # the boundary is near x = 0

    for strategy in ("margin", "entropy"):
        raytl.select(pool, str(tmp_path / f"{strategy}.parquet"), budget=5, strategy=strategy, model=model)
        assert {index[q] for q in _picked(tmp_path / f"{strategy}.parquet")} == nearest, strategy
    raytl.select(pool, str(tmp_path / "diverse.parquet"), budget=2, strategy="margin-diverse", model=model)
    diverse = [index[q] for q in _picked(tmp_path / "diverse.parquet")]
    assert sorted(np.sign(xu[diverse, 1]).tolist()) == [-1.0, 1.0]  # one from each group
    assert all(abs(xu[i, 0]) < 1 for i in diverse)

    write(str(tmp_path / "other"), xu, [None] * 80, prefix="o", image_size=64)
    assert_user_error(capsys, ["select", str(tmp_path / "other"), str(tmp_path / "o.csv"), "--budget", "2",
                               "--strategy", "margin", "--model", model], "image_size")  # fmt: skip
    labelled = ["select", str(tmp_path / "labelled"), str(tmp_path / "l.csv"), "--budget", "2"]
    assert_user_error(capsys, labelled, "has no unlabelled rows (label empty) to select from")


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "--budget must be a whole number above 0, not 0"),
        (
            {"budget": 3, "strategy": "margin"},
            "--strategy margin ranks by a model's predictions: give --model",
        ),
        ({"budget": 3, "model": "m"}, "--strategy typical uses no model"),
        ({"budget": 3, "strategy": "best"}, "--strategy must be one of random, typical, kcenter, margin"),
    ],
)
def test_bad_options_get_one_sentence(options, message):
    with pytest.raises(ConfigError, match=message):
        SelectConfig.create(embeddings="e", output="o.csv", **options)
    with pytest.raises(ConfigError, match="OUT is a manifest and must end in .parquet or .csv"):
        SelectConfig.create(embeddings="e", output="o.txt", budget=1)


@pytest.mark.ray
def test_typical_on_a_pool_beyond_its_sample_assigns_every_row_in_a_second_pass(
    ray_session, tmp_path, monkeypatch
):
    """A pool larger than typical's sample (made small here): the clusters are fitted on the sample, then a
    second Ray Data pass puts every unlabelled row in its nearest cluster; the clusters without a label go
    largest first by their size over the whole pool, and each pick is the most typical of its cluster's
    rows nearest the centre over the whole pool (all recomputed here)."""
    from raytl.modeling import select

    monkeypatch.setattr(select, "COLD_CANDIDATES", 60)
    monkeypatch.setattr(select, "NEAR_CENTRE", 40)
    x, blob = _four_blobs(600)
    known = int(np.flatnonzero(blob == 0)[0])
    labels = ["a" if i == known else None for i in range(len(x))]
    paths = np.array(write(str(tmp_path / "emb"), x, labels), dtype=object)
    raytl.select(str(tmp_path / "emb"), str(tmp_path / "typical.parquet"), budget=3, seed=3)
    picked = _picked(tmp_path / "typical.parquet")

    pool = np.array([i != known for i in range(len(x))])
    tie = select.hashed(paths.tolist(), 3)
    sample = np.flatnonzero(pool)[np.lexsort((tie[pool], -tie[pool]))][:60]  # as select.Best keeps them
    clusters = select.Clusters.fit(x[sample].astype(np.float64), 3, 3, x[[known]].astype(np.float64))
    cluster, distance = select.nearest_centre(x.astype(np.float64), clusters.centres)
    brute = np.linalg.norm(x[:, None].astype(np.float64) - clusters.centres[None], axis=2)
    assert (cluster == brute.argmin(axis=1)).all() and np.allclose(distance, brute.min(axis=1))
    sizes = np.bincount(cluster[pool], minlength=4)
    uncovered = sorted(set(range(4)) - clusters.taken, key=lambda c: -sizes[c])
    assert [cluster[np.flatnonzero(paths == p)[0]] for p in picked] == uncovered
    for p, c in zip(picked, uncovered, strict=True):
        mine = np.flatnonzero(pool & (cluster == c))
        near = mine[np.lexsort((tie[mine], distance[mine]))][:40]
        d = np.linalg.norm(x[near, None] - x[None, near], axis=2)
        mean = np.sort(d, axis=1)[:, 1:21].mean(axis=1)
        assert p == paths[near[np.argmin(mean)]]
    assert len(set(blob[[np.flatnonzero(paths == p)[0] for p in picked]])) == 3
