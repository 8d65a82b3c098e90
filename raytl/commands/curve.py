"""`raytl curve`: the few-shot learning curve of the linear probe. For k labelled images per class on a
ladder (1, 2, 4, ... and all), over several seeded draws, the probe is fitted on k per class of the training
split (`raytl train`'s split) and scored on its validation rows; each (k, draw) fit is a Ray task. OUT gets
curve.json, curve.png and curve.html."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from raytl.cluster import probing, session
from raytl.cluster.sweep import choose_l2
from raytl.config import L2_AUTO, Backend, CurveConfig
from raytl.errors import DatasetError
from raytl.files import storage
from raytl.files.embeddings import check_same_backbone, open_embeddings
from raytl.files.output import check_apart, check_unheld
from raytl.modeling import curve
from raytl.modeling import model_dir as model_dirs
from raytl.reporting import curve as pages
from raytl.version import VERSION

log = logging.getLogger(__name__)

CURVE_JSON, CURVE_PNG, CURVE_HTML = "curve.json", "curve.png", "curve.html"
# The full-data point is fitted with scikit-learn on the driver (train --backend sklearn) up to this many
# training rows, with Ray Train beyond (its checkpoints in OUT/_full, removed once fitted).
SKLEARN_MAX_ROWS = 200_000
# The rows the driver holds for the points below "all" (draws x classes x largest k x D floats).
_HELD_BYTES = 2 * 1024**3


def run(config: CurveConfig) -> dict[str, Any]:
    """Check inputs, fit every point, write OUT; returns the curve (curve.json's content)."""
    data = open_embeddings(config.embeddings)
    val = open_embeddings(config.val, "--val") if config.val else None
    if val is not None:
        check_same_backbone(data.metadata, val, "--val")
    check_apart(config.output, {"EMBEDDINGS": config.embeddings, "--val": config.val})
    check_unheld(config.output, CURVE_JSON, "a curve", config.overwrite)
    session.init_ray()
    scratch = storage.join(config.output, "_full")
    probe = config.probe(scratch, Backend.SKLEARN)
    plan = probing.plan_split(probe, data, val, labelled_only=True)
    n_train = sum(plan.train_counts.values())
    if n_train > SKLEARN_MAX_ROWS:
        probe = config.probe(scratch, Backend.RAY)
    train_rows, val_rows = probing.split_rows(plan, config.seed, data, val)
    info = model_dirs.info_of(
        data.metadata, kind="probe", head=str(config.head), kernel="linear", backend=str(probe.backend),
        embeddings=storage.redact(config.embeddings), raytl_version=VERSION,
    )  # fmt: skip
    shots = curve.ladder(config.shots, max(plan.train_counts.values()))
    points = few_shot_points(config, plan, train_rows, val_rows, shots, data.dim, info)
    sweep: list[dict[str, Any]] = []
    if probe.l2 == L2_AUTO:  # the last point is what train --l2 auto fits
        chosen, sweep = choose_l2(probe, train_rows, val_rows, n_train)
        probe = replace(probe, l2=chosen)
    model, _ = probing.fit(probe, plan, train_rows, val_rows, data.dim, info)
    if probe.backend == Backend.RAY:
        with storage.guarded(f"remove {scratch}"):
            fs, path = storage.filesystem(scratch)
            fs.rm(path, recursive=True)
    full, _ = probing.validation_metrics(model, val_rows)
    done = {"accuracy": full["accuracy"], "macro_f1": full["macro_f1"], "labels": n_train,
            "l2": probing.default_l2(probe, plan), **({"l2_sweep": sweep} if sweep else {})}  # fmt: skip
    points.append(curve.point(curve.FULL, n_train / len(plan.classes), [done]))
    found = curve.answer(points)
    result = {
        "embeddings": storage.redact(config.embeddings),
        "classes": plan.classes,
        "head": str(config.head),
        "repeats": config.repeats,
        "seed": config.seed,
        "train_samples": plan.train_counts,
        "val_samples": plan.val_counts,
        "points": points,
        "answer": found,
        "sentence": curve.sentence(found),
        "raytl_version": VERSION,
    }
    write(config.output, result)
    return result


def few_shot_points(
    config: CurveConfig, plan: probing.Plan, train_rows: ray.data.Dataset, val_rows: ray.data.Dataset,
    shots: list[int], dim: int, info: model_dirs.ModelInfo,
) -> list[dict[str, Any]]:  # fmt: skip
    """The points below "all": each draw's k-shot subsets from one streamed pass over the training rows,
    then one Ray task a (k, draw) fit, scored on the validation rows (in the object store once)."""
    if not shots:
        return []
    largest = shots[-1]
    held = config.repeats * len(plan.classes) * largest * dim * 4
    if held > _HELD_BYTES:
        raise DatasetError(
            f"--shots up to {largest} with --repeats {config.repeats} over {len(plan.classes)} classes would "
            f"hold {held / 1024**3:.1f} GiB of embeddings on the driver (at most {_HELD_BYTES // 1024**3}); "
            "give fewer --shots or --repeats."
        )
    subsets = curve.Subsets(largest)
    ranked = train_rows.map_batches(
        curve.best_ranked,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        fn_kwargs={"seed": config.seed, "draws": config.repeats, "k": largest},
        batch_format="numpy",
    )
    for batch in ranked.iter_batches(batch_size=None, batch_format="numpy"):
        subsets.add(batch)
    validation = ray.put(probing.gather(val_rows))
    probe = config.probe(config.output, Backend.SKLEARN)
    fit = ray.remote(num_cpus=1)(curve.score)
    refs = {
        (k, draw): fit.remote(*subsets.subset(draw, k), validation, plan.classes, probe, info)
        for k in shots
        for draw in range(config.repeats)
    }
    results = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    counts = np.array([plan.train_counts[c] for c in plan.classes])
    return [
        curve.point(k, float(np.minimum(counts, k).mean()), [results[(k, d)] for d in range(config.repeats)])
        for k in shots
    ]


def write(output: str, result: dict[str, Any]) -> None:
    """curve.json, curve.png and curve.html in OUT (curve.json last: its presence means a whole curve)."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        png = pages.figure(result)
    storage.write_bytes(storage.join(output, CURVE_PNG), png)
    storage.write_bytes(storage.join(output, CURVE_HTML), pages.page(result, png).encode())
    storage.write_bytes(storage.join(output, CURVE_JSON), json.dumps(result, indent=2).encode())
