"""MODEL_DIR, the one home of its contract: the name of every file raytl writes there, how a run starts,
resumes or is replaced there (`prepare`), and model.json as typed records (`ModelInfo`, `Backbone`) with
every default set once.

A MODEL_DIR may come from elsewhere or be edited by hand: every model.json field is checked when it is read,
each bad one named in the one sentence that refuses it, and a model that is not a torchvision classification
model is refused by name (nothing a MODEL_DIR names is downloaded to find out what it is)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from raytl.config import Decode, Layer, Pool, Precision, Tracking
from raytl.errors import ConfigError, StorageError
from raytl.files import storage
from raytl.vision.models import IMAGENET_MEAN, IMAGENET_STD, VGG16, preset
from raytl.vision.preprocess import INTERPOLATIONS

# --- what raytl writes in a MODEL_DIR -------------------------------------------------------------------

MODEL_FILE = "model.pt"  # the head's tensors: mean, std, weight, bias
MODEL_JSON = "model.json"  # ModelInfo, and the classes
METRICS_FILE = "metrics.json"
# --kernel rbf: the fitted scikit-learn pipeline in skops' format, which loads only the types it names (no
# pickle: a MODEL_DIR from elsewhere, or a `kernel` flipped in model.json, cannot run code in predict).
KERNEL_FILE = "kernel.skops"
BACKBONE_FILE = "backbone.pt"  # finetune: the fine-tuned backbone the head needs, as a torchvision state_dict
REPORT_FILE = "report.html"
FIGURES_DIR = "report"  # MODEL_DIR/report/<figure>.png beside the page
# A sample of the validation rows (path, label, predicted_label, score, embedding), written by train and
# finetune: the report's PCA and misclassified images come from it.
VALIDATION_FILE = "validation.parquet"
TRAIN_RUN = "train.json"  # the options of a probe's run: a rerun with the same ones resumes it
FINETUNE_RUN = "finetune.json"  # the same for a fine-tuning run
RUNS_DIR = "train"  # Ray Train's run (its checkpoints) in MODEL_DIR/train
# Inside each Ray Train checkpoint: the probe's state, the network's.
PROBE_CHECKPOINT = "head.pt"
NETWORK_CHECKPOINT = "state.pt"
# Everything above that sits in MODEL_DIR: what --overwrite removes, whichever verb wrote it.
WRITTEN = (MODEL_FILE, MODEL_JSON, METRICS_FILE, KERNEL_FILE, BACKBONE_FILE, REPORT_FILE, FIGURES_DIR,
           VALIDATION_FILE, TRAIN_RUN, FINETUNE_RUN, RUNS_DIR)  # fmt: skip


def named(model_dir: str) -> str:
    """How sentences name a MODEL_DIR."""
    return f"MODEL_DIR {storage.redact(model_dir)}"


def read_files(model_dir: str, *names: str, finished: bool = False) -> list[Any]:
    """MODEL_DIR's files `names` (JSON ones parsed); any of them missing is one sentence naming them all."""
    try:
        return [
            (storage.read_json if name.endswith(".json") else storage.read_bytes)(
                storage.join(model_dir, name)
            )
            for name in names
        ]
    except FileNotFoundError:
        kind = "finished raytl model" if finished else "raytl model"
        raise StorageError(f"{named(model_dir)} holds no {kind} ({' and '.join(names)}).") from None


def write_json(model_dir: str, name: str, data: dict) -> None:
    """metrics.json and friends: indented, numpy scalars as floats."""
    storage.write_bytes(storage.join(model_dir, name), json.dumps(data, indent=2, default=float).encode())


# --- a run in MODEL_DIR: a new one, the unfinished one resumed, or a finished model kept ------------------

# The options that do not change what a run trains: how hard to try, and where it is tracked.
_NOT_RUN_OPTIONS = ("overwrite", "max_failures", *(f.name for f in fields(Tracking)))


