"""`raytl train`: a linear probe on embeddings (multinomial logistic regression, or a one-vs-rest linear SVM)
fitted with Ray Train or scikit-learn (cluster/probing.py); MODEL_DIR gets the model, metrics and report."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from raytl.cluster import probing, session
from raytl.cluster.sweep import choose_l2
from raytl.config import L2_AUTO, Backend, ProbeHead, TrainConfig
from raytl.files import storage
from raytl.files.embeddings import check_same_backbone, open_embeddings
from raytl.files.exclusions import excluded_paths
from raytl.modeling import loop, probe
from raytl.modeling import model_dir as model_dirs
from raytl.modeling.model_dir import METRICS_FILE, TRAIN_RUN
from raytl.reporting import report, tracking
from raytl.version import VERSION

log = logging.getLogger(__name__)


def run(config: TrainConfig) -> dict[str, Any]:
    """Check inputs, fit the probe, write MODEL_DIR (model, model.json, metrics.json); returns metrics."""
    train = open_embeddings(config.embeddings)
    val = open_embeddings(config.val, "--val") if config.val else None
    if val is not None:
        check_same_backbone(train.metadata, val, "--val")
    excluded = excluded_paths(config.exclude, config.exclude_rank) if config.exclude else None
    if excluded is not None:
        log.info("--exclude: leaving out the %d paths its tables list", len(excluded))
        train, val = replace(train, excluded=excluded), val and replace(val, excluded=excluded)
    probe.check_kernel(config, train.rows)
    if prepare_model_dir(config):
        log.warning("resuming the unfinished run in MODEL_DIR %s", storage.redact(config.model_dir))
    session.init_ray()
    plan = probing.plan_split(config, train, val)
    model_dirs.record_run(config.model_dir, TRAIN_RUN, model_dirs.run_options(config))  # now resumable
    train_rows, val_rows = probing.split_rows(plan, config.seed, train, val)
    sweep: list[dict[str, Any]] = []
    if config.l2 == L2_AUTO:
        chosen, sweep = choose_l2(config, train_rows, val_rows, sum(plan.train_counts.values()))
        config = replace(config, l2=chosen)
    info = model_dirs.info_of(
        train.metadata, kind="probe", head=str(config.head), kernel=str(config.kernel),
        backend=str(config.backend), embeddings=storage.redact(config.embeddings),
        l2=probing.default_l2(config, plan), raytl_version=VERSION,
    )  # fmt: skip
    with tracking.run("train", config, train.metadata) as tracker:
        model, history = probing.fit(config, plan, train_rows, val_rows, train.dim, info, tracker)
        model.save(config.model_dir)
        metrics, sample = probing.validation_metrics(model, val_rows)
        report.write_validation(config.model_dir, sample)
        metrics.update(
            head=str(config.head),
            kernel=str(config.kernel),
            backend=str(config.backend),
            train_samples=plan.train_counts,
            val_samples=plan.val_counts,
            history=history,
            l2=probing.default_l2(config, plan),
            **({"l2_sweep": sweep} if sweep else {}),
            **(
                {"excluded": {"tables": [storage.redact(t) for t in config.exclude], "paths": len(excluded)}}
                if excluded is not None
                else {}
            ),
        )
        if config.backend == Backend.RAY:
            kept = [row["epoch"] for row in history if row.get("selected")]
            metrics.update(
                best_epoch=kept[-1] if kept else None,
                selected_by=loop.selection(config.head == ProbeHead.SVM),
            )
        model_dirs.write_json(config.model_dir, METRICS_FILE, metrics)
        report.write_quietly(config.model_dir)
        tracker.finish(config.model_dir, metrics)
    return metrics


def prepare_model_dir(config: TrainConfig) -> bool:
    """Start a probe's run in MODEL_DIR, or resume the unfinished one with the same options (True): Ray
    Train restores its last checkpoint (model_dir.prepare)."""
    return model_dirs.prepare(
        config.model_dir, model_dirs.run_options(config), TRAIN_RUN, config.overwrite, "probe training",
        config.option_name,
        record=False,  # recorded once the labels are counted: a run refused for its data leaves nothing
    )  # fmt: skip
