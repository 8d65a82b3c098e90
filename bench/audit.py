"""What `raytl audit` finds and what it costs: planted label errors found, the near-duplicate threshold
chosen from a measurement, and the duplicate search's time on 1M x 512-d rows.

    python bench/audit.py                              # all three parts (about 10 minutes on 2 cores)
    python bench/audit.py --only labels                # or duplicates, or scale
    python bench/audit.py --only duplicates --distinct 2000 --image-size 224 --weights random
    python bench/audit.py --only scale --scale-rows 1000000

labels: scikit-learn's 1,797 digits written as 64 px PNG files (quickstart's corpus), embedded by `raytl
extract` (VGG16 pool5, --weights random: no download here), then a seeded 5 % of the labels flipped to
another class; `raytl audit --checks labels` (5 folds): the precision and recall of the rows it flags
against the flipped ones. The same on the digits' 64 raw pixels, as a second feature set.

duplicates: --distinct distinct images (224x224 2x2 mosaics; a tile is a random crop of one of
scikit-learn's two sample photos, a smooth random pattern or a digit in random colours) and, of the
first --copied, three copies each: resized to 50-80 %, re-encoded as JPEG at quality 60-95, cropped by
10 % (5 % a side); all embedded by `raytl extract`. For each threshold, on the cosine of
the normalised embeddings (centred on the mean, then unit length, as audit computes it) and on the raw
cosine: the share of (original, copy) pairs at or above it (recall), and the share of distinct images
with another distinct image at or above it (flagged). The threshold chosen is the lowest at which at most
1 % of distinct images are flagged; then `raytl audit --checks duplicates` at that threshold, end to end.

scale: --scale-rows rows of 512-d Gaussian clusters (parts of 50,000) with 1,000 planted near-copies;
`raytl audit --checks duplicates`: wall time, cells, and the planted pairs found.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

THRESHOLDS = [round(t, 3) for t in np.arange(0.70, 0.995, 0.01)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["labels", "duplicates", "scale"], help="one part only")
    parser.add_argument("--flip", type=float, default=0.05, help="labels: the share of labels flipped")
    parser.add_argument("--distinct", type=int, default=2000, help="duplicates: distinct images")
    parser.add_argument("--copied", type=int, default=300, help="duplicates: originals copied three ways")
    parser.add_argument("--image-size", type=int, default=224, help="duplicates: extract's crop")
    parser.add_argument("--weights", default="random", help="extract's --weights (imagenet needs a download)")
    parser.add_argument("--scale-rows", type=int, default=1_000_000)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import ray

    ray.init(logging_level="ERROR", include_dashboard=False)
    figures: dict = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if args.only in (None, "labels"):
            figures["labels"] = run_labels(args, f"{tmp}/labels")
            print(json.dumps(figures["labels"], indent=2), flush=True)
        if args.only in (None, "duplicates"):
            figures["duplicates"] = run_duplicates(args, f"{tmp}/duplicates")
            print(json.dumps(figures["duplicates"], indent=2), flush=True)
        if args.only in (None, "scale"):
            figures["scale"] = run_scale(args, f"{tmp}/scale")
            print(json.dumps(figures["scale"], indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


# --- labels -------------------------------------------------------------------------------------------


def flipped_copy(source: str, target: str, share: float, seed: int = 0) -> set[str]:
    """EMBEDDINGS rewritten to `target` with a seeded share of the labels moved to another class; returns
    the paths flipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytl.files.embeddings import open_embeddings

    data = open_embeddings(source)
    classes = sorted(
        {label for f in data.files for label in pq.read_table(f, columns=["label"])["label"].to_pylist()}
    )
    rng = np.random.default_rng(seed)
    flipped: set[str] = set()
    os.makedirs(target)
    for number, file in enumerate(data.files):
        table = pq.read_table(file)
        labels = table["label"].to_pylist()
        for i, label in enumerate(labels):
            if rng.random() < share:
                others = [c for c in classes if c != label]
                labels[i] = others[int(rng.integers(len(others)))]
                flipped.add(table["path"][i].as_py())
        column = table.schema.get_field_index("label")
        table = table.set_column(column, table.schema.field("label"), pa.array(labels, pa.string()))
        pq.write_table(table, f"{target}/part-{number:05d}.parquet")
    return flipped


def scored(found: list[str], planted: set[str]) -> dict:
    hits = len(set(found) & planted)
    top = len(set(found[: len(planted)]) & planted)
    return {"flagged": len(found), "planted": len(planted), "found": hits,
            "precision": round(hits / max(1, len(found)), 3), "recall": round(hits / max(1, len(planted)), 3),
            "precision_of_top_planted": round(top / max(1, len(planted)), 3)}  # fmt: skip


