"""The `raytl` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, get_args, get_type_hints

from raytl import errors
from raytl.config import (
    AuditConfig,
    Choice,
    CurveConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    ListConfig,
    PackConfig,
    PredictConfig,
    SelectConfig,
    ServeConfig,
    TrainConfig,
    flag,
)
from raytl.errors import ConfigError
from raytl.files import storage
from raytl.reporting import logs
from raytl.version import VERSION


class Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose usage errors are one JSON object under --log-format
    json, like every other line (they come before logging is set up)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if not Parser.json_errors:
            super().error(message)
        logs.final_line(f"{self.prog}: error: {message}", json_lines=True)
        sys.exit(2)


def _asks_json(argv: Sequence[str]) -> bool:
    """Whether the command line gives --log-format json (read before parsing, for parsing's own errors)."""
    items = list(argv)
    return "--log-format=json" in items or any(
        a == "--log-format" and b == "json" for a, b in zip(items, items[1:], strict=False)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytl` console script."""
    parser = build_parser()
    Parser.json_errors = _asks_json(sys.argv[1:] if argv is None else argv)
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
        return _run(args)
    except KeyboardInterrupt:
        # What is written stays written (parts are whole, checkpoints too): the same command continues.
        logs.final_line("raytl: interrupted; rerun the same command to resume.", logging.WARNING)
        return 130
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(args: argparse.Namespace) -> int:
    """The verb; a user's error (raised here or in a Ray task) is its one sentence and exit status 2."""
    try:
        return args.run(args)
    except Exception as exc:
        error = errors.user_error(exc)
        if error is None:
            raise
        logs.final_line(f"raytl: error: {error}")
        return 2


def count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {text!r}")
    return int(text)


def add_global_options(p: argparse.ArgumentParser, after_verb: bool = False) -> None:
    """Options of raytl itself, before the verb (`raytl --quiet extract …`) or after it (`raytl extract
    --quiet …`, and `python jobs/extract.py --quiet …`): after it, only what is given replaces the first."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_verb else value

    group = p.add_argument_group("options of raytl itself") if after_verb else p
    group.add_argument(
        "--log-level",
        default=default("warning"),
        choices=["debug", "info", "warning", "error"],
        help="debug also shows Ray's own logs and progress bars (default warning)",
    )
    group.add_argument(
        "--log-format",
        default=default("text"),
        choices=["text", "json"],
        help="json: one JSON object a line on stderr, for log collectors (default text)",
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        default=default(False),
        help="no progress line or summary table; errors and the result only",
    )
    group.add_argument(
        "--retries",
        type=count,
        metavar="N",
        default=default(None),
        help="retries of a storage request that fails transiently (throttling, 5xx, timeouts): botocore's "
        "for s3://, raytl's for http(s):// and local paths; gs:// and az:// retry as their clients do "
        f"(default {storage.DEFAULT_RETRIES})",
    )


COMMANDS: dict[str, tuple[str, str, str]] = {
    # verb: (one line for `raytl --help`, what it does, an example)
    "extract": (
        "embed an image corpus with VGG16 (or --model) and write Parquet",
        "Embed every image under SOURCE (class-per-folder, zips, tar shards) or in --manifest; write one "
        "embedding per image as Parquet parts to OUTPUT.",
        "raytl extract s3://bucket/images s3://bucket/embeddings --layer pool5",
    ),
    "train": (
        "fit a linear probe on embeddings with Ray Train",
        "Fit a linear probe on EMBEDDINGS (multinomial logistic regression, or a linear SVM with --head "
        "svm); write the model, metrics and report to MODEL_DIR.",
        "raytl train s3://bucket/embeddings s3://bucket/models/probe --head svm --workers 4",
    ),
    "finetune": (
        "fine-tune VGG16 (or --model) with a new head on the images, Ray Train",
        "Fine-tune VGG16 (or --model) with a new head on the labelled images under SOURCE (class-per-folder) "
        "or in --manifest; checkpoints every epoch in MODEL_DIR, and the same command resumes an unfinished "
        "run.",
        "raytl finetune s3://bucket/images s3://bucket/models/ft --freeze block4 --epochs 10",
    ),
    "curve": (
        "how accuracy grows with labels: the probe's few-shot learning curve",
        "Fit the linear probe on k labelled rows per class of EMBEDDINGS (1, 2, 4, ... and all; several "
        "seeded draws each, one Ray task a fit), score each on train's validation split, and write "
        "curve.json, curve.png and curve.html to OUT.",
        "raytl curve s3://bucket/embeddings s3://bucket/curves/probe --repeats 5",
    ),
    "select": (
        "which unlabelled images to label next, as a manifest",
        "Pick --budget unlabelled rows (label empty) of EMBEDDINGS to label next, by --strategy (random; "
        "typical or kcenter without a model; margin, entropy or margin-diverse with --model), and write "
        "them to OUT as a manifest (path, rank, score, strategy; .parquet or .csv).",
        "raytl select s3://bucket/embeddings next.csv --budget 500 --strategy margin-diverse --model M",
    ),
    "audit": (
        "which labels and images are wrong: label issues, near-duplicates, leakage",
        "Find in EMBEDDINGS the likely label errors (out-of-fold probe probabilities, one Ray task a fold, "
        "then cleanlab's confident learning), the near-duplicate groups (cosine of the normalised "
        "embeddings, FAISS, searched in Ray tasks over cells) and the validation rows with a duplicate in "
        "training; write label_issues.parquet, duplicates.parquet, leakage.parquet, audit.json and "
        "audit.html to OUT. train --exclude takes the tables back.",
        "raytl audit s3://bucket/embeddings s3://bucket/audits/v1 --val s3://bucket/val-embeddings",
    ),
    "predict": (
        "classify images or embeddings with a trained model",
        "Classify INPUT (embeddings, or images: a class-per-folder SOURCE or --manifest) with MODEL_DIR.",
        "raytl predict s3://bucket/models/probe s3://bucket/new-images s3://bucket/predictions",
    ),
    "export": (
        "export a trained model as one .pt2 file for plain PyTorch",
        "Export MODEL_DIR's model (a probe or a fine-tuned network) to OUT, one torch.export file (.pt2) "
        "that turns uint8 RGB crops into class scores with plain PyTorch; class names and preprocessing "
        "inside.",
        "raytl export s3://bucket/models/probe model.pt2",
    ),
    "serve": (
        "serve a trained model over HTTP with Ray Serve",
        "Serve MODEL_DIR's model (a probe or a fine-tuned network) on Ray Serve: POST an image's bytes, get "
        '{"label", "score", "scores"} as JSON. Runs until Ctrl-C.',
        "raytl serve s3://bucket/models/probe --replicas 1-4 --port 8000\n"
        "  curl --data-binary @cat.jpg http://127.0.0.1:8000/",
    ),
    "quickstart": (
        "run the main job on a small built-in corpus",
        "Build a small labelled image corpus from scikit-learn's digits and run raytl on it.",
        "raytl quickstart /tmp/raytl-quickstart",
    ),
    "pack": (
        "pack loose image files into WebDataset tar shards",
        "Pack the images under SOURCE (or in --manifest) into OUTPUT_PREFIX/00000.tar, … (WebDataset).",
        "raytl pack s3://bucket/images s3://bucket/shards --shard-size 1000",
    ),
    "list": (
        "list a class-per-folder SOURCE once into a reusable manifest",
        "List SOURCE (class-per-folder) once into MANIFEST (.parquet or .csv), to reuse with --manifest.",
        "raytl list s3://bucket/images s3://bucket/images.parquet",
    ),
    "report": (
        "draw a trained model's HTML report (and PNG figures)",
        "Write MODEL_DIR/report.html (self-contained: confusion matrix, per-class precision and recall, "
        "training curves, PCA of validation embeddings, misclassified images) and the figures as PNG "
        "files in MODEL_DIR/report/. train and finetune write it too.",
        "raytl report s3://bucket/models/probe",
    ),
    "inspect": (
        "describe any raytl output: embeddings, predictions, model",
        "Describe a raytl output: an embeddings or predictions dataset (rows, dimension, model metadata, "
        "label counts, errors) or a model directory.",
        "raytl inspect s3://bucket/embeddings --json",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="raytl", description="Transfer learning at cluster scale on Ray.")
    parser.add_argument("--version", action="version", version=f"raytl {VERSION}")
    add_global_options(parser)
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    runs = {
        "extract": run_extract,
        "train": run_train,
        "curve": run_curve,
        "select": run_select,
        "audit": run_audit,
        "finetune": run_finetune,
        "predict": run_predict,
        "export": run_export,
        "serve": run_serve,
        "pack": run_pack,
        "quickstart": run_quickstart,
        "list": run_list,
        "report": run_report,
        "inspect": run_inspect,
    }
    others = {"quickstart": add_quickstart, "report": add_report, "inspect": add_inspect}
    for verb, (summary, description, example) in COMMANDS.items():
        p = sub.add_parser(
            verb,
            help=summary,
            description=description,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if verb in CONFIGS:
            add_command(p, verb)
        else:
            others[verb](p)
        add_global_options(p, after_verb=True)
        p.set_defaults(run=runs[verb])
    return parser


def add_options(p: argparse.ArgumentParser, config_class: type) -> None:
    """One option per field of a config dataclass that carries help (config.option): its flag, type,
    allowed values and default all come from the field. Options not given stay out of the namespace, so
    that the config's own default applies (options_of)."""
    hints = get_type_hints(config_class)
    # The verb's own options first, then its option groups' in the order the config names them.
    homes = [c.__dict__.get("__annotations__", {}) for c in config_class.__mro__]
    for item in sorted(
        dataclasses.fields(config_class), key=lambda f: next(i for i, h in enumerate(homes) if f.name in h)
    ):
        if "help" not in item.metadata:
            continue  # a positional path (SOURCE, OUTPUT, ...): each verb takes those itself
        kind, default = hints[item.name], item.default
        extra: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS}
        shown = (
            "" if default in (None, False, (), "") or isinstance(default, tuple) else f" (default {default})"
        )
        if kind is bool:
            extra["action"] = "store_false" if default else "store_true"
            shown = ""
        elif isinstance(kind, type) and issubclass(kind, Choice):
            # The allowed values are listed in the help; the config refuses others with raytl's own sentence
            # ("--layer must be one of pool5, fc6, fc7, not 'pool9'."), as the Python API does.
            extra["metavar"] = "{" + ",".join(c.value for c in kind) + "}"
        else:
            extra["type"] = _scalar(kind)
            extra["metavar"] = item.metadata.get("metavar") or {int: "N", float: "X"}.get(
                extra["type"], item.name.upper()
            )
        p.add_argument(flag(item), help=item.metadata["help"] + shown.replace("%", "%%"), **extra)


def _scalar(kind: Any) -> type:
    """int for `int` and `int | None`, float likewise; str for the rest (parsed by the config itself)."""
    args = [a for a in get_args(kind) if a is not type(None)] or [kind]
    return args[0] if len(args) == 1 and args[0] in (int, float) else str


def options_of(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line that are fields of a config dataclass."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


# The paths each verb takes, in order; the one that --manifest replaces is SOURCE (or INPUT).
PATHS = {
    "extract": ("SOURCE", "OUTPUT"),
    "finetune": ("SOURCE", "MODEL_DIR"),
    "predict": ("MODEL_DIR", "INPUT", "OUTPUT"),
    "pack": ("SOURCE", "OUTPUT_PREFIX"),
}
_FIELDS = {"INPUT": "source", "OUTPUT_PREFIX": "output"}  # the config field of a path, when not its name
CONFIGS: dict[str, Any] = {
    "extract": ExtractConfig,
    "train": TrainConfig,
    "curve": CurveConfig,
    "select": SelectConfig,
    "audit": AuditConfig,
    "finetune": FinetuneConfig,
    "predict": PredictConfig,
    "export": ExportConfig,
    "serve": ServeConfig,
    "pack": PackConfig,
    "list": ListConfig,
}


def add_command(p: argparse.ArgumentParser, verb: str) -> None:
    """A verb that runs from a config: its paths (with a usage line for each form) and its options."""
    if verb in ("train", "curve", "select", "audit"):
        p.add_argument("embeddings", metavar="EMBEDDINGS", help="a raytl embeddings dataset (folder or URI)")
    if verb == "train":
        p.add_argument("model_dir", metavar="MODEL_DIR", help="where the model, metrics and checkpoints go")
    if verb == "curve":
        p.add_argument("output", metavar="OUT", help="where curve.json, curve.png and curve.html go")
    if verb == "select":
        p.add_argument("output", metavar="OUT", help="the manifest to write (.parquet or .csv)")
    if verb == "audit":
        p.add_argument(
            "output", metavar="OUT", help="where label_issues.parquet, duplicates.parquet, leakage.parquet, "
            "audit.json and audit.html go",
        )  # fmt: skip
    if verb == "list":
        p.add_argument("source", metavar="SOURCE", help="class-per-folder images (folder or URI)")
        p.add_argument("manifest", metavar="MANIFEST", help="the manifest to write: .parquet or .csv")
    if verb in ("export", "serve"):
        p.add_argument("model_dir", metavar="MODEL_DIR", help="a model written by raytl train or finetune")
    if verb == "export":
        p.add_argument("output", metavar="OUT", help="the file to write (.pt2; a path or URI)")
    if verb in PATHS:
        names = PATHS[verb]
        replaced = next(n for n in names if n in ("SOURCE", "INPUT"))
        plain, listed = " ".join(names), " ".join(n for n in names if n != replaced)
        p.usage = f"raytl {verb} [options] {plain}\n       raytl {verb} [options] --manifest FILE {listed}"
        p.add_argument("paths", nargs="+", metavar="PATH", help=f"{plain}; no {replaced} with --manifest")
    add_options(p, CONFIGS[verb])


def config_of(args: argparse.Namespace, verb: str) -> Any:
    """CLI arguments -> the verb's validated config (jobs/*.py run the same)."""
    paths: dict[str, Any] = {}
    if verb in PATHS:
        names, manifest = PATHS[verb], getattr(args, "manifest", None)
        expected = [n for n in names if n not in ("SOURCE", "INPUT")] if manifest else list(names)
        if len(args.paths) != len(expected):
            usage = " ".join(expected) + (" with --manifest" if manifest else "")
            raise ConfigError(f"{verb} takes {usage}, not {len(args.paths)} paths: {' '.join(args.paths)}.")
        given = dict(zip(expected, args.paths, strict=True))
        paths = {_FIELDS.get(n, n.lower()): given.get(n) for n in names}
    return CONFIGS[verb].create(**options_of(CONFIGS[verb], args), **paths)


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    return config_of(args, "extract")


def run_extract(args: argparse.Namespace) -> int:
    from raytl.commands import extract

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


def train_config(args: argparse.Namespace) -> TrainConfig:
    return config_of(args, "train")  # EMBEDDINGS and MODEL_DIR are fields of their own name


def run_train(args: argparse.Namespace) -> int:
    from raytl.commands import train

    metrics = train.run(train_config(args))
    _model_table("raytl train", metrics, args.model_dir)
    print(
        json.dumps(
            {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "model_dir": args.model_dir}
        )
    )
    return 0


def run_curve(args: argparse.Namespace) -> int:
    from raytl.commands import curve

    result = curve.run(config_of(args, "curve"))
    rows = [(f"k = {p['shots']}", f"{p['accuracy']:.4f} ± {p['accuracy_std']:.4f}") for p in result["points"]]
    logs.summary_table("raytl curve (validation accuracy, labels per class)", rows)
    print(result["sentence"], file=sys.stderr)
    found = result["answer"]
    print(json.dumps({**{k: found[k] for k in ("shots", "labels", "full_accuracy")}, "output": args.output}))
    return 0


def run_select(args: argparse.Namespace) -> int:
    from raytl.commands import select

    summary = select.run(config_of(args, "select"))
    logs.summary_table(
        "raytl select",
        [(name, summary[name]) for name in ("selected", "unlabelled", "strategy", "output")],
    )
    print(json.dumps(summary))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from raytl.commands import audit

    result = audit.run(config_of(args, "audit"))
    found = {name: result[name] for name in ("labels", "duplicates", "leakage") if name in result}
    rows: list[tuple[str, Any]] = []
    if "labels" in found:
        rows += [("likely label errors", f"{found['labels']['issues']} of {found['labels']['labelled']}")]
    if "duplicates" in found:
        d = found["duplicates"]
        rows += [("duplicate groups", d["groups"]), ("rows in them", d["rows_in_groups"]),
                 ("groups across the split", d["groups_crossing_splits"])]  # fmt: skip
    if "leakage" in found:
        leak = found["leakage"]
        rows += [
            ("validation rows leaked", f"{leak['leaked']} of {leak['validation_rows']}"),
            ("accuracy", leak["accuracy"]),
            ("accuracy without leaked", leak["accuracy_without_leaked"]),
        ]
    logs.summary_table("raytl audit", [*rows, ("output", args.output)])
    counts = {
        "label_issues": found.get("labels", {}).get("issues"),
        "duplicate_groups": found.get("duplicates", {}).get("groups"),
        "leaked": found.get("leakage", {}).get("leaked"),
    }
    print(json.dumps({**counts, "output": args.output}))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from raytl.commands import finetune

    metrics = finetune.run(config_of(args, "finetune"))
    _model_table("raytl finetune", metrics, args.paths[-1])
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "best_epoch", "resumed_at_epochs")}
    print(json.dumps({**summary, "model_dir": args.paths[-1]}))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from raytl.commands import predict

    summary = predict.run(config_of(args, "predict"))
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


def run_export(args: argparse.Namespace) -> int:
    from raytl.commands import export

    summary = export.run(config_of(args, "export"))
    logs.summary_table(
        "raytl export",
        [
            ("classes", len(summary["classes"])),
            ("input", summary["input"]),
            ("scores", summary["scores"]),
            ("size", f"{summary['bytes'] / 1e6:.1f} MB"),
            ("file", summary["output"]),
        ],
    )
    print(json.dumps({k: summary[k] for k in ("output", "bytes", "classes")}))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve as ray_serve

    from raytl.commands import serve

    summary = serve.run(config_of(args, "serve"))
    logs.summary_table(
        "raytl serve",
        [(k, summary[k]) for k in ("url", "model_dir", "device", "replicas", "max_batch_size")],
    )
    print(json.dumps({k: summary[k] for k in ("url", "name")}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.delete(summary["name"])
    return 0


def _model_table(title: str, metrics: dict[str, Any], model_dir: str) -> None:
    from raytl.modeling.model_dir import REPORT_FILE  # here: `raytl --help` loads no torch

    page = storage.join(model_dir, REPORT_FILE)
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
    p.add_argument(
        "workdir", nargs="?", default="raytl-quickstart", help="where to write (default ./raytl-quickstart)"
    )


def run_quickstart(args: argparse.Namespace) -> int:
    from raytl.commands import quickstart

    return quickstart.run(args.workdir)


def run_pack(args: argparse.Namespace) -> int:
    from raytl.commands import pack

    print(json.dumps(pack.run(config_of(args, "pack"))))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from raytl.commands import pack

    print(json.dumps(pack.write_manifest(config_of(args, "list"))))
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model written by raytl train or raytl finetune")


def run_report(args: argparse.Namespace) -> int:
    from raytl.reporting import report

    print(json.dumps({"report": storage.redact(report.write(args.model_dir))}))
    return 0


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT of extract or predict, or a MODEL_DIR")
    p.add_argument("--json", action="store_true", help="the description as one JSON object")


def run_inspect(args: argparse.Namespace) -> int:
    from raytl.commands import inspect

    found = inspect.run(args.output)
    print(json.dumps(found, indent=2) if args.json else inspect.text(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