def run_options(config: Any) -> dict[str, Any]:
    """What a run in MODEL_DIR is recorded by: its config, less the options that change nothing trained."""
    options = json.loads(config.to_json())
    for name in _NOT_RUN_OPTIONS:
        options.pop(name, None)
    return options


def prepare(
    model_dir: str, options: dict[str, Any], run_file: str, overwrite: bool, what: str,
    option_name: Callable[[str], str] = str, recorded_defaults: dict[str, Any] | None = None,
    record: bool = True,
) -> bool:  # fmt: skip
    """Start a run in MODEL_DIR (its options written to `run_file`), or resume the unfinished one with the
    same options (True): an interrupted run (Ctrl-C, a lost driver) continues from its last checkpoint, which
    Ray Train restores from MODEL_DIR/train. A finished model or another run's files are never replaced
    without --overwrite, which removes exactly what raytl writes there (WRITTEN), whichever verb wrote it.
    record=False leaves the recording to `record_run`, once the inputs are checked (a run refused for its
    data leaves nothing behind)."""
    fs, root = storage.filesystem(model_dir)
    root = root.rstrip("/")
    with storage.guarded(f"prepare {named(model_dir)}"):
        held = fs.exists(root) and bool(fs.ls(root))
        if held and overwrite:
            for name in WRITTEN:
                if fs.exists(f"{root}/{name}"):
                    fs.rm(f"{root}/{name}", recursive=True)
        elif held:
            if fs.exists(f"{root}/{MODEL_JSON}"):
                raise StorageError(
                    f"{named(model_dir)} already holds a finished model; pass --overwrite to train a new one "
                    "there or choose another MODEL_DIR."
                )
            if not fs.exists(f"{root}/{run_file}"):
                raise StorageError(
                    f"{named(model_dir)} is not empty and holds no raytl {what} run; choose another "
                    "MODEL_DIR or pass --overwrite."
                )
            stored = {**(recorded_defaults or {}), **storage.read_json(storage.join(model_dir, run_file))}
            changed = [k for k in options if stored.get(k) != options[k]]
            if changed:
                name = changed[0]
                raise ConfigError(
                    f"{named(model_dir)} holds an unfinished run with other options ({option_name(name)} was "
                    f"{stored.get(name)!r}, now {options[name]!r}); rerun with the same options to resume "
                    "it, or pass --overwrite to start over."
                )
            return True
        if record:
            record_run(model_dir, run_file, options)
    return False


def record_run(model_dir: str, run_file: str, options: dict[str, Any]) -> None:
    """Write the run's options to MODEL_DIR/run_file: from here on, the same command resumes it."""
    storage.write_bytes(storage.join(model_dir, run_file), json.dumps(options, indent=2).encode())


# --- model.json ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """How a model's embeddings are made from an image: the network, its weights and the preprocessing."""

    model: str  # a torchvision classification model's name (vgg16 by default)
    weights: str  # the weights id: `torchvision:...`, `random:seed=N`, `URI#sha256:...`
    layer: Layer  # VGG16's; POOL5 for every other model (the input of its classifier layer)
    pool: Pool  # VGG16's pool5 pooling; AVG for every other model
    dim: int
    image_size: int  # the centre crop
    resize: int  # the shorter side before the crop
    interpolation: str  # of the resize, a torchvision InterpolationMode value
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: Precision
    decode: Decode
    schemes: tuple[str, ...] | None  # the filesystems the images' paths may be on (None: not recorded)


