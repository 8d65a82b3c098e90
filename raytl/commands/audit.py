"""`raytl audit`: what is wrong with a labelled embeddings dataset. Label issues: K-fold out-of-fold
probabilities of the linear probe (each fold a Ray task, or a Ray Train run when the labels are many), then
confident learning (cleanlab). Near-duplicates: the normalised embeddings partitioned into cells (k-means of
a seeded sample) and searched exactly within each cell, in Ray tasks over the part files and over buckets of
cells (the driver holds the sample and the pairs found, never the rows). Leakage: the validation rows with a
near-duplicate in training, and the probe's validation accuracy with and without them. OUT gets Parquet
tables, audit.json and audit.html."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raytl.cluster import probing, session
from raytl.config import AuditConfig, Backend, Check, ProbeHead
from raytl.errors import ConfigError, DatasetError
from raytl.files import storage
from raytl.files.embeddings import Embeddings, check_same_backbone, matrix, open_embeddings
from raytl.files.output import check_apart, check_unheld
from raytl.modeling import audit, model_dir, select, split
from raytl.reporting import audit as pages
from raytl.version import VERSION

log = logging.getLogger(__name__)

AUDIT_JSON, AUDIT_HTML = "audit.json", "audit.html"
LABEL_ISSUES, DUPLICATES, LEAKAGE = "label_issues.parquet", "duplicates.parquet", "leakage.parquet"
# Up to this many labelled rows the folds are fitted with scikit-learn, one Ray task each, on rows held in
# the object store; beyond, each fold is a Ray Train run (train --backend ray) streaming from storage.
SKLEARN_MAX_ROWS = 200_000
_BUCKET_BYTES = 256 * 1024**2  # the rows one near-duplicate search task holds, about
TRAIN, VAL, UNLABELLED = "train", "val", "unlabelled"

LABEL_ISSUES_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("suggested_label", pa.string()),
     ("self_confidence", pa.float64()), ("rank", pa.int64())]
)  # fmt: skip
DUPLICATES_SCHEMA = pa.schema(
    [("group", pa.int64()), ("path", pa.string()), ("label", pa.string()), ("split", pa.string()),
     ("similarity", pa.float64()), ("size", pa.int64()), ("crosses_splits", pa.bool_()),
     ("mixed_labels", pa.bool_()), ("keep", pa.bool_())]
)  # fmt: skip
LEAKAGE_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("duplicate", pa.string()),
     ("duplicate_label", pa.string()), ("similarity", pa.float64())]
)  # fmt: skip


def run(config: AuditConfig) -> dict[str, Any]:
    """Check inputs, run the checks, write OUT; returns the summary (audit.json's content)."""
    data = open_embeddings(config.embeddings)
    val = open_embeddings(config.val, "--val") if config.val else None
    if val is not None:
        check_same_backbone(data.metadata, val, "--val")
    for what, held in (("EMBEDDINGS", data), ("--val", val)):
        if held is not None and held.rows == 0:
            raise DatasetError(f"{what} {storage.redact(held.uri)} has no rows.")
    check_apart(config.output, {"EMBEDDINGS": config.embeddings, "--val": config.val})
    check_unheld(config.output, AUDIT_JSON, "an audit", config.overwrite)
    session.init_ray()
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "embeddings": storage.redact(config.embeddings),
        "val": storage.redact(config.val) if config.val else None,
        "rows": data.rows + (val.rows if val else 0),
        "checks": [str(c) for c in config.checks],
        "seed": config.seed,
    }
    plan = labels_plan(config, data, val)
    needing = [name for check, name in ((Check.LABELS, "label issues"), (Check.LEAKAGE, "leakage"))
               if check in config.checks]  # fmt: skip
    if plan is None and needing:
        raise DatasetError(
            f"EMBEDDINGS {storage.redact(config.embeddings)} has no labelled rows: {' and '.join(needing)} "
            "need labels (give --checks duplicates for the rest)."
        )
    tables: dict[str, pa.Table] = {}
    if Check.LABELS in config.checks:
        assert plan is not None
        started = time.perf_counter()
        tables[LABEL_ISSUES], result["labels"] = label_issues(config, data, plan)
        seconds["labels"] = time.perf_counter() - started
    if Check.DUPLICATES in config.checks or Check.LEAKAGE in config.checks:
        started = time.perf_counter()
        found = near_duplicates(config, data, val, plan)
        tables[DUPLICATES], result["duplicates"] = duplicate_table(found, config.threshold)
        seconds["duplicates"] = time.perf_counter() - started
        if Check.LEAKAGE in config.checks:
            assert plan is not None
            started = time.perf_counter()
            tables[LEAKAGE], result["leakage"] = leakage(config, data, val, plan, found)
            seconds["leakage"] = time.perf_counter() - started
        if Check.DUPLICATES not in config.checks:
            del tables[DUPLICATES], result["duplicates"]
    result["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    result["raytl_version"] = VERSION
    write(config, data, result, tables)
    return result


def labels_plan(config: AuditConfig, data: Embeddings, val: Embeddings | None) -> probing.Plan | None:
    """train's split of the labelled rows (classes, per-side counts); None when no row has a label. For
    duplicates alone the split only names each row's side (`split`), so labels train would refuse (one
    class, a class too small to split) leave every labelled row on the training side instead."""
    if not probing.count_labels(data, config.seed, "EMBEDDINGS", labelled_only=True):
        return None
    probe = config.probe(config.output, Backend.SKLEARN)
    if Check.LABELS in config.checks or Check.LEAKAGE in config.checks:
        return probing.plan_split(probe, data, val, labelled_only=True)
    try:
        return probing.plan_split(probe, data, val, labelled_only=True)
    except (ConfigError, DatasetError):
        return None


# --- label issues ---------------------------------------------------------------------------------------


def label_issues(config: AuditConfig, data: Embeddings, plan: probing.Plan) -> tuple[pa.Table, dict]:
    """Every labelled row of EMBEDDINGS scored by a probe that did not see it; cleanlab's flagged rows."""
    labelled = sum(plan.train_counts.values()) + (0 if config.val else sum(plan.val_counts.values()))
    whole = probing.Plan(plan.classes, None, plan.train_counts, plan.val_counts)
    rows = probing.xy(data, whole, None, side="all")
    sweep: list[dict[str, float]] = []
    if labelled <= SKLEARN_MAX_ROWS:
        paths, y, probs, sweep = folds_in_tasks(config, rows, plan.classes, data)
    else:
        paths, y, probs = folds_on_ray_train(config, rows, plan.classes, data)
    found = audit.label_issues(y, probs, str(config.filter_by))
    classes = np.array(plan.classes, dtype=object)
    table = pa.table(
        {
            "path": pa.array(paths[found.rows].tolist(), pa.string()),
            "label": pa.array(classes[found.given].tolist(), pa.string()),
            "suggested_label": pa.array(classes[found.suggested].tolist(), pa.string()),
            "self_confidence": pa.array(found.self_confidence, pa.float64()),
            "rank": pa.array(np.arange(1, len(found.rows) + 1), pa.int64()),
        },
        schema=LABEL_ISSUES_SCHEMA,
    )
    accuracy = float((probs.argmax(axis=1) == y).mean())
    chosen = min(sweep, key=lambda s: s["log_loss"]) if sweep else None
    l2 = config.l2 if config.l2 is not None else f"{chosen['l2_times_n'] if chosen else 1:g}/n"
    summary = {"labelled": len(y), "issues": table.num_rows, "folds": config.folds, "l2": l2,
               "filter_by": str(config.filter_by), "out_of_fold_accuracy": accuracy,
               "out_of_fold_log_loss": audit.log_loss(y, probs)}  # fmt: skip
    return table, {**summary, **({"l2_sweep": sweep} if sweep else {})}


def gather_rows(rows: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, path) of every row, on the driver (up to SKLEARN_MAX_ROWS rows)."""
    xs, ys, ps = [], [], []
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        xs.append(batch["x"])
        ys.append(batch["y"])
        ps.append(batch["path"])
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.concatenate(ps).astype(object)


def fit_fold(
    x: np.ndarray, y: np.ndarray, fold: np.ndarray, f: int, classes: list[str], config: AuditConfig,
    info: model_dir.ModelInfo, l2_times_n: float | None,
) -> np.ndarray:  # fmt: skip
    """Fold f's out-of-fold probabilities: train's scikit-learn logistic regression on the other folds,
    with --l2, or l2_times_n / n_train."""
    from raytl.modeling.probe import fit_sklearn

    inside = fold == f
    present = np.unique(y[~inside])
    if len(present) < 2:
        raise DatasetError(
            f"fold {f} of --folds {config.folds} trains on rows of one class only: label issues need more "
            "labelled rows per class, or fewer --folds."
        )
    index = np.full(len(classes), -1)
    index[present] = np.arange(len(present))
    probe = config.probe(config.output, Backend.SKLEARN)
    model = fit_sklearn(
        x[~inside],
        index[y[~inside]],
        [classes[c] for c in present],
        probe_logreg(probe),
        probe.l2 if isinstance(probe.l2, float) else (l2_times_n or 1.0) / int((~inside).sum()),
        info,
    )
    return audit.spread(select.probabilities(model.logits(x[inside])), present, len(classes))


def probe_logreg(probe: Any) -> Any:
    """Label issues need probabilities: the probe's options with logistic regression as its head."""
    from dataclasses import replace

    return replace(probe, head=ProbeHead.LOGREG)


def folds_in_tasks(
    config: AuditConfig, rows: ray.data.Dataset, classes: list[str], data: Embeddings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
    """(paths, labels, out-of-fold probabilities, the l2 sweep): one Ray task a fold and penalty, the rows
    in the object store once. Without --l2 the penalty is chosen from audit.L2_TIMES_N (times 1/n) by the
    out-of-fold log loss: confident learning needs calibrated probabilities, and a probe fitted with
    train's default (1/n) on few rows of many dimensions is overconfident."""
    x, y, paths = gather_rows(rows)
    fold = audit.folds(paths.tolist(), config.seed, config.folds)
    info = probe_info(data)
    task = ray.remote(num_cpus=1)(fit_fold)
    xr, yr, fr = ray.put(x), ray.put(y), ray.put(fold)
    grid: tuple[float | None, ...] = (None,) if config.l2 is not None else audit.L2_TIMES_N
    refs = {
        (s, f): task.remote(xr, yr, fr, f, classes, config, info, s)
        for s in grid
        for f in range(config.folds)
    }
    best: tuple[float, np.ndarray] | None = None
    sweep = []
    for s in grid:
        probs = np.zeros((len(y), len(classes)))
        for f in range(config.folds):
            probs[fold == f] = ray.get(refs[(s, f)])
        loss = audit.log_loss(y, probs)
        if s is not None:
            sweep.append({"l2_times_n": s, "log_loss": round(loss, 6)})
        if best is None or loss < best[0]:
            best = (loss, probs)
    assert best is not None
    return paths, y, best[1], sweep


def probe_info(data: Embeddings) -> model_dir.ModelInfo:
    return model_dir.info_of(data.metadata, kind="probe", head="logreg", kernel="linear", backend="sklearn",
                             embeddings=storage.redact(data.uri), raytl_version=VERSION)  # fmt: skip


def in_fold(batch: dict[str, np.ndarray], seed: int, k: int, f: int, inside: bool) -> dict[str, np.ndarray]:
    keep = (audit.folds(batch["path"].tolist(), seed, k) == f) == inside
    return {name: column[keep] for name, column in batch.items()}


def folds_on_ray_train(
    config: AuditConfig, rows: ray.data.Dataset, classes: list[str], data: Embeddings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, out-of-fold probabilities): each fold a Ray Train fit of the logistic regression
    on the other folds (its checkpoints in OUT/_folds, removed after), then scored on its own rows."""
    scratch = storage.join(config.output, "_folds")
    info = probe_info(data)
    paths, ys, probs = [], [], []
    for f in range(config.folds):
        side = {
            inside: rows.map_batches(
                in_fold,  # type: ignore[arg-type]
                fn_kwargs={"seed": config.seed, "k": config.folds, "f": f, "inside": inside},
                batch_format="numpy",
            )
            for inside in (True, False)
        }
        counts = fold_counts(side[False], classes), fold_counts(side[True], classes)
        plan = probing.Plan(classes, None, *counts)
        probe = probe_logreg(config.probe(storage.join(scratch, str(f)), Backend.RAY))
        model, _ = probing.fit(probe, plan, side[False], side[True], data.dim, info)
        for batch in side[True].iter_batches(batch_size=None, batch_format="numpy"):
            paths.append(batch["path"])
            ys.append(batch["y"])
            probs.append(select.probabilities(model.logits(batch["x"])))
    with storage.guarded(f"remove {scratch}"):
        fs, path = storage.filesystem(scratch)
        fs.rm(path, recursive=True)
    return np.concatenate(paths).astype(object), np.concatenate(ys), np.concatenate(probs)


def fold_counts(rows: ray.data.Dataset, classes: list[str]) -> dict[str, int]:
    counts = np.zeros(len(classes), dtype=np.int64)
    for batch in rows.select_columns(["y"]).iter_batches(batch_size=None, batch_format="numpy"):
        counts += np.bincount(batch["y"], minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts, strict=True)}


# --- near-duplicates ------------------------------------------------------------------------------------


class Found:
    """What the duplicate search found: the groups, each path's label and split, the pairs across the
    split (for leakage), the nearest-neighbour similarity histogram, and the search's size."""

    def __init__(self) -> None:
        self.groups = audit.Groups()
        self.meta: dict[str, tuple[str | None, str]] = {}
        self.leaks: dict[str, tuple[str, float]] = {}  # validation path -> (training path, similarity)
        self.histogram = np.zeros(audit.HISTOGRAM_BINS, dtype=np.int64)
        self.cells = 1

    def add(self, pairs: list[tuple[str, str, float]], meta: dict[str, tuple[str | None, str]]) -> None:
        self.groups.add(pairs)
        self.meta.update(meta)
        for a, b, s in pairs:
            sides = meta[a][1], meta[b][1]
            if sorted(sides) == [TRAIN, VAL]:
                held, seen = (a, b) if sides[0] == VAL else (b, a)
                if s > self.leaks.get(held, ("", -2.0))[1]:
                    self.leaks[held] = (seen, s)


def near_duplicates(
    config: AuditConfig, data: Embeddings, val: Embeddings | None, plan: probing.Plan | None
) -> Found:
    """Sample -> mean and cells; a Ray task a part file assigns its rows to cells, grouped into buckets;
    a Ray task a bucket searches each of its cells exactly."""
    rows = data.rows + (val.rows if val else 0)
    cells = audit.cell_count(rows)
    mean, sample = sample_rows(
        data, val, config.seed, min(rows, audit.MAX_SAMPLE, audit.SAMPLE_PER_CELL * cells)
    )
    centres = audit.centroids(audit.unit(sample, mean), cells, config.seed)
    cells = len(centres)
    buckets = max(1, min(cells, math.ceil(rows * audit.PROBES * data.dim * 4 / _BUCKET_BYTES)))
    limits = plan.limits if plan is not None else None
    shared = ray.put((mean, centres))
    assign = ray.remote(num_cpus=1, num_returns=buckets)(assign_shard)
    outputs = [
        assign.remote(file, dim, shared, buckets, config.seed, limits, is_val)
        for files, dim, is_val in ((data.files, data.dim, False), (val.files if val else [], data.dim, True))
        for file in files
    ]
    per_bucket: list[list[Any]] = [[out] if buckets == 1 else out for out in outputs]  # type: ignore[misc]
    # (num_returns=1 gives one ref, more a list)
    search = ray.remote(num_cpus=1)(search_bucket)
    found = Found()
    found.cells = cells
    pending = [search.remote(config.neighbours, config.threshold, *[o[b] for o in per_bucket])
               for b in range(buckets)]  # fmt: skip
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        pairs, meta, hist = ray.get(done[0])
        found.add(pairs, meta)
        found.histogram += hist
    return found


def sample_rows(
    data: Embeddings, val: Embeddings | None, seed: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The mean embedding and the embeddings of a seeded sample of `size` rows (those with the highest
    path hash), from one streamed pass; with `size` every row, the mean is exact."""
    best = select.Best(size)
    total, n = np.zeros(data.dim), 0
    for part in (data, val):
        if part is None:
            continue
        for batch in (
            part.read()
            .select_columns(["path", "embedding"])
            .iter_batches(batch_size=None, batch_format="pyarrow")
        ):
            x = matrix(batch["embedding"], data.dim)
            paths = np.array(batch["path"].to_pylist(), dtype=object)
            score = select.hashed(paths.tolist(), seed)
            total += x.sum(axis=0, dtype=np.float64)
            n += len(x)
            best.add(score, score, paths, x)
    assert best.x is not None
    return (total / n).astype(np.float32), best.x


def assign_shard(
    file: str, dim: int, shared: tuple[np.ndarray, np.ndarray], buckets: int, seed: int,
    limits: dict[str, int] | None, is_val: bool,
) -> Any:  # fmt: skip
    """One part file's rows, normalised, each a member of its nearest cell and a query of the next
    nearest (audit.PROBES); split into `buckets` parts by cell (cell % buckets)."""
    mean, centres = shared
    fs, path = storage.filesystem(file)
    with storage.guarded(f"read {file}"), fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["path", "label", "embedding"])
    paths = np.array(table["path"].to_pylist(), dtype=object)
    labels = np.array(table["label"].to_pylist(), dtype=object)
    x = audit.unit(matrix(table["embedding"], dim), mean)
    sides = row_sides(paths, labels, seed, limits, is_val)
    near = audit.nearest_cells(x, centres, audit.PROBES)
    cell = np.concatenate([near[:, i] for i in range(near.shape[1])])
    member = np.repeat(np.arange(near.shape[1]) == 0, len(x))
    rows = np.tile(np.arange(len(x)), near.shape[1])
    parts = []
    for b in range(buckets):
        keep = cell % buckets == b
        r = rows[keep]
        parts.append({"x": x[r], "path": paths[r], "label": labels[r], "side": sides[r], "cell": cell[keep],
                      "member": member[keep]})  # fmt: skip
    return parts[0] if buckets == 1 else parts


def row_sides(
    paths: np.ndarray, labels: np.ndarray, seed: int, limits: dict[str, int] | None, is_val: bool
) -> np.ndarray:
    """train, val or unlabelled for each row, as train's split puts it (--val: every labelled row is val)."""
    unlabelled = np.array([label is None or label == "" for label in labels], dtype=bool)
    if is_val:
        side = np.full(len(paths), VAL, dtype=object)
    elif limits is None:
        side = np.full(len(paths), TRAIN, dtype=object)
    else:
        held = split.in_validation(labels.tolist(), split.bins(paths.tolist(), seed), limits)
        side = np.where(held, VAL, TRAIN).astype(object)
    side[unlabelled] = UNLABELLED
    return side


def search_bucket(k: int, threshold: float, *parts: dict[str, np.ndarray]) -> tuple[list, dict, np.ndarray]:
    """Every cell of a bucket searched exactly: the pairs above the threshold, the label and split of each
    path in them, and the histogram of the members' nearest-neighbour similarities."""
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    pairs: list[tuple[str, str, float]] = []
    hist = np.zeros(audit.HISTOGRAM_BINS, dtype=np.int64)
    order = np.argsort(joined["cell"], kind="stable")
    cells, starts = np.unique(joined["cell"][order], return_index=True)
    for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
        rows = order[start:stop]
        found, nearest = audit.cell_pairs(
            joined["x"][rows], joined["path"][rows], joined["member"][rows], k, threshold
        )
        pairs += found
        hist += audit.histogram(nearest)
    where = {p: i for i, p in enumerate(joined["path"])}
    named = {p for a, b, _ in pairs for p in (a, b)}
    meta = {p: (joined["label"][where[p]], str(joined["side"][where[p]])) for p in named}
    return pairs, meta, hist


def duplicate_table(found: Found, threshold: float) -> tuple[pa.Table, dict]:
    """duplicates.parquet (one row a member, groups largest first) and its summary."""
    columns: dict[str, list] = {name: [] for name in DUPLICATES_SCHEMA.names}
    crossing = 0
    for number, group in enumerate(found.groups.groups(), start=1):
        labels = [found.meta[p][0] for p in group]
        sides = [found.meta[p][1] for p in group]
        crosses = TRAIN in sides and VAL in sides
        crossing += crosses
        kept = audit.keeper(group, sides)
        for i, p in enumerate(group):
            for name, value in (
                ("group", number), ("path", p), ("label", labels[i]), ("split", sides[i]),
                ("similarity", found.groups.best[p]), ("size", len(group)), ("crosses_splits", crosses),
                ("mixed_labels", len(set(labels)) > 1), ("keep", i == kept),
            ):  # fmt: skip
                columns[name].append(value)
    table = pa.table(columns, schema=DUPLICATES_SCHEMA)
    edges = np.linspace(-1.0, 1.0, audit.HISTOGRAM_BINS + 1)
    groups = len(set(columns["group"]))
    summary = {
        "threshold": threshold,
        "groups": groups,
        "rows_in_groups": table.num_rows,
        "removable": table.num_rows - groups,
        "groups_crossing_splits": crossing,
        "cells": found.cells,
        "nearest_similarity": {"edges": edges.round(4).tolist(), "counts": found.histogram.tolist()},
    }
    return table, summary


# --- leakage --------------------------------------------------------------------------------------------


def leakage(
    config: AuditConfig, data: Embeddings, val: Embeddings | None, plan: probing.Plan, found: Found
) -> tuple[pa.Table, dict]:
    """leakage.parquet (the validation rows with a near-duplicate in training) and the probe's validation
    accuracy, as train would fit it, with and without them."""
    leaked = sorted(found.leaks)
    table = pa.table(
        {
            "path": leaked,
            "label": [found.meta[p][0] for p in leaked],
            "duplicate": [found.leaks[p][0] for p in leaked],
            "duplicate_label": [found.meta[found.leaks[p][0]][0] for p in leaked],
            "similarity": [found.leaks[p][1] for p in leaked],
        },
        schema=LEAKAGE_SCHEMA,
    )
    scratch = storage.join(config.output, "_probe")
    n_train = sum(plan.train_counts.values())
    backend = Backend.SKLEARN if n_train <= SKLEARN_MAX_ROWS else Backend.RAY
    probe = config.probe(scratch, backend)
    train_rows, val_rows = probing.split_rows(plan, config.seed, data, val)
    info = model_dir.info_of(
        data.metadata,
        kind="probe",
        head=str(probe.head),
        kernel="linear",
        backend=str(backend),
        embeddings=storage.redact(data.uri),
        raytl_version=VERSION,
    )
    model, _ = probing.fit(probe, plan, train_rows, val_rows, data.dim, info)
    if backend == Backend.RAY:
        with storage.guarded(f"remove {scratch}"):
            fs, path = storage.filesystem(scratch)
            fs.rm(path, recursive=True)
    right = total = right_clean = total_clean = 0
    held = set(leaked)
    for batch in val_rows.iter_batches(batch_size=None, batch_format="numpy"):
        predicted, _ = model.predict(batch["x"])
        correct = predicted == batch["y"]
        clean = np.array([p not in held for p in batch["path"]], dtype=bool)
        right, total = right + int(correct.sum()), total + len(correct)
        right_clean, total_clean = right_clean + int(correct[clean].sum()), total_clean + int(clean.sum())
    summary = {
        "validation_rows": total,
        "leaked": table.num_rows,
        "accuracy": right / total if total else None,
        "accuracy_without_leaked": right_clean / total_clean if total_clean else None,
    }
    return table, summary


# --- OUT ------------------------------------------------------------------------------------------------


def write(config: AuditConfig, data: Embeddings, result: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    """The tables, audit.html, then audit.json (last: its presence means a whole audit). Tables of checks
    not run this time are removed, so that OUT never mixes two audits."""
    fs, root = storage.filesystem(config.output)
    for name in (LABEL_ISSUES, DUPLICATES, LEAKAGE):
        target = storage.join(config.output, name)
        if name in tables:
            sink = pa.BufferOutputStream()
            pq.write_table(tables[name], sink)
            storage.write_bytes(target, sink.getvalue().to_pybytes())
        else:
            with storage.guarded(f"remove {target}"):
                path = f"{root.rstrip('/')}/{name}"
                if fs.exists(path):
                    fs.rm(path)
    schemes = tuple(data.metadata.get("schemes") or (storage.scheme_of(config.embeddings),))
    page = pages.page(result, tables, schemes)
    storage.write_bytes(storage.join(config.output, AUDIT_HTML), page.encode())
    storage.write_bytes(storage.join(config.output, AUDIT_JSON), json.dumps(result, indent=2).encode())
