"""raytl: transfer learning at cluster scale on Ray.

The Python API runs what the CLI runs, with the CLI's options as keywords (`--image-size 64` is
`image_size=64`); each call joins the Ray of `RAY_ADDRESS` (or `ray.init()` done before), else starts one:

    import raytl
    raytl.extract("s3://bucket/images", "s3://bucket/embeddings", image_size=224)
    raytl.train("s3://bucket/embeddings", "s3://bucket/models/probe", head="svm")
    raytl.curve("s3://bucket/embeddings", "s3://bucket/curves/probe")  # accuracy against labels per class
    raytl.select("s3://bucket/embeddings", "next.csv", budget=500)  # which unlabelled images to label next
    raytl.audit("s3://bucket/embeddings", "s3://bucket/audits/v1")  # wrong labels, duplicates, leakage
    raytl.predict("s3://bucket/models/probe", "s3://bucket/new", "s3://bucket/predictions")
    raytl.finetune("s3://bucket/images", "s3://bucket/models/ft", epochs=5)
    raytl.export("s3://bucket/models/ft", "model.pt2")  # for plain PyTorch, raytl not needed
    raytl.serve("s3://bucket/models/ft", replicas=2)  # HTTP on Ray Serve: POST an image, get JSON
    raytl.load("s3://bucket/models/ft").predict([open("cat.jpg", "rb").read()])  # in this process, no Ray
    rows = raytl.embed(ray.data.read_images("s3://bucket/images"))  # a Ray Dataset with `embedding`

Nothing heavy is imported until a function runs (`import raytl` loads neither torch nor Ray), and bad
options fail with one ConfigError sentence before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from raytl import config as _config
from raytl.version import VERSION as __version__  # noqa: F401 (the package's version, `raytl.__version__`)

F = TypeVar("F", bound=Callable[..., Any])


def _options(config: type, **renamed: str) -> Callable[[F], F]:
    """Give an API function the keywords of its config's options, from the config itself (their one home):
    `inspect.signature`, `help()`, IDEs and Tab completion show them with their defaults and help texts.
    `renamed`: a positional argument that fills a differently named field (predict's `input` is `source`)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        given = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in given} | set(renamed.values())
        options = [f for f in dataclasses.fields(config) if "help" in f.metadata and f.name not in taken]
        keywords = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=_plain(f.default), annotation=f.type
            )
            for f in options
        ]
        function.__signature__ = signature.replace(parameters=[*given, *keywords])  # type: ignore[attr-defined]
        lines = [f"    {f.name}={_plain(f.default)!r}: {f.metadata['help']}" for f in options]
        function.__doc__ = f"{function.__doc__}\n\nOptions (the CLI's, as keywords):\n" + "\n".join(lines)
        return function

    return decorate


def _plain(default: Any) -> Any:
    """A default as a caller passes it: a choice's string (`device="auto"`), else the value."""
    return str(default) if isinstance(default, _config.Choice) else default


@_options(_config.ExtractConfig)
def extract(source: str | None, output: str, **options: Any) -> dict[str, Any]:
    """`raytl extract SOURCE OUTPUT`: embed every image under SOURCE (None with manifest=...) into OUTPUT
    as Parquet; returns the summary (also OUTPUT/_summary.json)."""
    from raytl.config import ExtractConfig

    config = ExtractConfig.create(source=source, output=output, **options)
    from raytl.commands import extract as command

    return command.run(config)


@_options(_config.TrainConfig)
def train(embeddings: str, model_dir: str, **options: Any) -> dict[str, Any]:
    """`raytl train EMBEDDINGS MODEL_DIR`: fit a linear probe; returns the metrics (also in MODEL_DIR)."""
    from raytl.config import TrainConfig

    config = TrainConfig.create(embeddings=embeddings, model_dir=model_dir, **options)
    from raytl.commands import train as command

    return command.run(config)


@_options(_config.CurveConfig)
def curve(embeddings: str, output: str, **options: Any) -> dict[str, Any]:
    """`raytl curve EMBEDDINGS OUT`: the probe's few-shot learning curve (accuracy against labels per class);
    returns it (also OUT/curve.json)."""
    from raytl.config import CurveConfig

    config = CurveConfig.create(embeddings=embeddings, output=output, **options)
    from raytl.commands import curve as command

    return command.run(config)


