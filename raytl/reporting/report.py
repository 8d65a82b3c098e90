"""`raytl report MODEL_DIR`: one self-contained HTML page, and PNG files, on how good a model is and where
it errs: confusion matrix, per-class precision and recall, training curves, a PCA of validation
embeddings and the misclassified validation images."""

from __future__ import annotations

import base64
import html
import io
import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.corpus import shards
from raytl.errors import StorageError
from raytl.files import storage
from raytl.files.embeddings import backbone_label
from raytl.modeling.model_dir import (
    FIGURES_DIR,
    METRICS_FILE,
    MODEL_JSON,
    REPORT_FILE,
    VALIDATION_FILE,
    ModelInfo,
    named,
    read_files,
)

log = logging.getLogger(__name__)

SAMPLE_ROWS = 2000
_PER_BATCH = (256, 256)  # at most this many misclassified and correct rows from each evaluated batch
_GRID = 24  # misclassified images shown
_THUMB = 112  # their size in pixels

SAMPLE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("predicted_label", pa.string()),
        ("score", pa.float32()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


# --- the validation sample, gathered while train and finetune evaluate --------------------------------------


def batch_sample(
    paths: Sequence[str] | np.ndarray,
    labels: Sequence[str],
    predicted: Sequence[str],
    scores: Any,
    embeddings: Any,
) -> bytes:
    """Misclassified rows first, then some correct ones, of one evaluated batch (pickled for Ray Data)."""
    wrong = [i for i, (t, p) in enumerate(zip(labels, predicted, strict=True)) if t != p][: _PER_BATCH[0]]
    right = [i for i, (t, p) in enumerate(zip(labels, predicted, strict=True)) if t == p]
    if len(right) > _PER_BATCH[1]:  # evenly spread: batches often come sorted by class
        right = [right[int(k)] for k in np.linspace(0, len(right) - 1, _PER_BATCH[1])]
    rows = wrong + right
    vectors = np.array([np.asarray(embeddings[i], np.float32) for i in rows], np.float32)
    # The embeddings as extract writes them (fixed_size_list<float>[D]); SAMPLE_SCHEMA's list<float> is the
    # type of an empty sample and of files from older raytl releases, which read the same.
    embedding = (
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        if rows
        else pa.array([], pa.list_(pa.float32()))
    )
    table = pa.table(
        [
            pa.array([str(paths[i]) for i in rows], pa.string()),
            pa.array([str(labels[i]) for i in rows], pa.string()),
            pa.array([str(predicted[i]) for i in rows], pa.string()),
            pa.array(np.asarray(scores, np.float32)[rows] if rows else [], pa.float32()),
            embedding,
        ],
        names=SAMPLE_SCHEMA.names,
    )
    return pickle.dumps(table)


class Sampler:
    """Keeps the batch samples until SAMPLE_ROWS rows, misclassified rows first."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def add(self, pickled: Any) -> None:
        for blob in np.atleast_1d(pickled):
            table = pickle.loads(blob)
            if table.num_rows:  # an empty one has no dimension to its embedding type
                self.tables.append(table)

    def table(self) -> pa.Table:
        table = pa.concat_tables(self.tables) if self.tables else SAMPLE_SCHEMA.empty_table()
        pairs = zip(table["label"].to_pylist(), table["predicted_label"].to_pylist(), strict=True)
        wrong = np.array([t != p for t, p in pairs], bool)
        order = np.concatenate([np.flatnonzero(wrong), np.flatnonzero(~wrong)])[:SAMPLE_ROWS]
        return table.take(pa.array(order, pa.int64()))


def write_validation(model_dir: str, sample: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(sample, sink)
    storage.write_bytes(storage.join(model_dir, VALIDATION_FILE), sink.getvalue())


# --- the page --------------------------------------------------------------------------------------------


def write(model_dir: str) -> str:
    """Draw the figures from MODEL_DIR's metrics and validation sample; write the page and the PNG files."""
    raw, metrics = read_files(model_dir, MODEL_JSON, METRICS_FILE, finished=True)
    info = ModelInfo.parse(raw, named(model_dir))
    sample = _read_sample(model_dir)
    import matplotlib

    # Class names are text, never maths: `$\\foo$` or `price_$10_$20` must not reach mathtext's parser.
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        figures = {
            "confusion": ("Confusion matrix", confusion_figure(metrics)),
            "per_class": ("Per-class precision and recall", per_class_figure(metrics)),
            "curves": ("Training curves", curves_figure(metrics.get("history") or [])),
            "pca": ("Validation embeddings, first two principal components", pca_figure(sample)),
            "misclassified": (
                "Misclassified validation images",
                misclassified_figure(sample, image_schemes(info, model_dir)),
            ),
        }
    for name, (_, png) in figures.items():
        storage.write_bytes(storage.join(model_dir, FIGURES_DIR, f"{name}.png"), png)
    page = storage.join(model_dir, REPORT_FILE)
    storage.write_bytes(page, _html(model_dir, metrics, info, sample, figures).encode())
    return page


def write_quietly(model_dir: str) -> str | None:
    """`write`, at the end of train and finetune: a report that cannot be drawn costs a warning, not the
    model (`raytl report MODEL_DIR` draws it again)."""
    try:
        page = write(model_dir)
    except Exception as exc:
        log.warning("the report was not written: %s", storage.describe_error(exc))
        return None
    log.info("report: %s", storage.redact(page))
    return page


def _read_sample(model_dir: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(model_dir, VALIDATION_FILE))))
    except FileNotFoundError:  # a model from an older raytl: the figures that need it say so
        return SAMPLE_SCHEMA.empty_table()


