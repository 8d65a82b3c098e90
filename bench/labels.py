"""Fewer labels: what `raytl curve` costs and whether its last point is `raytl train --backend sklearn`.

    python bench/labels.py                      # 10,000 x 512-d embeddings, 10 classes, 8 shot levels x 5
    python bench/labels.py --rows 2000 --json labels.json

On Gaussian classes written as raytl embeddings (tests/synthetic.py's, spread so the curve climbs): the
wall time of `raytl.curve` (Ray started first, as on a cluster) with --shots 1,2,...,128 (8 levels) and
--repeats 5 (40 fits, one Ray task each, plus the full-data fit), and the difference, in points, between
the curve's "all" and `raytl.train(backend="sklearn")` on the same split. Then `--l2 auto` against the
default l2 (1/n_train) on validation, with few labels in many dimensions (300 rows, 200-d, 3 classes) and
with many (6,000 rows, 64-d): the validation accuracy of each and the wall time of the auto run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from synthetic import blobs, names, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

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
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