def run_labels(args, tmp: str) -> dict:
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits
    from synthetic import write

    import raytl
    from raytl.commands.quickstart import IMAGE_PX, write_digits

    out: dict = {"flip": args.flip}
    write_digits(f"{tmp}/digits", f"{tmp}/new")
    start = time.perf_counter()
    raytl.extract(f"{tmp}/digits", f"{tmp}/emb", weights=args.weights, image_size=IMAGE_PX)
    out["extract_seconds"] = round(time.perf_counter() - start, 1)
    x, y = load_digits(return_X_y=True)
    write(f"{tmp}/pixels-clean", x.astype(np.float32), [str(v) for v in y], parts=4)
    for name, clean in (
        ("vgg16_pool5_random_weights", f"{tmp}/emb"),
        ("digit_pixels_64d", f"{tmp}/pixels-clean"),
    ):
        planted = flipped_copy(clean, f"{tmp}/{name}-flipped", args.flip)
        start = time.perf_counter()
        summary = raytl.audit(f"{tmp}/{name}-flipped", f"{tmp}/{name}-audit", checks="labels")
        seconds = round(time.perf_counter() - start, 1)
        found = pq.read_table(f"{tmp}/{name}-audit/label_issues.parquet")["path"].to_pylist()
        labels = summary["labels"]
        out[name] = {**scored(found, planted), "rows": labels["labelled"], "l2": labels["l2"],
                     "out_of_fold_accuracy": round(labels["out_of_fold_accuracy"], 4),
                     "audit_seconds": seconds}  # fmt: skip
    return out


# --- duplicates ---------------------------------------------------------------------------------------