# Closes every page: how many figures it holds and drew (the report test reads both in headless Chromium).
FIGURES_SCRIPT = """<script>
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("img.figure")];
  document.body.dataset.figures = figures.length;
  document.body.dataset.figuresDrawn = figures.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""


def page_head(title: str) -> str:
    """The start of raytl's self-contained pages, up to an open <style> (a page adds its own rules)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 980px; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0 1.5rem; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .25rem .8rem; text-align: right; }}
img.figure {{ max-width: 100%; border: 1px solid #eee; }}"""


def _html(model_dir: str, metrics: dict, info: ModelInfo, sample: pa.Table, figures: dict) -> str:
    classes = metrics["classes"]
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for c, m in ((c, metrics["per_class"][c]) for c in classes)
    )
    backbone = info.backbone
    facts = [
        ("accuracy", f"{metrics['accuracy']:.4f}"),
        ("macro F1", f"{metrics['macro_f1']:.4f}"),
        ("validation images", str(metrics["samples"])),
        ("classes", str(len(classes))),
        ("model", f"{info.kind} · head {info.head} · {info.backend}"),
        ("backbone", f"{backbone_label(info.recorded_backbone)}, {backbone.image_size} px, "
                     f"weights {backbone.weights}"),
        ("best epoch", str(metrics.get("best_epoch", "-"))),
    ]  # fmt: skip
    if info.l2 is not None:
        swept = metrics.get("l2_sweep")
        chosen = f", chosen by --l2 auto from {len(swept)} values" if swept else ""
        facts.append(("L2 penalty", f"{info.l2:.3g}{chosen}"))
    sections = "".join(
        f'<section><h2>{html.escape(title)}</h2><img class="figure" alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></section>'
        for title, png in figures.values()
    )
    where = html.escape(storage.redact(model_dir))
    return f"""{page_head(f"raytl report: {where}")}
td:first-child, th:first-child {{ text-align: left; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }}
dt {{ color: #666; }}
</style></head>
<body>
<h1>raytl report</h1>
<p>{where}</p>
<dl>{"".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)}</dl>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>{per_class}</table>
{sections}
<p>Figures drawn from metrics.json and a sample of {sample.num_rows} validation rows ({VALIDATION_FILE}).
The PNG files are in {FIGURES_DIR}/.</p>
{FIGURES_SCRIPT}
</body></html>
"""


# --- figures (matplotlib, drawn off-screen) -------------------------------------------------------------


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _message(text: str) -> bytes:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 1.2))
    axes.axis("off")
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#555")
    return figure_png(figure)


