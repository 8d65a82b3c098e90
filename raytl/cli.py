"""The `raytl` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import raytl
from raytl import logs, storage
from raytl.config import (
    ExtractConfig,
    FinetuneConfig,
    Freeze,
    Head,
    Layer,
    Pool,
    Precision,
    TrainConfig,
    parse_schemes,
)
from raytl.errors import USER_ERRORS, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Settings that Ray workers read from their environment; this process's is restored on return.
    worker_env = {} if args.retries is None else {storage.RETRIES_ENV: str(args.retries)}
    saved = {name: os.environ.get(name) for name in worker_env}
    os.environ.update(worker_env)
    # Each call (tests call main() many times) logs to the sys.stderr of the moment.
    logs.setup(args.log_level, json_lines=args.log_format == "json", quiet=args.quiet, worker_env=worker_env)
    if args.log_format == "json":
        logs.relay_stderr_as_json()
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"raytl: error: {storage.redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # What is written stays written (parts are whole, checkpoints too): the same command continues.
        print("raytl: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytl", description="Transfer learning at cluster scale on Ray.")
    parser.add_argument("--version", action="version", version=f"raytl {raytl.__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="debug also shows Ray's own logs and progress bars (default warning)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one JSON object a log line"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress line or summary table; errors and the result only"
    )
    parser.add_argument(
        "--retries",
        type=count,
        metavar="N",
        help="retries of a storage request that fails transiently (throttling, 5xx, timeouts): botocore's "
        "for s3://, raytl's for http(s):// and local paths; gs:// and az:// retry as their clients do "
        f"(default {storage.DEFAULT_RETRIES})",
    )
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_extract(sub.add_parser("extract", help="embed an image corpus with VGG16 and write Parquet"))
    add_train(sub.add_parser("train", help="fit a linear probe on embeddings with Ray Train"))
    add_finetune(sub.add_parser("finetune", help="fine-tune VGG16 with a new head on the images, Ray Train"))
    add_predict(sub.add_parser("predict", help="classify images or embeddings with a trained model"))
    add_quickstart(sub.add_parser("quickstart", help="run the main job on a small built-in corpus"))
    add_pack(sub.add_parser("pack", help="pack loose image files into WebDataset tar shards"))
    add_list(sub.add_parser("list", help="list a class-per-folder SOURCE once into a reusable manifest"))
    add_report(sub.add_parser("report", help="draw a trained model's HTML report (and PNG figures)"))
    add_inspect(sub.add_parser("inspect", help="describe any raytl output: embeddings, predictions, model"))
    return parser


ALLOW_HELP = (
    "schemes a manifest may name besides its own filesystem's, e.g. file,https (default: none; an S3 "
    "manifest names S3 objects only)"
)


def add_extract(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Embed every image under SOURCE (class-per-folder) or in --manifest, write Parquet to OUTPUT."
    )
    p.add_argument(
        "paths", nargs="+", metavar="SOURCE OUTPUT", help="SOURCE and OUTPUT; only OUTPUT with --manifest"
    )
    p.add_argument("--manifest", help="CSV or Parquet file with columns path and optional label")
    p.add_argument(
        "--weights", default="imagenet", help="imagenet | random | path or URI of a VGG16 state_dict"
    )
    p.add_argument("--layer", default="pool5", help=f"{' | '.join(c.value for c in Layer)} (default pool5)")
    p.add_argument("--pool", default="avg", help=f"pool5 pooling: {' | '.join(c.value for c in Pool)}")
    p.add_argument("--precision", default="auto", help=f"{' | '.join(c.value for c in Precision)}")
    p.add_argument("--image-size", type=int, default=224, help="centre crop in pixels (default 224)")
    p.add_argument("--resize-size", type=int, help="shorter side before the crop (default size*256/224)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 256 per GPU, 32 on CPU)")
    p.add_argument("--num-actors", type=int, help="model actors (default one per GPU, one on CPU)")
    p.add_argument("--decode-batch", type=int, default=32, help="files per decode task call")
    p.add_argument(
        "--decode",
        default="cpu",
        help="cpu (Pillow in CPU tasks) | gpu (JPEGs decoded by nvJPEG in the model actors)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow start, faster on GPUs)"
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        help="rows per Parquet part file (default: about a minute of work on CPU, 8192 on GPU clusters)",
    )
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images go to _errors")
    p.add_argument(
        "--max-errors", help="stop when more files than this count (100) or share (0.01, 1%%) are broken"
    )
    p.add_argument("--label-field", help="tar shards: cls | txt | json:FIELD (default: KEY.cls when present)")
    p.add_argument("--allow-schemes", help=ALLOW_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random")
    p.add_argument("--overwrite", action="store_true", help="replace raytl results already in OUTPUT")
    p.set_defaults(run=run_extract)


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    """CLI arguments -> validated ExtractConfig (shared by jobs/extract.py)."""
    expected = 1 if args.manifest else 2
    if len(args.paths) != expected:
        usage = "OUTPUT with --manifest" if args.manifest else "SOURCE OUTPUT"
        raise ConfigError(f"extract takes {usage}, not {len(args.paths)} paths: {' '.join(args.paths)}.")
    source, output = (None, args.paths[0]) if args.manifest else args.paths
    return ExtractConfig.create(**options_of(ExtractConfig, args), source=source, output=output)


def run_extract(args: argparse.Namespace) -> int:
    from raytl import extract

    summary = extract.run(extract_config(args))
    logs.summary_table(
        "raytl extract",
        [
            ("seen", summary["seen"]),
            ("embedded", summary["embedded"]),
            ("failed", summary["failed"]),
            ("skipped (done before)", summary["skipped"]),
            ("images/s", summary["images_per_second"] or 0.0),
            ("wall time", logs.duration(summary["wall_seconds"])),
            ("output", summary["output"]),
        ],
    )
    print(json.dumps({k: summary[k] for k in ("seen", "embedded", "failed", "images_per_second", "output")}))
    return 0


def add_train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fit a linear probe on EMBEDDINGS (multinomial logistic regression, or a linear SVM with --head "
        "svm); write the model, metrics and report to MODEL_DIR."
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS", help="a raytl embeddings dataset (folder or URI)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="where the model, metrics and checkpoints go")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", help="a separate validation embeddings dataset")
    val.add_argument("--val-fraction", type=float, default=0.2, help="stratified seeded split (default 0.2)")
    p.add_argument("--backend", default="ray", help="ray (Ray Train, data-parallel) | sklearn (one node)")
    p.add_argument(
        "--head", default="logreg", help="logreg (softmax) | svm (one-vs-rest squared hinge, as LinearSVC)"
    )
    p.add_argument(
        "--kernel",
        default="linear",
        help="svm: linear | rbf (scikit-learn's SVC with --backend sklearn; small data, one node only)",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers, one GPU each on GPU clusters")
    p.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=10, help="early stopping on validation loss")
    p.add_argument("--batch-size", type=int, default=256, help="rows per step per worker")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate, cosine-decayed")
    p.add_argument("--l2", type=float, help="L2 penalty (default 1/n_train, scikit-learn's C=1)")
    p.add_argument("--class-weight", default="none", help="none | balanced")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the shuffles")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in MODEL_DIR")
    p.set_defaults(run=run_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """CLI arguments -> validated TrainConfig (shared by jobs/train.py)."""
    return TrainConfig.create(**options_of(TrainConfig, args))


def options_of(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are fields of a config dataclass (argparse names them alike)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def run_train(args: argparse.Namespace) -> int:
    from raytl import probe

    metrics = probe.run(train_config(args))
    _model_table("raytl train", metrics, args.model_dir)
    print(
        json.dumps(
            {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "model_dir": args.model_dir}
        )
    )
    return 0


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fine-tune VGG16 with a new head on the labelled images under SOURCE (class-per-folder) or in "
        "--manifest; checkpoints every epoch in MODEL_DIR, and the same command resumes an unfinished run."
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE MODEL_DIR",
        help="SOURCE and MODEL_DIR; only MODEL_DIR with --manifest",
    )
    p.add_argument("--manifest", help="CSV or Parquet file with columns path and label")
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val", help="validation images: a class-per-folder folder or a .csv / .parquet manifest"
    )
    val.add_argument("--val-fraction", type=float, default=0.2, help="stratified seeded split (default 0.2)")
    p.add_argument(
        "--weights", default="imagenet", help="imagenet | random | path or URI of a VGG16 state_dict"
    )
    p.add_argument("--head", default="avg", help=f"{' | '.join(c.value for c in Head)}: the new head's input")
    p.add_argument(
        "--freeze", default="block4", help=f"{' | '.join(c.value for c in Freeze)}: frozen conv blocks"
    )
    p.add_argument("--optimizer", default="adamw", help="adamw | sgd (Nesterov momentum 0.9)")
    p.add_argument("--lr", type=float, default=1e-3, help="the new head's learning rate")
    p.add_argument(
        "--backbone-lr", type=float, help="the unfrozen VGG16 layers' learning rate (default lr/10)"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear warm-up, then cosine decay (default 1; half the run when --epochs is 1)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per step per worker")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers, one GPU each on GPU clusters")
    p.add_argument("--image-size", type=int, default=224, help="crop in pixels (default 224)")
    p.add_argument("--resize-size", type=int, help="validation: shorter side before the crop")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random crops and flips")
    p.add_argument("--min-crop-scale", type=float, default=0.08, help="smallest random crop, share of area")
    p.add_argument("--label-field", help="tar shards: cls | txt | json:FIELD (default: KEY.cls when present)")
    p.add_argument("--allow-schemes", help=ALLOW_HELP)
    p.add_argument("--precision", default="auto", help=f"{' | '.join(c.value for c in Precision)}")
    p.add_argument("--decode-batch", type=int, default=32, help="files per decode task call")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images are skipped")
    p.add_argument("--max-failures", type=int, default=3, help="restarts from the last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the head and --weights random")
    p.add_argument("--overwrite", action="store_true", help="discard a model or unfinished run in MODEL_DIR")
    p.set_defaults(run=run_finetune)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """CLI arguments -> validated FinetuneConfig (shared by jobs/finetune.py)."""
    expected = 1 if args.manifest else 2
    if len(args.paths) != expected:
        usage = "MODEL_DIR with --manifest" if args.manifest else "SOURCE MODEL_DIR"
        raise ConfigError(f"finetune takes {usage}, not {len(args.paths)} paths: {' '.join(args.paths)}.")
    source, model_dir = (None, args.paths[0]) if args.manifest else args.paths
    return FinetuneConfig.create(**options_of(FinetuneConfig, args), source=source, model_dir=model_dir)


def run_finetune(args: argparse.Namespace) -> int:
    from raytl import finetune

    metrics = finetune.run(finetune_config(args))
    _model_table("raytl finetune", metrics, args.paths[-1])
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "best_epoch", "resumed_at_epochs")}
    print(json.dumps({**summary, "model_dir": args.paths[-1]}))
    return 0


def add_predict(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Classify INPUT (embeddings, or images: a class-per-folder SOURCE or --manifest) with MODEL_DIR."
    )
    p.add_argument(
        "paths", nargs="+", metavar="MODEL_DIR INPUT OUTPUT", help="INPUT is left out with --manifest"
    )
    p.add_argument("--manifest", help="CSV or Parquet file of images to classify (path, optional label)")
    p.add_argument("--weights", help="the backbone weights, if they moved since the embeddings were made")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.add_argument("--num-actors", type=int, help="model actors")
    p.add_argument("--allow-schemes", help=ALLOW_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in OUTPUT")
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from raytl import predict

    expected = 2 if args.manifest else 3
    if len(args.paths) != expected:
        usage = "MODEL_DIR OUTPUT with --manifest" if args.manifest else "MODEL_DIR INPUT OUTPUT"
        raise ConfigError(f"predict takes {usage}, not {len(args.paths)} paths: {' '.join(args.paths)}.")
    model_dir, output = args.paths[0], args.paths[-1]
    source = None if args.manifest else args.paths[1]
    summary = predict.run(
        model_dir,
        source,
        output,
        manifest=args.manifest,
        weights=args.weights,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        overwrite=args.overwrite,
        allow_schemes=parse_schemes(args.allow_schemes),
    )
    rows = [("seen", summary["seen"]), ("predicted", summary["predicted"]), ("failed", summary["failed"])]
    if summary.get("accuracy") is not None:
        rows.append((f"accuracy ({summary['labelled']:,} labelled)", summary["accuracy"]))
    rows += [
        ("rows/s", summary["rows_per_second"] or 0.0),
        ("wall time", logs.duration(summary["wall_seconds"])),
    ]
    logs.summary_table("raytl predict", [*rows, ("output", summary["output"])])
    print(json.dumps({k: summary.get(k) for k in ("predicted", "failed", "accuracy", "output")}))
    return 0


def _model_table(title: str, metrics: dict[str, Any], model_dir: str) -> None:
    page = storage.join(model_dir, "report.html")
    fs, path = storage.filesystem(page)
    shown = storage.redact(page) if fs.exists(path) else "not written (see the warning above)"
    logs.summary_table(
        title,
        [
            ("validation accuracy", metrics["accuracy"]),
            ("macro F1", metrics["macro_f1"]),
            ("validation images", metrics["samples"]),
            ("model", storage.redact(model_dir)),
            ("report", shown),
        ],
    )


def add_quickstart(p: argparse.ArgumentParser) -> None:
    p.description = "Build a small labelled image corpus from scikit-learn's digits and run raytl on it."
    p.add_argument(
        "workdir", nargs="?", default="raytl-quickstart", help="where to write (default ./raytl-quickstart)"
    )
    p.set_defaults(run=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from raytl import quickstart

    return quickstart.run(args.workdir)


def add_pack(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="SOURCE OUTPUT_PREFIX, or OUTPUT_PREFIX with --manifest"
    )
    p.add_argument("--manifest", help="CSV or Parquet file with columns path and optional label")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the shuffle of the images across shards")
    p.add_argument("--allow-schemes", help=ALLOW_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace shards already under OUTPUT_PREFIX")
    p.set_defaults(run=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from raytl import pack

    expected = 1 if args.manifest else 2
    if len(args.paths) != expected:
        usage = "OUTPUT_PREFIX with --manifest" if args.manifest else "SOURCE OUTPUT_PREFIX"
        raise ConfigError(f"pack takes {usage}, not {len(args.paths)} paths: {' '.join(args.paths)}.")
    source = None if args.manifest else args.paths[0]
    print(
        json.dumps(
            pack.run(
                source,
                args.manifest,
                args.paths[-1],
                args.shard_size,
                args.overwrite,
                args.seed,
                parse_schemes(args.allow_schemes),
            )
        )
    )
    return 0


def add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="class-per-folder images (folder or URI)")
    p.add_argument("manifest", metavar="MANIFEST", help="the manifest to write: .parquet or .csv")
    p.set_defaults(run=run_list)


def run_list(args: argparse.Namespace) -> int:
    from raytl import pack

    print(json.dumps(pack.write_manifest(args.source, args.manifest)))
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write MODEL_DIR/report.html (self-contained: confusion matrix, per-class precision and recall, "
        "training curves, PCA of validation embeddings, misclassified images) and the figures as PNG "
        "files in MODEL_DIR/report/. train and finetune write it too."
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model written by raytl train or raytl finetune")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from raytl import report

    print(json.dumps({"report": storage.redact(report.write(args.model_dir))}))
    return 0


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Describe a raytl output: an embeddings or predictions dataset (rows, dimension, model metadata, "
        "label counts, errors) or a model directory."
    )
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT of extract or predict, or a MODEL_DIR")
    p.add_argument("--json", action="store_true", help="the description as one JSON object")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from raytl import describe

    found = describe.describe(args.output)
    print(json.dumps(found, indent=2) if args.json else describe.text(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