def mosaic(rng: np.random.Generator, photos: list[np.ndarray], size: int = 224):
    """A 2x2 mosaic, each tile one of: a random crop (place, size, flip) of one of the photos, a smooth
    random pattern (tests/images.py's picture), or a digit in two random colours: distinct per draw."""
    from images import picture
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images
    half = size // 2
    canvas = Image.new("RGB", (size, size))
    for k in range(4):
        kind = int(rng.integers(3))
        if kind == 0:
            photo = photos[int(rng.integers(len(photos)))]
            h, w = photo.shape[:2]
            side = int(rng.integers(40, min(h, w) // 2))
            top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            tile = Image.fromarray(photo[top : top + side, left : left + side])
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif kind == 1:
            tile = picture(int(rng.integers(1 << 30)), 64, 64)
        else:
            ink, paper = rng.uniform(0, 255, (2, 3))
            alpha = (digits[int(rng.integers(len(digits)))] / 16.0)[..., None]
            tile = Image.fromarray((paper * (1 - alpha) + ink * alpha).astype(np.uint8))
        canvas.paste(tile.resize((half, half)), ((k % 2) * half, (k // 2) * half))
    return canvas


def copies(image, rng: np.random.Generator) -> dict[str, bytes]:
    """Three copies: resized to 50-80 %, JPEG at quality 60-95, cropped by 10 %."""
    from PIL import Image

    w, h = image.size
    scale = rng.uniform(0.5, 0.8)
    margin_w, margin_h = int(w * 0.05), int(h * 0.05)
    made = {
        "resized": image.resize((int(w * scale), int(h * scale)), Image.Resampling.BILINEAR),
        "jpeg": image,
        "cropped": image.crop((margin_w, margin_h, w - margin_w, h - margin_h)),
    }
    out = {}
    for kind, picture in made.items():
        sink = io.BytesIO()
        if kind == "jpeg":
            picture.save(sink, "JPEG", quality=int(rng.integers(60, 96)))
        else:
            picture.save(sink, "PNG")
        out[kind] = sink.getvalue()
    return out


def write_corpus(root: str, distinct: int, copied: int, seed: int = 0) -> None:
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/images")
    for i in range(distinct):
        image = mosaic(rng, photos)
        image.save(f"{root}/images/o{i:05d}.png")
        if i < copied:
            for kind, data in copies(image, rng).items():
                with open(f"{root}/images/c{i:05d}-{kind}.{'jpg' if kind == 'jpeg' else 'png'}", "wb") as f:
                    f.write(data)


def rates(x: np.ndarray, names: list[str], centred: bool) -> list[dict]:
    """Recall of (original, copy) pairs and the share of distinct images flagged, per threshold."""
    from raytl.modeling import audit

    mean = x.mean(axis=0) if centred else np.zeros(x.shape[1], np.float32)
    u = audit.unit(x, mean)
    stem = [n.rsplit("/", 1)[-1] for n in names]
    original = {s[1:6]: i for i, s in enumerate(stem) if s.startswith("o")}
    pairs = [
        (original[s[1:6]], i, s.split("-")[1].split(".")[0]) for i, s in enumerate(stem) if s.startswith("c")
    ]
    distinct = np.array(sorted(original.values()))
    sims = u[distinct] @ u[distinct].T
    np.fill_diagonal(sims, -1.0)
    nearest_distinct = sims.max(axis=1)
    pair_sims = np.array([float(u[a] @ u[b]) for a, b, _ in pairs])
    kinds = np.array([k for _, _, k in pairs])
    rows = []
    for t in THRESHOLDS:
        row = {"threshold": t, "recall": round(float((pair_sims >= t).mean()), 4),
               "distinct_flagged": round(float((nearest_distinct >= t).mean()), 4)}  # fmt: skip
        for kind in ("resized", "jpeg", "cropped"):
            row[f"recall_{kind}"] = round(float((pair_sims[kinds == kind] >= t).mean()), 4)
        rows.append(row)
    return rows


def run_duplicates(args, tmp: str) -> dict:
    import pyarrow.parquet as pq

    import raytl
    from raytl.files.embeddings import matrix, open_embeddings

    out: dict = {"distinct": args.distinct, "copies": 3 * args.copied, "image_size": args.image_size,
                 "weights": args.weights}  # fmt: skip
    start = time.perf_counter()
    write_corpus(tmp, args.distinct, args.copied)
    out["write_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    manifest = f"{tmp}/manifest.csv"
    files = sorted(os.listdir(f"{tmp}/images"))
    with open(manifest, "w") as f:
        f.write("path,label\n" + "".join(f"images/{n},x\n" for n in files))
    raytl.extract(None, f"{tmp}/emb", manifest=manifest, weights=args.weights, image_size=args.image_size)
    out["extract_seconds"] = round(time.perf_counter() - start, 1)
    data = open_embeddings(f"{tmp}/emb")
    table = pq.read_table(data.files)
    x, names = matrix(table["embedding"], data.dim), table["path"].to_pylist()
    out["centred"] = rates(x, names, centred=True)
    out["raw"] = rates(x, names, centred=False)
    fine = [r for r in out["centred"] if r["distinct_flagged"] <= 0.01]
    chosen = fine[0]["threshold"] if fine else THRESHOLDS[-1]
    out["chosen_threshold"] = chosen
    out["at_chosen"] = next(r for r in out["centred"] if r["threshold"] == chosen)
    start = time.perf_counter()
    summary = raytl.audit(f"{tmp}/emb", f"{tmp}/audit", checks="duplicates", threshold=chosen)
    out["audit_seconds"] = round(time.perf_counter() - start, 1)
    groups = pq.read_table(f"{tmp}/audit/duplicates.parquet").to_pylist()
    group_of = {r["path"].rsplit("/", 1)[-1]: r["group"] for r in groups}
    copies_found = sum(
        1 for n in files if n.startswith("c") and group_of.get(n) is not None
        and group_of.get(n) == group_of.get(f"o{n[1:6]}.png")
    )  # fmt: skip
    distinct_grouped = sum(
        1 for n in files if n.startswith("o") and int(n[1:6]) >= args.copied and n in group_of
    )
    out["audit"] = {"groups": summary["duplicates"]["groups"], "copies_grouped_with_original": copies_found,
                    "copies": 3 * args.copied, "uncopied_distinct_in_a_group": distinct_grouped,
                    "uncopied_distinct": args.distinct - args.copied}  # fmt: skip
    return out


# --- scale --------------------------------------------------------------------------------------------


def run_scale(args, tmp: str) -> dict:
    import pyarrow.parquet as pq
    from synthetic import write

    import raytl

    rows, dim, planted = args.scale_rows, 512, 1000
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (200, dim)).astype(np.float32)
    start = time.perf_counter()
    copies_of = rng.choice(rows - planted, planted, replace=False)
    kept = {}
    for part in range(0, rows, 50_000):
        n = min(50_000, rows - part)
        x = centres[rng.integers(0, 200, n)] + rng.normal(0, 1.0, (n, dim)).astype(np.float32)
        for i in copies_of[(copies_of >= part) & (copies_of < part + n)]:
            kept[int(i)] = x[i - part].copy()
        if part + n == rows:  # the last part ends with the planted copies
            for j, i in enumerate(copies_of):
                x[n - planted + j] = kept[int(i)] * (1 + rng.normal(0, 0.01, dim)).astype(np.float32)
        write(f"{tmp}/emb", x, [None] * n, parts=1, prefix=f"r{part:07d}")
    out: dict = {"rows": rows, "dim": dim, "planted_pairs": planted,
                 "write_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    start = time.perf_counter()
    summary = raytl.audit(f"{tmp}/emb", f"{tmp}/audit", checks="duplicates")
    out["audit_seconds"] = round(time.perf_counter() - start, 1)
    out["cells"] = summary["duplicates"]["cells"]
    out["groups"] = summary["duplicates"]["groups"]
    groups = pq.read_table(f"{tmp}/audit/duplicates.parquet").to_pylist()
    group_of = {r["path"]: r["group"] for r in groups}
    last = (rows - 1) // 50_000 * 50_000
    path = "s3://corpus/r{:07d}-{:05d}.jpg".format
    found = sum(
        1 for j, i in enumerate(copies_of)
        if group_of.get(path(int(i) // 50_000 * 50_000, int(i) % 50_000)) is not None
        and group_of.get(path(int(i) // 50_000 * 50_000, int(i) % 50_000))
        == group_of.get(path(last, rows - last - planted + j))
    )  # fmt: skip
    out["planted_pairs_found"] = found
    return out


if __name__ == "__main__":
    main()