def confusion_figure(metrics: dict) -> bytes:
    """Counts, coloured by the share of each true class (row)."""
    plt = pyplot()
    matrix = np.array(metrics["confusion_matrix"], dtype=np.int64)
    classes = metrics["classes"]
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(14.0, 2.5 + 0.45 * len(classes))
    figure, axes = plt.subplots(figsize=(side, side * 0.85))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            axes.text(j, i, str(count), ha="center", va="center", fontsize=8,
                      color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    return figure_png(figure)


def per_class_figure(metrics: dict) -> bytes:
    plt = pyplot()
    classes = metrics["classes"]
    x = np.arange(len(classes))
    figure, axes = plt.subplots(figsize=(min(14.0, 3 + 0.5 * len(classes)), 3.6))
    per_class = [metrics["per_class"][c] for c in classes]
    axes.bar(x - 0.2, [m["precision"] for m in per_class], 0.4, label="precision", color="#4c72b0")
    axes.bar(x + 0.2, [m["recall"] for m in per_class], 0.4, label="recall", color="#dd8452")
    axes.set_xticks(
        x, classes, rotation=60 if len(classes) > 8 else 0, ha="right" if len(classes) > 8 else "center"
    )
    axes.set_ylim(0, 1.05)
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    return figure_png(figure)


def curves_figure(history: list[dict]) -> bytes:
    """Loss and accuracy per epoch, training and validation."""
    if not history:
        return _message("no training curve: scikit-learn fitted this model in one call")
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axes, key in ((loss, "loss"), (accuracy, "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                axes.plot(epochs, values, style, markersize=3, label=split)
        axes.set_xlabel("epoch")
        axes.set_title(key)
        axes.grid(alpha=0.3)
        axes.legend()
    return figure_png(figure)


def pca_figure(sample: pa.Table) -> bytes:
    """The validation sample's embeddings (standardised) on their first two principal components."""
    if sample.num_rows < 3:
        return _message("too few validation rows for a projection")
    plt = pyplot()
    x = np.stack([np.asarray(e, np.float32) for e in sample["embedding"].to_pylist()])
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    points = x @ vt[:2].T
    explained = singular[:2] ** 2 / max(float((singular**2).sum()), 1e-12)
    labels = np.array(sample["label"].to_pylist())
    wrong = labels != np.array(sample["predicted_label"].to_pylist())
    figure, axes = plt.subplots(figsize=(7, 5.5))
    colours = plt.get_cmap("tab20" if len(set(labels)) > 10 else "tab10")
    for k, label in enumerate(sorted(set(labels))):
        mask = labels == label
        axes.scatter(
            points[mask & ~wrong, 0], points[mask & ~wrong, 1], s=10, color=colours(k % 20), label=label
        )
        axes.scatter(
            points[mask & wrong, 0], points[mask & wrong, 1], s=28, color=colours(k % 20), marker="x"
        )
    axes.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    axes.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    axes.set_title("coloured by true class; x = misclassified", fontsize=9)
    if len(set(labels)) <= 20:
        axes.legend(fontsize=7, markerscale=1.5, loc="best")
    return figure_png(figure)


def image_schemes(info: ModelInfo, model_dir: str) -> tuple[str, ...]:
    """The filesystems the report reads images from: those the images' SOURCE (or manifest) and its
    --allow-schemes allowed, as recorded with the embeddings (`schemes` in their metadata, copied into
    model.json); for a MODEL_DIR from before that record, MODEL_DIR's own."""
    if info.backbone.schemes is not None:
        return info.backbone.schemes
    return (storage.scheme_of(model_dir),)


def misclassified_figure(sample: pa.Table, schemes: Sequence[str] = ("file",)) -> bytes:
    """Up to _GRID misclassified validation images, each titled true -> predicted (score); only images on
    the filesystems `schemes` are read."""
    rows = [r for r in sample.select(["path", "label", "predicted_label", "score"]).to_pylist()
            if r["label"] != r["predicted_label"]][:_GRID]  # fmt: skip
    if not rows:
        return _message("no misclassified images in the validation sample")
    plt = pyplot()
    images = thumbnails([r["path"] for r in rows], schemes)
    columns = min(6, len(rows))
    lines = -(-len(rows) // columns)
    figure, grid = plt.subplots(lines, columns, figsize=(2.1 * columns, 2.4 * lines), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, row, image in zip(grid.flat, rows, images, strict=False):
        if image is None:
            axes.text(0.5, 0.5, "image not\nreachable", ha="center", va="center", fontsize=8, color="#999")
        else:
            axes.imshow(image)
        axes.set_title(f"{row['label']} → {row['predicted_label']}\n({row['score']:.2f})", fontsize=8)
    return figure_png(figure)


def thumbnails(paths: list[str], schemes: Sequence[str]) -> list[np.ndarray | None]:
    """Small RGB pictures of the images at paths (loose files, zip members, SHARD#KEY samples); None for
    those that cannot be read, and for those the rules of a manifest refuse (`readable`): a sample's paths
    come from embeddings or a MODEL_DIR made elsewhere. Decoded under extract's bomb guard."""
    from raytl.vision.preprocess import Transform

    decode = Transform().decode  # extract's default --max-pixels, checked before any pixel is decoded
    paths = [p if readable(p, schemes) else "" for p in paths]
    data: dict[str, bytes] = {}
    loose = [p for p in paths if p and shards.sample_of(p) is None]
    try:
        fetched = storage.fetch_many(loose)
    except StorageError as exc:  # no access to the images: the grid says so
        log.warning("report: %s", exc)
        fetched = []
    for path, got in zip(loose, fetched, strict=False):
        if isinstance(got, bytes):
            data[path] = got
    wanted: dict[str, set[str]] = {}
    for shard, key in filter(None, map(shards.sample_of, filter(None, paths))):
        wanted.setdefault(shard, set()).add(key)
    for shard, keys in wanted.items():
        try:
            for found, members in shards.samples(shard):
                if found is not None and found in keys:
                    image = next((members[e] for e in shards.IMAGE_EXTENSIONS if e in members), None)
                    if image is not None:
                        data[f"{shard}#{found}"] = image
                    keys.discard(found)
                if not keys:
                    break
        except StorageError as exc:
            log.warning("report: %s", exc)
    out: list[np.ndarray | None] = []
    for path in paths:
        try:
            picture = decode(data[path])
            picture.thumbnail((_THUMB, _THUMB))
            out.append(np.asarray(picture))
        except Exception:  # refused, missing, moved, undecodable or a bomb: the grid says so
            out.append(None)
    return out


def readable(path: str, schemes: Sequence[str]) -> bool:
    """Whether the report may read path: a manifest's rules (storage.check_chain; a filesystem in schemes)."""
    sample = shards.sample_of(path)
    where = sample[0] if sample is not None else path
    try:
        storage.check_chain(where, where)
    except StorageError:
        return False
    return storage.scheme_of(where) in schemes
