"""`raytl inspect OUTPUT`: what a raytl output holds, read from Parquet footers and a few columns (no Ray):
an embeddings or predictions dataset (rows, dimension, model metadata, label counts, errors) or a model."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from raytl.errors import StorageError
from raytl.files import storage, writer
from raytl.files.embeddings import backbone_label
from raytl.modeling.model_dir import METRICS_FILE, MODEL_JSON, ModelInfo, classes_of

_TOP = 20  # label counts and error reasons listed


def run(uri: str) -> dict[str, Any]:
    """A JSON-ready description of OUTPUT; raises StorageError when it holds no raytl output."""
    with storage.guarded(f"read {uri}"):
        return _describe(uri)


def _describe(uri: str) -> dict[str, Any]:
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise StorageError(f"OUTPUT {storage.redact(uri)} does not exist.")
    if fs.exists(f"{root}/{MODEL_JSON}"):
        return _model(uri)
    parts = sorted(p for p in fs.ls(root, detail=False) if _is_part(p))
    if not parts:
        raise StorageError(
            f"{storage.redact(uri)} holds no raytl output (no part-*.parquet files and no {MODEL_JSON})."
        )
    schema = _schema(fs, parts[0])
    meta = json.loads(schema.metadata.get(writer.METADATA_KEY, b"{}")) if schema.metadata else {}
    kind = "predictions" if "predicted_label" in schema.names else "embeddings"
    label_column = "predicted_label" if kind == "predictions" else "label"
    counts: Counter[str] = Counter()
    rows = 0
    for part in parts:
        with fs.open(part, "rb") as f:
            column = pq.read_table(f, columns=[label_column])[label_column]
        rows += len(column)
        counts.update("(none)" if v is None else v for v in column.to_pylist())
    found: dict[str, Any] = {
        "kind": kind,
        "output": storage.redact(uri),
        "rows": rows,
        "part_files": len(parts),
        "columns": {f.name: str(f.type) for f in schema},
        "metadata": meta,
        f"{label_column}_counts": dict(counts.most_common(_TOP)),
        "distinct_labels": len(counts),
        "errors": _errors(fs, f"{root}/{writer.ERRORS_DIR}"),
    }
    if kind == "embeddings":
        found["dim"] = meta.get("dim")
    for name in (writer.SUMMARY_FILE, "_run.json"):
        if fs.exists(f"{root}/{name}"):
            found[name.strip("_").removesuffix(".json")] = json.loads(fs.cat_file(f"{root}/{name}"))
    found["finished"] = fs.exists(f"{root}/{writer.SUMMARY_FILE}")
    return found


def _model(uri: str) -> dict[str, Any]:
    info = storage.read_json(storage.join(uri, MODEL_JSON))
    found: dict[str, Any] = {"kind": "model", "model_dir": storage.redact(uri), "model": info}
    try:
        metrics = storage.read_json(storage.join(uri, METRICS_FILE))
    except FileNotFoundError:
        return found
    found["metrics"] = {
        k: metrics.get(k) for k in ("accuracy", "macro_f1", "best_epoch", "train_samples", "val_samples")
    }
    found["per_class"] = {
        c: {"precision": m["precision"], "recall": m["recall"], "images": m["support"]}
        for c, m in metrics["per_class"].items()
    }
    return found


def _errors(fs: Any, folder: str) -> dict[str, Any]:
    """How many files failed, and the most common reasons (the text before the first colon)."""
    if not fs.exists(folder):
        return {"failed": 0, "reasons": {}}
    reasons: Counter[str] = Counter()
    for part in sorted(p for p in fs.find(folder) if _is_part(p)):
        with fs.open(part, "rb") as f:
            reasons.update(
                str(e).split(":", 1)[0] for e in pq.read_table(f, columns=["error"])["error"].to_pylist()
            )
    return {"failed": sum(reasons.values()), "reasons": dict(reasons.most_common(_TOP))}


def _schema(fs: Any, part: str) -> Any:
    with fs.open(part, "rb") as f:
        return pq.read_schema(f)


def _is_part(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith("part-") and name.endswith(".parquet")


def text(found: dict[str, Any]) -> str:
    """The description as a few readable lines."""
    if found["kind"] == "model":
        where = f"MODEL_DIR {found['model_dir']}"
        info, classes = ModelInfo.parse(found["model"], where), classes_of(found["model"], where)
        backbone, lines = info.backbone, [f"model       {found['model_dir']}"]
        lines.append(f"kind        {info.kind} · head {info.head} · {len(classes)} classes")
        lines.append(
            f"backbone    {backbone_label(info.recorded_backbone)}, D={backbone.dim}, "
            f"{backbone.image_size} px, weights {backbone.weights}"
        )
        if "metrics" in found:
            m = found["metrics"]
            lines.append(f"validation  accuracy {m['accuracy']:.4f} · macro F1 {m['macro_f1']:.4f}")
            for c, v in found["per_class"].items():
                recall = f"recall {v['recall']:.3f}"
                lines.append(f"  {c:<20} precision {v['precision']:.3f} · {recall} · {v['images']} images")
        return "\n".join(lines)
    meta = found["metadata"]
    lines = [
        f"{found['kind']:<11} {found['output']}",
        f"rows        {found['rows']:,} in {found['part_files']} part files"
        + ("" if found["finished"] else " (no _summary.json: unfinished or interrupted)"),
    ]
    if found["kind"] == "embeddings":
        lines.append(
            f"embedding   D={found['dim']} · {backbone_label(meta)} · "
            f"{meta.get('image_size')} px · {meta.get('precision')} · weights {meta.get('weights')}"
        )
    else:
        lines.append(f"model       {meta.get('model_dir')} · head {meta.get('head')}")
    key = "predicted_label_counts" if found["kind"] == "predictions" else "label_counts"
    counts = ", ".join(f"{k} {v:,}" for k, v in found[key].items())
    name = "predicted" if found["kind"] == "predictions" else "labels"
    lines.append(f"{name:<11} {found['distinct_labels']} distinct: {counts}")
    errors = found["errors"]
    reasons = ", ".join(f"{k} ({v:,})" for k, v in errors["reasons"].items())
    lines.append(f"errors      {errors['failed']:,}" + (f": {reasons}" if reasons else ""))
    if "summary" in found:
        s = found["summary"]
        lines.append(f"last run    {s.get('images_per_second')} images/s over {s.get('wall_seconds')} s")
    return "\n".join(lines)
