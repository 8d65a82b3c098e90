"""The `raytl` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from raytl import storage
from raytl.config import ConfigError, ExtractConfig, Layer, Pool, Precision
from raytl.models import WeightsError

# Errors whose message is already one sentence for the user; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, storage.StorageError, WeightsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"raytl: error: {storage.redact(str(exc))}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytl", description="Transfer learning at cluster scale on Ray.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_extract(sub.add_parser("extract", help="embed an image corpus with VGG16 and write Parquet"))
    add_quickstart(sub.add_parser("quickstart", help="run the main job on a small built-in corpus"))
    return parser


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
    p.add_argument("--rows-per-file", type=int, default=8192, help="rows per Parquet part file")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images go to _errors")
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
    return ExtractConfig.create(
        source=source,
        output=output,
        manifest=args.manifest,
        weights=args.weights,
        layer=args.layer,
        pool=args.pool,
        precision=args.precision,
        image_size=args.image_size,
        resize_size=args.resize_size,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        decode_batch=args.decode_batch,
        rows_per_file=args.rows_per_file,
        max_pixels=args.max_pixels,
        seed=args.seed,
        overwrite=args.overwrite,
    )


def run_extract(args: argparse.Namespace) -> int:
    from raytl import extract

    summary = extract.run(extract_config(args))
    print(json.dumps({k: summary[k] for k in ("seen", "embedded", "failed", "images_per_second", "output")}))
    return 0


def add_quickstart(p: argparse.ArgumentParser) -> None:
    p.description = "Build a small labelled image corpus from scikit-learn's digits and run raytl on it."
    p.add_argument(
        "workdir", nargs="?", default="raytl-quickstart", help="where to write (default ./raytl-quickstart)"
    )
    p.set_defaults(run=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from raytl import quickstart

    return quickstart.run(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
