"""Fewer labels: what `raytl curve` costs and whether its last point is `raytl train --backend sklearn`;
`--l2 auto` against the default; and which `raytl select` strategy buys the most accuracy per label.

    python bench/labels.py                      # 10,000 x 512-d embeddings, 10 classes, 8 shot levels x 5
    python bench/labels.py --rows 2000 --json labels.json
    python bench/labels.py --only simulate --embeddings raytl-quickstart/embeddings   # any labelled EMB

On Gaussian classes written as raytl embeddings (tests/synthetic.py's, spread so the curve climbs): the
wall time of `raytl.curve` (Ray started first, as on a cluster) with --shots 1,2,...,128 (8 levels) and
--repeats 5 (40 fits, one Ray task each, plus the full-data fit), and the difference, in points, between
the curve's "all" and `raytl.train(backend="sklearn")` on the same split. Then `--l2 auto` against the
default l2 (1/n_train) on validation, with few labels in many dimensions (300 rows, 200-d, 3 classes) and
with many (6,000 rows, 64-d): the validation accuracy of each and the wall time of the auto run.

The simulation: on a labelled dataset (scikit-learn's digits, 1,797 images of 8x8 pixels as 64-d features,
by default; or --embeddings, raytl embeddings with labels) the labels are hidden; a fixed seeded fifth is
the test set; each strategy selects --per-round rows a round from the rest (raytl select's own scoring and
selection, modeling/select.py, in this process: the Ray pass is only the streaming), the selected rows
are "labelled" by revealing theirs, the probe (train --backend sklearn's fit) is fitted on all revealed
rows and scored on the test set; model strategies start from one random round. Accuracy against labels,
mean over --sim-repeats seeds, for each strategy; and for each, the labels random needs to reach the
strategy's accuracy at each budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
from synthetic import blobs, names, write  # noqa: E402

from raytl.modeling import select  # noqa: E402


def _model(x, y, classes):
    from synthetic import BACKBONE

    from raytl.config import TrainConfig
    from raytl.modeling import model_dir
    from raytl.modeling.probe import fit_sklearn

    info = model_dir.info_of({**BACKBONE, "dim": x.shape[1]}, kind="probe", head="logreg", backend="sklearn")
    config = TrainConfig.create(embeddings="e", model_dir="m", backend="sklearn")
    return fit_sklearn(x, y, classes, config, 1.0 / len(y), info)


def _select_round(strategy, x, y, revealed, budget, seed):
    """raytl select's scoring and selection (commands/select.py) over arrays: the rows picked."""
    import pyarrow as pa

    from raytl.commands import select as command
    from raytl.config import SelectConfig, Strategy

    paths = np.array([f"row-{i}" for i in range(len(x))], dtype=object)
    labels = [str(int(v)) if r else None for v, r in zip(y, revealed, strict=True)]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = pa.table({"path": paths.tolist(), "label": labels, "embedding": embedding})
    model = None
    if Strategy(strategy) in (Strategy.MARGIN, Strategy.ENTROPY, Strategy.MARGIN_DIVERSE):
        classes = sorted(set(labels) - {None})
        index = {c: i for i, c in enumerate(classes)}
        model = _model(x[revealed], np.array([index[labels[i]] for i in np.flatnonzero(revealed)]), classes)
    config = SelectConfig.create(embeddings="e", output="o.csv", budget=budget, strategy=strategy, seed=seed,
                                 model="m" if model is not None else None)  # fmt: skip
    batch = command.score_batch(table, x.shape[1], config.strategy, seed, model)
    best = select.Best(select.candidates(config.strategy, budget))
    covered = select.Best(select.COVERED if config.strategy in (Strategy.TYPICAL, Strategy.KCENTER) else 0)
    pool, known = batch["unlabelled"], ~batch["unlabelled"]
    best.add(batch["score"][pool], batch["tie"][pool], batch["path"][pool], batch["x"][pool])
    covered.add(batch["tie"][known], batch["tie"][known], batch["path"][known], batch["x"][known])
    picked, _ = command.choose(config, best, covered)
    return [int(p.removeprefix("row-")) for p in picked]


