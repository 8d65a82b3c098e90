"""`--l2 auto`: the probe's L2 penalty chosen on the validation split by a Ray Tune sweep: a grid in log
space around scikit-learn's default (1/n_train), each value a trial fitting the probe with scikit-learn in
rounds of solver iterations, and ASHA stopping the trials that fall behind."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from typing import Any

import ray

from raytl.config import TrainConfig
from raytl.modeling import probe, split

log = logging.getLogger(__name__)

# lambda = factor / n_train: scikit-learn's C from 10^4 down to 10^-4, the default (C = 1) in the middle.
FACTORS = tuple(10.0**e for e in range(-4, 5))
ROUNDS, ITERATIONS = 8, 50  # a trial: up to 8 reports, 50 lbfgs iterations apart
# The sweep fits on at most this many training rows (a seeded sample beyond): lambda is per row of the
# mean loss, so the value found carries over to the full fit, whichever --backend.
SWEEP_MAX_ROWS = 200_000


def trial(tune_config: dict[str, Any], data: Any, config: TrainConfig) -> None:
    """One Ray Tune trial: the probe at tune_config["l2"], its validation accuracy reported each round."""
    from ray import tune

    for accuracy in probe.fit_in_rounds(data, config, tune_config["l2"], ROUNDS, ITERATIONS):
        tune.report({"accuracy": accuracy})


def choose_l2(
    config: TrainConfig, train_rows: ray.data.Dataset, val_rows: ray.data.Dataset, n_train: int
) -> tuple[float, list[dict[str, Any]]]:
    """The sweep: the chosen l2 (the best validation accuracy among the trials that ran every round; ties to
    the larger l2) and every trial's l2, accuracy and rounds."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raytl.cluster.probing import gather

    if n_train > SWEEP_MAX_ROWS:
        share = SWEEP_MAX_ROWS / n_train
        train_rows = train_rows.filter(
            lambda row: split.bins([row["path"]], config.seed + 1)[0] < share * split.BINS
        )
    x, y = gather(train_rows)
    xv, yv = gather(val_rows)
    values = [factor / len(y) for factor in FACTORS]
    storage = tempfile.mkdtemp(prefix="raytl-sweep-")
    try:
        tuner = tune.Tuner(
            tune.with_parameters(trial, data=(x, y, xv, yv), config=replace(config, l2=None)),
            param_space={"l2": tune.grid_search(values)},
            tune_config=tune.TuneConfig(
                metric="accuracy",
                mode="max",
                scheduler=ASHAScheduler(max_t=ROUNDS, grace_period=2, reduction_factor=3),
                reuse_actors=True,  # one process per concurrent trial, not one per value
            ),
            run_config=tune.RunConfig(storage_path=storage, name="l2", verbose=0),
        )
        results = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    sweep = sorted(
        (
            {
                "l2": r.config["l2"],
                "accuracy": r.metrics["accuracy"],
                "rounds": r.metrics["training_iteration"],
            }
            for r in (results[i] for i in range(len(results)))
            if r.error is None and r.metrics and r.config
        ),
        key=lambda t: t["l2"],
    )
    rounds = max(t["rounds"] for t in sweep)
    finished = [t for t in sweep if t["rounds"] == rounds]
    best = max(finished, key=lambda t: (t["accuracy"], t["l2"]))
    log.info(
        "--l2 auto: %.3g (validation accuracy %.4f over %d values)", best["l2"], best["accuracy"], len(sweep)
    )
    return float(best["l2"]), sweep