@_options(_config.SelectConfig)
def select(embeddings: str, output: str, **options: Any) -> dict[str, Any]:
    """`raytl select EMBEDDINGS OUT --budget N`: which unlabelled rows to label next, written to OUT as a
    manifest (path, rank, score, strategy); returns the summary."""
    from raytl.config import SelectConfig

    config = SelectConfig.create(embeddings=embeddings, output=output, **options)
    from raytl.commands import select as command

    return command.run(config)


@_options(_config.AuditConfig)
def audit(embeddings: str, output: str, **options: Any) -> dict[str, Any]:
    """`raytl audit EMBEDDINGS OUT`: likely label errors, near-duplicate groups and train/validation leakage,
    written to OUT as Parquet tables and audit.html; returns the summary (also OUT/audit.json)."""
    from raytl.config import AuditConfig

    config = AuditConfig.create(embeddings=embeddings, output=output, **options)
    from raytl.commands import audit as command

    return command.run(config)


@_options(_config.FinetuneConfig)
def finetune(source: str | None, model_dir: str, **options: Any) -> dict[str, Any]:
    """`raytl finetune SOURCE MODEL_DIR`: fine-tune VGG16 (or `model=`) with a new head (resumes a run in
    MODEL_DIR); returns the metrics."""
    from raytl.config import FinetuneConfig

    config = FinetuneConfig.create(source=source, model_dir=model_dir, **options)
    from raytl.commands import finetune as command

    return command.run(config)


@_options(_config.PredictConfig, input="source")
def predict(model_dir: str, input: str | None, output: str, **options: Any) -> dict[str, Any]:
    """`raytl predict MODEL_DIR INPUT OUTPUT`: classify embeddings or images (None with manifest=...);
    returns the summary (also OUTPUT/_summary.json)."""
    from raytl.config import PredictConfig

    config = PredictConfig.create(model_dir=model_dir, source=input, output=output, **options)
    from raytl.commands import predict as command

    return command.run(config)


@_options(_config.ExportConfig)
def export(model_dir: str, output: str, **options: Any) -> dict[str, Any]:
    """`raytl export MODEL_DIR OUT`: the model as one torch.export file (.pt2) that plain PyTorch loads;
    returns the summary."""
    from raytl.config import ExportConfig

    config = ExportConfig.create(model_dir=model_dir, output=output, **options)
    from raytl.commands import export as command

    return command.run(config)


@_options(_config.ServeConfig)
def serve(model_dir: str, **options: Any) -> dict[str, Any]:
    """`raytl serve MODEL_DIR`: deploy the model on Ray Serve (HTTP: POST an image, get JSON) and return
    once it is ready, with its URL; it serves until `ray.serve.delete(name)` or the end of Ray."""
    from raytl.config import ServeConfig

    config = ServeConfig.create(model_dir=model_dir, **options)
    from raytl.commands import serve as command

    return command.run(config)


@_options(_config.LoadConfig)
def load(model_dir: str, **options: Any) -> Any:
    """A trained MODEL_DIR (a probe or a fine-tuned network) in this process, no Ray: a Predictor whose
    `predict(images)` takes encoded files (bytes), uint8 arrays, PIL images or {"bytes": ...} dicts and
    returns one {"label", "score", "scores"} an image, as `raytl predict` and `raytl serve` score them."""
    config = _config.LoadConfig.create(model_dir=model_dir, **options)
    from raytl.modeling.predictor import Predictor

    return Predictor.load(config)


@_options(_config.EmbedConfig)
def embed(dataset: Any, **options: Any) -> Any:
    """A Ray Dataset you already have (e.g. `ray.data.read_images`, `ray.data.from_huggingface`) -> a lazy
    Ray Dataset of the same rows with `embedding` (float32, extract's preprocessing and backbone) and
    `error` ("" when embedded; the reason, and a NaN embedding, for a cell that is not a usable image). The
    images column (`column=`, default "image") is dropped. Options: extract's backbone options (model,
    weights, layer, pool, precision, image_size, resize_size, batch_size, num_actors, device, compile,
    max_pixels, seed)."""
    from raytl.config import embed_config

    config = embed_config(**options)
    from raytl.cluster import session
    from raytl.cluster.embedder import embed_dataset

    session.init_ray()
    return embed_dataset(dataset, config)