def parse_backbone(raw: Any, where: str) -> Backbone:
    """model.json's `backbone` -> Backbone; StorageError naming every bad field of `where`'s model.json."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise StorageError(f"{where} has a damaged model.json (no `backbone` record); train the model again.")
    pre = raw.get("preprocessing")
    if not isinstance(pre, dict):
        problems.append("backbone.preprocessing is missing")
        pre = {}
    model = _model(raw.get("model", VGG16), problems)
    layer, pool = Layer.POOL5, Pool.AVG
    if model == VGG16:
        layer = _choice(Layer, raw.get("layer"), "backbone.layer", problems) or layer
        pool = _choice(Pool, raw.get("pool") or "avg", "backbone.pool", problems) or pool
    weights = raw.get("weights")
    if not isinstance(weights, str) or not weights:
        problems.append(f"backbone.weights is {weights!r}, not a weights id")
    schemes = raw.get("schemes")
    if schemes is not None and not (isinstance(schemes, list) and all(isinstance(s, str) for s in schemes)):
        problems.append(f"backbone.schemes is {schemes!r}, not a list of URI schemes")
        schemes = None
    interpolation = pre.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        allowed = ", ".join(INTERPOLATIONS)
        problems.append(f"backbone.preprocessing.interpolation is {interpolation!r}, not one of {allowed}")
    record = Backbone(
        model=model,
        weights=weights if isinstance(weights, str) else "",
        layer=layer,
        pool=pool,
        dim=_count(raw.get("dim"), "backbone.dim", problems),
        image_size=_count(raw.get("image_size"), "backbone.image_size", problems),
        resize=_count(pre.get("resize"), "backbone.preprocessing.resize", problems),
        interpolation=str(interpolation),
        mean=_triple(pre.get("mean", list(IMAGENET_MEAN)), "backbone.preprocessing.mean", problems, 0.0),
        std=_triple(pre.get("std", list(IMAGENET_STD)), "backbone.preprocessing.std", problems, None),
        # what extract was asked (`precision_option` where auto became bf16 or fp32): predict's actors
        # resolve auto on their own hardware as extract's did on theirs
        precision=_choice(
            Precision,
            raw.get("precision_option") or raw.get("precision", "auto"),
            "backbone.precision",
            problems,
        )
        or Precision.AUTO,
        decode=_choice(Decode, pre.get("decode", "cpu"), "backbone.preprocessing.decode", problems)
        or Decode.CPU,
        schemes=tuple(schemes) if schemes is not None else None,
    )
    if problems:
        raise StorageError(f"{where} has a damaged model.json: {'; '.join(problems)}; train the model again.")
    return record


def _model(value: Any, problems: list[str]) -> str:
    if not isinstance(value, str):
        problems.append(f"backbone.model is {value!r}, not a model name")
        return VGG16
    try:
        preset(value)  # the registry's names only: never a download
    except ConfigError:
        problems.append(f"backbone.model is {value!r}, not a torchvision classification model or timm/NAME")
    return value


def _count(value: Any, field: str, problems: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    problems.append(
        f"{field} is {value!r}, not a positive integer" if value is not None else f"{field} is missing"
    )
    return 1


def _triple(value: Any, field: str, problems: list[str], low: float | None) -> tuple[float, float, float]:
    """Three finite numbers, one per RGB channel (above 0 where low is None: a divisor)."""
    ok = (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and (low is not None or all(v > 0 for v in value))
    )
    if not ok:
        what = "three finite numbers" if low is not None else "three positive numbers"
        problems.append(f"{field} is {value!r}, not {what} (one per RGB channel)")
        return (1.0, 1.0, 1.0)
    return (float(value[0]), float(value[1]), float(value[2]))


def _choice(cls: Any, value: Any, field: str, problems: list[str]) -> Any:
    try:
        return cls.parse(value, field)
    except (ConfigError, TypeError):
        allowed = ", ".join(c.value for c in cls)
        problems.append(f"{field} is {value!r}, not one of {allowed}")
        return None


@dataclass(frozen=True)
class ModelInfo:
    """model.json, less the classes (the Model holds them): what a model is and how it was trained."""

    kind: str  # "probe" (train) or "finetune"
    head: str  # probe: logreg | svm (its loss); finetune: avg | fc7 (the layer the head reads)
    backbone: Backbone  # checked; `recorded_backbone` is the record as written (the embeddings' metadata)
    recorded_backbone: dict[str, Any]
    kernel: str = "linear"  # probe: linear | rbf (scikit-learn's SVC in KERNEL_FILE)
    backend: str = "ray"  # probe: ray | sklearn
    embeddings: str | None = None  # probe: the EMBEDDINGS it was trained on
    l2: float | None = None  # probe: the penalty its loss added
    initial_weights: str | None = None  # finetune: the weights id it started from
    best_epoch: int | None = None  # finetune: the epoch kept
    config: dict[str, Any] | None = None  # finetune: its options
    raytl_version: str = ""

    @property
    def svm(self) -> bool:
        """Scores are SVM margins (not softmax probabilities)."""
        return self.head == "svm"

    def to_json(self, classes: list[str]) -> dict[str, Any]:
        """model.json's record (keys left out where a field does not apply to the kind)."""
        record: dict[str, Any] = {"kind": self.kind, "head": self.head}
        if self.kind == "probe":
            record.update(kernel=self.kernel, backend=self.backend)
        record["backbone"] = self.recorded_backbone
        optional = {"embeddings": self.embeddings, "l2": self.l2, "initial_weights": self.initial_weights,
                    "best_epoch": self.best_epoch, "config": self.config}  # fmt: skip
        record.update({k: v for k, v in optional.items() if v is not None})
        return {**record, "raytl_version": self.raytl_version, "classes": classes}

    @classmethod
    def parse(cls, raw: Any, where: str) -> ModelInfo:
        """model.json -> ModelInfo; one StorageError sentence naming every bad field of `where`'s."""
        if not isinstance(raw, dict):
            raise StorageError(
                f"{where} has a damaged {MODEL_JSON} (not a JSON object); train the model again."
            )
        backbone = parse_backbone(raw.get("backbone"), where)
        problems: list[str] = []
        kind = _one_of(raw.get("kind", "probe"), ("probe", "finetune"), "kind", problems)
        heads = ("logreg", "svm") if kind == "probe" else ("avg", "fc7")
        head = _one_of(raw.get("head", heads[0]), heads, "head", problems)
        kernel = _one_of(raw.get("kernel", "linear"), ("linear", "rbf"), "kernel", problems)
        backend = _one_of(raw.get("backend", "ray"), ("ray", "sklearn"), "backend", problems)
        l2 = raw.get("l2")
        if l2 is not None and not (isinstance(l2, (int, float)) and not isinstance(l2, bool) and l2 >= 0):
            problems.append(f"l2 is {l2!r}, not a number >= 0")
        if problems:
            raise StorageError(
                f"{where} has a damaged {MODEL_JSON}: {'; '.join(problems)}; train the model again."
            )
        recorded = {name: raw.get(name) for name in ("embeddings", "initial_weights", "best_epoch", "config")}
        return cls(
            kind=kind, head=head, backbone=backbone, recorded_backbone=raw["backbone"], kernel=kernel,
            backend=backend, l2=l2, raytl_version=str(raw.get("raytl_version", "")), **recorded,
        )  # fmt: skip


def _one_of(value: Any, allowed: tuple[str, ...], field: str, problems: list[str]) -> str:
    if value in allowed:
        return str(value)
    problems.append(f"{field} is {value!r}, not one of {', '.join(allowed)}")
    return allowed[0]


def classes_of(raw: Any, where: str) -> list[str]:
    """model.json's classes: the names of two or more classes, in the order of the head's outputs."""
    classes = raw.get("classes") if isinstance(raw, dict) else None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise StorageError(f"{where} has a damaged {MODEL_JSON} (no list of classes); train again.")
    return classes


def info_of(recorded_backbone: dict[str, Any], **fields: Any) -> ModelInfo:
    """A new model's ModelInfo, its backbone record (the embeddings' metadata) checked as a reader will."""
    checked = parse_backbone(recorded_backbone, "the backbone record")
    return ModelInfo(backbone=checked, recorded_backbone=recorded_backbone, **fields)