def simulate(x, y, strategies, rounds, per_round, repeats):
    """Accuracy on the held-out fifth after each round, per strategy: (labels, mean accuracy) lists."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for strategy in strategies:
        curves = []
        for seed in range(repeats):
            rng = np.random.default_rng(seed)
            test = rng.random(len(x)) < 0.2
            xp, yp, xt, yt = x[~test], y[~test], x[test], y[test]
            revealed = np.zeros(len(xp), bool)
            if strategy in ("margin", "entropy", "margin-diverse"):
                revealed[rng.choice(len(xp), per_round, replace=False)] = True  # a random first round
                while len(set(yp[revealed])) < 2:
                    revealed[rng.integers(len(xp))] = True
            accuracies = []
            while revealed.sum() < rounds * per_round:
                picked = _select_round(strategy, xp, yp, revealed, per_round, seed)
                revealed[picked] = True
                if len(set(yp[revealed])) < 2:
                    accuracies.append((int(revealed.sum()), 1.0 / len(set(y))))
                    continue
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                clf.fit(xp[revealed], yp[revealed])
                accuracies.append((int(revealed.sum()), float((clf.predict(xt) == yt).mean())))
            curves.append(accuracies)
        labels = [n for n, _ in curves[0]]
        mean = [round(float(np.mean([c[i][1] for c in curves])), 4) for i in range(len(labels))]
        out[strategy] = {"labels": labels, "accuracy": mean}
    return out


def labels_random_needs(sim):
    """Per strategy and budget: the labels random selection needs (interpolated) to reach its accuracy."""
    rand = sim["random"]
    out = {}
    for strategy, curve in sim.items():
        needed = []
        for accuracy in curve["accuracy"]:
            above = [n for n, a in zip(rand["labels"], rand["accuracy"], strict=True) if a >= accuracy]
            needed.append(above[0] if above else None)  # None: beyond random's last budget
        out[strategy] = dict(zip(curve["labels"], needed, strict=True))
    return out


def against_twice_random(sim):
    """Per budget N (where random has a point at 2N): the best strategy's accuracy at N and random's at 2N."""
    rand = dict(zip(sim["random"]["labels"], sim["random"]["accuracy"], strict=True))
    out = {}
    for n in sorted(rand):
        if 2 * n not in rand:
            continue
        at_n = {
            s: dict(zip(c["labels"], c["accuracy"], strict=True)).get(n)
            for s, c in sim.items()
            if s != "random"
        }
        best = max((a, s) for s, a in at_n.items() if a is not None)
        out[n] = {
            "best": best[1],
            "accuracy": best[0],
            "random_at_2n": rand[2 * n],
            "holds": best[0] >= rand[2 * n],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--only", choices=["curve", "simulate", "scale"], help="one part only")
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="--only scale: unlabelled rows")
    parser.add_argument("--embeddings", help="simulate on these labelled raytl embeddings, not digits")
    parser.add_argument("--per-round", type=int, default=10, help="labels selected a round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sim-repeats", type=int, default=3)
    args = parser.parse_args()
    figures: dict = {}
    if args.only == "scale":
        figures["scale"] = run_scale(args)
    if args.only not in ("curve", "scale"):
        figures["simulation"] = run_simulation(args)
    if args.only not in ("simulate", "scale"):
        figures.update(run_curve(args))
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def run_simulation(args) -> dict:
    if args.embeddings:
        import pyarrow.parquet as pq

        from raytl.files.embeddings import matrix, open_embeddings

        data = open_embeddings(args.embeddings)
        table = pq.read_table(data.files)
        x = matrix(table["embedding"], data.dim)
        names_ = table["label"].to_pylist()
        classes = sorted(set(names_))
        y = np.array([classes.index(n) for n in names_])
        dataset = args.embeddings
    else:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32)
        dataset = "scikit-learn digits, 1,797 x 64-d pixels"
    start = time.perf_counter()
    strategies = ["random", "typical", "kcenter", "margin", "entropy", "margin-diverse"]
    sim = simulate(x, y, strategies, args.rounds, args.per_round, args.sim_repeats)
    seconds = round(time.perf_counter() - start, 1)
    return {"dataset": dataset, "per_round": args.per_round, "repeats": args.sim_repeats, "curves": sim,
            "labels_random_needs": labels_random_needs(sim),
            "best_at_n_vs_random_at_2n": against_twice_random(sim), "seconds": seconds}  # fmt: skip


def run_scale(args) -> dict:
    """raytl select on --scale-rows unlabelled 512-d rows (written in parts of 50,000): the wall time of
    typical, kcenter, random and margin-diverse (with a probe trained on 2,000 labelled rows)."""
    import ray

    import raytl

    ray.init(logging_level="ERROR", include_dashboard=False)
    out: dict = {"rows": args.scale_rows, "dim": 512}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        start = time.perf_counter()
        for part in range(0, args.scale_rows, 50_000):
            x, _ = blobs(min(50_000, args.scale_rows - part), 10, 512, seed=part, spread=12)
            write(f"{tmp}/pool", x, [None] * len(x), parts=1, prefix=f"u{part}")
        x, y = blobs(2000, 10, 512, seed=1, spread=12)
        write(f"{tmp}/labelled", x, names(y), parts=1, prefix="l")
        out["write_seconds"] = round(time.perf_counter() - start, 1)
        raytl.train(f"{tmp}/labelled", f"{tmp}/model", backend="sklearn")
        for strategy, extra in (("random", {}), ("typical", {}), ("kcenter", {}),
                                ("margin-diverse", {"model": f"{tmp}/model"})):  # fmt: skip
            start = time.perf_counter()
            raytl.select(f"{tmp}/pool", f"{tmp}/{strategy}.parquet", budget=100, strategy=strategy, **extra)
            out[f"{strategy}_seconds"] = round(time.perf_counter() - start, 1)
            print(strategy, out[f"{strategy}_seconds"], flush=True)
    return out


def run_curve(args) -> dict:
    import ray

    import raytl

    ray.init(logging_level="ERROR", include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        x, y = blobs(args.rows, args.classes, args.dim, seed=0, spread=12)
        write(f"{tmp}/emb", x, names(y), parts=8)
        shots = ",".join(str(2**i) for i in range(8))
        start = time.perf_counter()
        curve = raytl.curve(f"{tmp}/emb", f"{tmp}/curve", shots=shots, repeats=args.repeats)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        trained = raytl.train(f"{tmp}/emb", f"{tmp}/model", backend="sklearn")
        train_seconds = time.perf_counter() - start
        l2 = {}
        for rows, dim in ((300, 200), (6000, 64)):
            where = f"{tmp}/l2-{rows}"
            xs, ys = blobs(rows, 3, dim, seed=0, spread=8)
            xv, yv = blobs(600, 3, dim, seed=1, spread=8)
            write(f"{where}/emb", xs, names(ys))
            write(f"{where}/val", xv, names(yv), prefix="val")
            options = {"backend": "sklearn", "val": f"{where}/val"}
            start = time.perf_counter()
            auto = raytl.train(f"{where}/emb", f"{where}/auto", l2="auto", **options)
            auto_seconds = time.perf_counter() - start
            default = raytl.train(f"{where}/emb", f"{where}/default", **options)
            l2[f"{rows}x{dim}"] = {
                "default": round(default["accuracy"], 4), "auto": round(auto["accuracy"], 4),
                "auto_l2_times_n": round(auto["l2"] * rows, 4), "auto_seconds": round(auto_seconds, 1),
            }  # fmt: skip
    figures = {
        "rows": args.rows, "dim": args.dim, "classes": args.classes, "shots": shots, "repeats": args.repeats,
        "curve_seconds": round(seconds, 1),
        "train_sklearn_seconds": round(train_seconds, 1),
        "points": {str(p["shots"]): round(p["accuracy"], 4) for p in curve["points"]},
        "all_minus_train_points": round(100 * (curve["points"][-1]["accuracy"] - trained["accuracy"]), 3),
        "answer": curve["sentence"],
        "l2_auto_vs_default": l2,
    }  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
