"""The two simple heads on real image embeddings: the Ray Train probes (logreg, SVM) against
scikit-learn (LogisticRegression, LinearSVC, each with standardisation), and predict from images
against predict from embeddings.

    python bench/heads.py                       # scikit-learn's digits (the quickstart's corpus), offline
    python bench/heads.py --workdir DIR --weights imagenet

Real images: scikit-learn's 1,797 handwritten digits as 64 px PNG files, the quickstart's split (1,500
to train on, the last 297 held out as the test set). Embeddings: `raytl extract` (VGG16 pool5, avg, 64 px)
with --weights (default: seeded random; `imagenet` where the weights can be had). Printed: test accuracy
of each head and of its scikit-learn reference, the gap in points, and how often predicting the test
images straight from their files agrees with predicting from their embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import raytl
from raytl.commands import extract, quickstart, train
from raytl.config import ExtractConfig, TrainConfig


def embeddings(uri: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = pq.read_table(uri, columns=["path", "label", "embedding"])
    x = np.stack([np.asarray(e, np.float32) for e in table["embedding"].to_pylist()])
    return x, np.array(table["label"].to_pylist()), table["path"].to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="bench-heads")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = os.path.abspath(args.workdir)
    train_images, test_images = os.path.join(root, "train"), os.path.join(root, "test")
    quickstart.write_digits(train_images, test_images)
    for name, source in (("emb-train", train_images), ("emb-test", test_images)):
        extract.run(
            ExtractConfig.create(
                source=source,
                output=os.path.join(root, name),
                weights=args.weights,
                image_size=64,
                overwrite=True,
            )
        )
    x, y, _ = embeddings(os.path.join(root, "emb-train"))
    x_test, y_test, _ = embeddings(os.path.join(root, "emb-test"))
    results = {"weights": args.weights, "train_rows": len(y), "test_rows": len(y_test)}
    references = {"logreg": LogisticRegression(max_iter=5000), "svm": LinearSVC(max_iter=20_000)}
    for head, reference in references.items():
        model_dir = os.path.join(root, f"model-{head}")
        started = time.perf_counter()
        train.run(
            TrainConfig.create(
                embeddings=os.path.join(root, "emb-train"),
                model_dir=model_dir,
                head=head,
                workers=args.workers,
                overwrite=True,
            )  # fmt: skip
        )
        seconds = time.perf_counter() - started
        from_emb = raytl.predict(
            model_dir, os.path.join(root, "emb-test"), os.path.join(root, f"p-emb-{head}"), overwrite=True
        )
        from_img = raytl.predict(model_dir, test_images, os.path.join(root, f"p-img-{head}"), overwrite=True)
        a = {
            r["path"]: r["predicted_label"]
            for r in pq.read_table(os.path.join(root, f"p-emb-{head}")).to_pylist()
        }
        b = {
            r["path"]: r["predicted_label"]
            for r in pq.read_table(os.path.join(root, f"p-img-{head}")).to_pylist()
        }
        sk = make_pipeline(StandardScaler(), reference).fit(x, y).score(x_test, y_test)
        results[head] = {
            "ray_train_test_accuracy": round(from_emb["accuracy"], 4),
            "sklearn_test_accuracy": round(float(sk), 4),
            "gap_points": round(100 * (from_emb["accuracy"] - sk), 2),
            "from_images_accuracy": round(from_img["accuracy"], 4),
            "images_vs_embeddings_agreement": round(np.mean([a[p] == b[p] for p in a]), 4),
            "train_seconds": round(seconds, 1),
        }
        print(head, json.dumps(results[head]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
