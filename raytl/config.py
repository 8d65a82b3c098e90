"""Typed, frozen job configs, validated before any Ray work starts."""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, get_type_hints

from raytl.errors import ConfigError, redact

if TYPE_CHECKING:
    from typing import Self  # Python 3.11's; only annotations name it (raytl runs on 3.10)


def option(default: Any, help: str, flag: str | None = None, metavar: str | None = None) -> Any:
    """A config field that is also a command-line option (and a keyword of the Python API): its default
    and help live here only; the CLI's parsers are made from them (cli.add_options). `flag`: when the
    option is not --the-field-name (e.g. --no-augment); `metavar`: how --help shows its value."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


class Choice(str, enum.Enum):
    """An option with a fixed set of string values."""

    @classmethod
    def parse(cls, value: str | Choice, option: str) -> Self:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(c.value for c in cls)
            raise ConfigError(f"{option} must be one of {allowed}, not {value!r}.") from None

    def __str__(self) -> str:
        return self.value


class Layer(Choice):
    POOL5 = "pool5"  # last pooling layer, 512 x (size/32)^2
    FC6 = "fc6"  # first fully connected layer after ReLU, 4096
    FC7 = "fc7"  # second fully connected layer after ReLU, 4096


class Pool(Choice):
    AVG = "avg"  # mean over the spatial grid: 512-d
    MAX = "max"  # max over the spatial grid: 512-d
    FLATTEN = "flatten"  # the whole pool5 map: 25088-d at 224 px, the textbook h


class Precision(Choice):
    AUTO = "auto"  # bf16 on CUDA and on CPUs with AMX / AVX-512-BF16, else fp32
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Decode(Choice):
    CPU = "cpu"  # Pillow in CPU tasks: exactly torchvision's preprocessing
    GPU = "gpu"  # JPEGs decoded, resized and cropped in the model actors: nvJPEG on CUDA (torchvision on CPU)


class Device(Choice):
    AUTO = "auto"  # GPUs when the cluster has some up at start, else CPU
    CUDA = "cuda"  # ask Ray for GPUs even when none is up: an autoscaling cluster adds GPU nodes
    CPU = "cpu"  # never ask for a GPU


MODEL = (
    "the backbone: vgg16, or any torchvision classification model by name (resnet50, convnext_tiny, "
    "efficientnet_v2_s, vit_b_16, ...); its features are the input of its final classifier layer"
)
DEVICE = (
    "auto: GPUs if the cluster has some up at start; cuda: ask Ray for GPUs even when none is up (an "
    "autoscaler adds GPU nodes: use it on clusters that scale GPUs from zero); cpu: never"
)
NUM_ACTORS = (
    "model actors: N, or MIN-MAX for a pool that grows while there is work and room (default: from one "
    "up to as many as Ray can place with GPUs, one on CPU)"
)
WORKERS = (
    "Ray Train workers, one GPU each where the cluster has GPUs: N, or MIN-MAX to train on as many as "
    "Ray can place, resized from the last checkpoint as nodes come and go (Ray Train's elastic training)"
)
MLFLOW_URI = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI; neither: not tracked); needs raytl[mlflow]"
MLFLOW_RUN_NAME = "MLflow run name (default: MODEL_DIR's last part)"
ALLOW_SCHEMES = (
    "schemes a manifest may name besides its own filesystem's, e.g. file,https (default: none; an S3 "
    "manifest names S3 objects only)"
)


class Validated:
    """A config built from options by `create`: string choices parsed, `prepare`d, the PATHS made absolute,
    then `validate`d; ConfigError with one clear sentence on the first bad value."""

    # The fields that name files or URIs, made absolute: `class X(Validated, paths=(...))`.
    PATHS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, paths: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.PATHS = paths

    @classmethod
    def create(cls, **options: Any) -> Self:
        """Parse string choices and validate every value; raises ConfigError with one clear sentence."""
        config = cls(**absolute(cls.prepare(parsed(cls, options)), *cls.PATHS))
        config.validate()
        return config

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options whose values need more than their type to parse; by default, none."""
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""


@dataclass(frozen=True)
class ExtractConfig(Validated, paths=("source", "output", "manifest")):
    """Everything `raytl extract` needs; build with `ExtractConfig.create` to validate."""

    source: str
    output: str
    manifest: str | None = option(None, "CSV or Parquet file with columns path and optional label")
    model: str = option("vgg16", MODEL)
    weights: str = option(
        "imagenet", "imagenet (the model's default weights) | random | path or URI of a state_dict"
    )
    layer: Layer = option(Layer.POOL5, "vgg16's layer: pool5 (512 x grid), fc6 or fc7 (4096, after ReLU)")
    pool: Pool = option(
        Pool.AVG, "vgg16's pool5 pooling over the grid (flatten: the whole 25088-d map at 224 px)"
    )
    precision: Precision = option(Precision.AUTO, "auto: bf16 on CUDA and on AMX / AVX-512-BF16 CPUs")
    image_size: int | None = option(
        None, "the centre crop in pixels (default: the model's weights', 224 for vgg16)"
    )
    resize_size: int | None = option(
        None, "shorter side before the crop (default: the crop times the weights' ratio, 256/224 for vgg16)"
    )
    batch_size: int | None = option(None, "images per forward pass (default 256 per GPU, 32 on CPU)")
    num_actors: int | tuple[int, int] | None = option(None, NUM_ACTORS)
    device: Device = option(Device.AUTO, DEVICE)
    decode_batch: int = option(32, "files fetched and decoded per CPU task call")
    # gpu: when CPU JPEG decoding cannot keep GPUs busy (H100: ~10x a core's rate)
    decode: Decode = option(
        Decode.CPU, "cpu: Pillow in CPU tasks; gpu: JPEGs decoded by nvJPEG in the actors"
    )
    compile: bool = option(False, "torch.compile the model (minutes of warm-up; pays on long GPU runs)")
    rows_per_file: int | None = option(
        None, "rows per Parquet part (default: about a minute of work on CPU, 8192 on GPU clusters)"
    )
    max_pixels: int = option(89_478_485, "larger images go to _errors (decompression bombs; Pillow's limit)")
    max_errors: int | float | None = option(
        None, "stop when more files than this count (100) or share (0.01, 1%%) are broken"
    )
    label_field: str | None = option(
        None, "tar shards: cls | txt | json:FIELD (default: KEY.cls when present)"
    )
    allow_schemes: tuple[str, ...] = option((), ALLOW_SCHEMES)
    max_failures: int = option(
        3, "times a run that loses a node or a model actor resumes from what OUTPUT holds before it fails"
    )
    seed: int = option(0, "seeds --weights random")
    overwrite: bool = option(False, "replace raytl embeddings already in OUTPUT")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The default sizes of vgg16's weights; --max-errors as a count or a share."""
        options = _vgg16_size(options)
        options["max_errors"] = parse_max_errors(options.get("max_errors"))
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        _check_paths(self, "output", "embeddings")
        check_backbone(self)
        _positive_fields(self, "decode_batch", "rows_per_file")
        _positive("--max-failures", self.max_failures, low=0)
        _check_label_field(self.label_field)

    def error_limit(self, files: int) -> int | None:
        """How many of `files` may fail before the run stops (None: no limit)."""
        if self.max_errors is None:
            return None
        if isinstance(self.max_errors, float):
            return math.floor(self.max_errors * files)
        return self.max_errors

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop (once `models.resolved` has set the image size)."""
        return self.resize_size or round((self.image_size or 224) * 256 / 224)

    def to_json(self) -> str:
        """The whole config as JSON (passwords in URIs and secret keys redacted), for logs and summaries."""
        return _json(self)


# What `raytl.embed(dataset, ...)` takes besides the dataset: extract's backbone and preprocessing options
# (the same fields, defaults and help: made from ExtractConfig's), and the column that holds the images.
EMBED_OPTIONS = (
    "model", "weights", "layer", "pool", "precision", "image_size", "resize_size", "batch_size", "num_actors",
    "device", "compile", "max_pixels", "seed",
)  # fmt: skip
_IMAGE_COLUMN = (
    "the column of images: encoded files (bytes), uint8 arrays (H, W) or (H, W, C), PIL images, or "
    "{'bytes': ...} dicts (Hugging Face's Image feature)"
)
EmbedConfig = make_dataclass(
    "EmbedConfig",
    [("column", str, option("image", _IMAGE_COLUMN))]
    + [
        (f.name, f.type, field(default=f.default, metadata=f.metadata))
        for f in fields(ExtractConfig)
        if f.name in EMBED_OPTIONS
    ],  # fmt: skip
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "What raytl.embed needs: extract's backbone options and the image column.",
        "resize": property(lambda self: self.resize_size or round((self.image_size or 224) * 256 / 224)),
    },
)


def embed_config(**options: Any) -> Any:
    """A validated EmbedConfig (one ConfigError sentence for a bad value or an unknown option)."""
    config = EmbedConfig(**_vgg16_size(parsed(EmbedConfig, options)))
    if not config.column:
        raise ConfigError("column is empty: name the dataset's column of images.")
    check_backbone(config)
    return config


def _vgg16_size(options: dict[str, Any]) -> dict[str, Any]:
    """vgg16's crop is 224 px unless given (another model's is its weights', set by models.resolved,
    which needs torchvision: this module stays light)."""
    if options.get("image_size") is None and options.get("model", "vgg16") == "vgg16":
        return {**options, "image_size": 224}
    return options


def check_backbone(config: Any) -> None:
    """The backbone and preprocessing options that extract and raytl.embed share (EMBED_OPTIONS)."""
    _check_model(config.model)
    if config.model != "vgg16" and (config.layer != Layer.POOL5 or config.pool != Pool.AVG):
        raise ConfigError(
            f"--layer and --pool choose vgg16's features; --model {config.model} gives the input of its "
            "final classifier layer."
        )
    _check_sizes(config)
    _positive_fields(config, "batch_size")
    _positive("--max-pixels", config.max_pixels)
    if config.pool != Pool.AVG and config.layer != Layer.POOL5:
        raise ConfigError(f"--pool {config.pool} applies to --layer pool5 only, not --layer {config.layer}.")
    if not config.weights:
        raise ConfigError("--weights is empty: give imagenet, random, or a path or URI of a state_dict.")


def _check_sizes(config: Any) -> None:
    """--image-size (None: the model's weights') and --resize-size, at least the crop."""
    if config.image_size is not None:
        _positive("--image-size", config.image_size, low=32, high=2048)
    if config.resize_size is not None and config.resize_size < (config.image_size or 32):
        raise ConfigError(
            f"--resize-size must be at least --image-size ({config.image_size}), not {config.resize_size}."
        )


def _check_model(model: str) -> None:
    if not model:
        raise ConfigError("--model is empty: give vgg16 or another torchvision model's name (resnet50, ...).")


def flag(item: Field) -> str:
    """The command-line flag of a config field: --the-field-name, or its own (e.g. --no-augment)."""
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def parsed(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """options for cls(...), checked: an unknown name is one sentence (from the Python API as from a
    job's dict), string choices become their Choice, and --val with --val-fraction is refused."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        name = unknown[0]
        verb = cls.__name__.removesuffix("Config").lower()
        raise ConfigError(f"{verb} has no option {name!r} (nor --{name.replace('_', '-')}).")
    if options.get("val") is not None and "val_fraction" in options:
        raise ConfigError("--val and --val-fraction exclude each other: give one.")
    options = dict(options)
    hints = get_type_hints(cls)
    for name, value in options.items():
        kind = hints[name]
        if isinstance(kind, type) and issubclass(kind, Choice):
            options[name] = kind.parse(value, flag(known[name]))
    if "allow_schemes" in known:
        options["allow_schemes"] = parse_schemes(options.get("allow_schemes"))
    for name in ("num_actors", "workers", "replicas"):
        if options.get(name) is not None:
            options[name] = parse_count(options[name], flag(known[name]))
    return options


def parse_count(value: Any, option: str = "--num-actors") -> int | tuple[int, int]:
    """--num-actors, --workers: N (`4`), or a range from MIN to MAX (`1-8`, or (1, 8))."""
    parts = (
        value.split("-") if isinstance(value, str) else value if isinstance(value, (tuple, list)) else [value]
    )
    counts = [_count(p) for p in parts]
    if len(counts) not in (1, 2) or None in counts or counts[0] > counts[-1]:  # type: ignore[operator]
        raise ConfigError(
            f"{option} must be a count (4) or a range MIN-MAX (1-8; MIN at least 1), not {value!r}."
        )
    return counts[0] if len(counts) == 1 else (counts[0], counts[1])  # type: ignore[return-value]


def _count(value: Any) -> int | None:
    """A whole number of at least 1 (given as text or int), else None."""
    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def parse_max_errors(value: str | int | float | None) -> int | float | None:
    """--max-errors: a count (`100`), a share of the files (`0.01` or `1%`), or None."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        parsed = value
    else:
        text = str(value).strip()
        try:
            parsed = (
                float(text[:-1]) / 100 if text.endswith("%") else float(text) if "." in text else int(text)
            )
        except ValueError:
            parsed = -1
    if parsed is None:
        return None
    if isinstance(parsed, int) and parsed >= 0 or isinstance(parsed, float) and 0 <= parsed < 1:
        return parsed
    raise ConfigError(
        f"--max-errors must be a count of files (0, 1, ...) or a share below 1 (0.05 or 5%), not {value!r}."
    )


def absolute(options: dict[str, Any], *names: str) -> dict[str, Any]:
    """Local paths among options made absolute: Ray's workers run in other working directories, and the
    outputs record full URIs (a relative OUTPUT was written in each worker's own directory)."""
    return {k: absolute_path(v) if k in names else v for k, v in options.items()}


def absolute_path(path: str | None) -> str | None:
    """A local path, absolute; URIs (`s3://…`, `zip://…::…`) and empty values as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def parse_schemes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """--allow-schemes: URI schemes a manifest may name besides its own filesystem's (`file,https`)."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    schemes = tuple(sorted({n.strip().lower().removesuffix("://") for n in names if n.strip()}))
    for scheme in schemes:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise ConfigError(f"--allow-schemes takes scheme names such as file,https, not {scheme!r}.")
    return schemes


def _positive(option: str, value: int, low: int = 1, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
        bound = f"between {low} and {high}" if high else f"at least {low}"
        raise ConfigError(f"{option} must be an integer {bound}, not {value!r}.")


def _positive_fields(config: Any, *fields: str) -> None:
    """Each of config's named fields is an integer of at least 1, or None (not given)."""
    for name in fields:
        value = getattr(config, name)
        if value is not None:
            _positive("--" + name.replace("_", "-"), value)


def _check_paths(config: Any, target: str, what: str, name: str | None = None) -> None:
    """SOURCE (or --manifest) and the folder the command writes to are given."""
    if not config.source and not config.manifest:
        raise ConfigError("SOURCE is empty: give a directory or URI of images, or --manifest FILE.")
    if not getattr(config, target):
        raise ConfigError(f"{name or target.upper()} is empty: give a directory or URI to write {what} to.")


def _check_val_fraction(config: Any) -> None:
    if config.val is None and not 0.0 < config.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), not {config.val_fraction!r}.")


class Backend(Choice):
    RAY = "ray"  # Ray Train, data-parallel over --workers
    SKLEARN = "sklearn"  # scikit-learn on the driver: small data, and the reference


class ProbeHead(Choice):
    LOGREG = "logreg"  # multinomial logistic regression: `score` is the predicted class's probability
    SVM = "svm"  # one-vs-rest linear SVM, squared hinge (scikit-learn's LinearSVC): `score` is the margin


class Kernel(Choice):
    LINEAR = "linear"
    RBF = "rbf"  # scikit-learn's SVC on the driver: small data only, it does not scale past one node


class ClassWeight(Choice):
    NONE = "none"
    BALANCED = "balanced"  # weight each class by n / (classes * n_class), as scikit-learn does


@dataclass(frozen=True)
class TrainConfig(Validated, paths=("embeddings", "model_dir", "val")):
    """Everything `raytl train` needs; build with `TrainConfig.create` to validate."""

    embeddings: str
    model_dir: str
    val: str | None = option(None, "a separate validation embeddings dataset")
    val_fraction: float = option(0.2, "stratified, seeded split of EMBEDDINGS when --val is not given")
    backend: Backend = option(Backend.RAY, "ray: Ray Train, data-parallel; sklearn: on one node")
    head: ProbeHead = option(ProbeHead.LOGREG, "logreg: softmax; svm: one-vs-rest squared hinge (LinearSVC)")
    kernel: Kernel = option(Kernel.LINEAR, "svm: rbf is scikit-learn's SVC (--backend sklearn; small data)")
    workers: int | tuple[int, int] = option(2, WORKERS)
    device: Device = option(Device.AUTO, DEVICE)
    epochs: int = option(100, "at most this many epochs")
    patience: int = option(10, "stop after this many epochs without a better kept epoch")
    batch_size: int = option(256, "rows per optimiser step on each worker")
    lr: float = option(0.01, "Adam learning rate, decayed to zero over --epochs on a cosine")
    l2: float | None = option(None, "L2 penalty lambda/2 * ||W||^2 (default 1/n_train, scikit-learn's C=1)")
    class_weight: ClassWeight = option(ClassWeight.NONE, "balanced: each class weighted n / (classes * n_c)")
    seed: int = option(0, "seeds the split and the shuffles")
    overwrite: bool = option(False, "replace a model already in MODEL_DIR")
    mlflow_uri: str | None = option(None, MLFLOW_URI)
    mlflow_experiment: str = option("raytl", "MLflow experiment of the run (made if missing)")
    mlflow_run_name: str | None = option(None, MLFLOW_RUN_NAME)

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        if not self.embeddings or not self.model_dir:
            raise ConfigError("train takes EMBEDDINGS and MODEL_DIR, and neither may be empty.")
        _check_val_fraction(self)
        _positive_fields(self, "epochs", "patience", "batch_size")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, not {self.lr!r}.")
        if self.l2 is not None and self.l2 < 0:
            raise ConfigError(f"--l2 must be zero or positive, not {self.l2!r}.")
        _check_tracking(self)
        if self.kernel == Kernel.RBF and (self.head != ProbeHead.SVM or self.backend != Backend.SKLEARN):
            raise ConfigError(
                "--kernel rbf is scikit-learn's SVC on one node: give it with --head svm --backend sklearn."
            )

    def to_json(self) -> str:
        """The whole config as JSON (passwords in URIs and secret keys redacted), for logs and trackers."""
        return _json(self)


class Head(Choice):
    AVG = "avg"  # pool5 averaged over the grid -> a new Linear(512, classes): light, any image size
    FC7 = "fc7"  # VGG16's own fc6 and fc7 (pre-trained) -> Dropout -> a new Linear(4096, classes)


class Freeze(Choice):
    """vgg16's own --freeze values: its conv blocks (any model also takes none, all, or a fraction)."""

    NONE = "none"  # train every layer
    BLOCK1 = "block1"  # freeze conv block 1; train blocks 2-5 and the head
    BLOCK2 = "block2"
    BLOCK3 = "block3"
    BLOCK4 = "block4"  # freeze conv blocks 1-4; train block 5 and the head (the default)
    BLOCK5 = "block5"  # freeze every conv layer: only the head (and fc6/fc7 with --head fc7) trains


FREEZE = (
    "what of the backbone stays frozen: none; all (only the new head trains); a fraction F in (0, 1), the "
    "first F of its layers from the input (default 0.75); or vgg16's conv blocks 1 to N, blockN (default "
    "block4)"
)
DEFAULT_FREEZE = {"vgg16": Freeze.BLOCK4.value}  # other models: 0.75 (as block4 is 10 of vgg16's 13 convs)


def parse_freeze(value: Any, model: str) -> str:
    """--freeze as text: none | all | a fraction ("0.75") | vgg16's block1-block5; the model's default when
    None. One ConfigError sentence otherwise."""
    if value is None:
        return DEFAULT_FREEZE.get(model, "0.75")
    text = str(value).strip().lower()
    if text in ("none", "all"):
        return text
    if text in {f.value for f in Freeze}:
        if model != "vgg16":
            raise ConfigError(
                f"--freeze {text} names one of vgg16's conv blocks; for --model {model} give none, all or "
                "a fraction of its layers (0.75: the first three quarters)."
            )
        return text
    try:
        share = float(text)
    except ValueError:
        share = math.nan
    if share == 0 or share == 1:
        return "none" if share == 0 else "all"
    if 0 < share < 1:
        return str(share)
    raise ConfigError(
        "--freeze must be one of none, block1, block2, block3, block4, block5 (vgg16's conv blocks), all, "
        f"or a fraction of the backbone's layers in (0, 1), not {value!r}."
    )


class Optimizer(Choice):
    ADAMW = "adamw"
    SGD = "sgd"  # with Nesterov momentum 0.9


@dataclass(frozen=True)
class FinetuneConfig(Validated, paths=("source", "model_dir", "manifest", "val")):
    """Everything `raytl finetune` needs; build with `FinetuneConfig.create` to validate."""

    source: str | None
    model_dir: str
    manifest: str | None = option(None, "CSV or Parquet file with columns path and label")
    val: str | None = option(
        None, "validation images: a class-per-folder folder or a .csv / .parquet manifest"
    )
    val_fraction: float = option(0.2, "stratified, seeded split of the images when --val is not given")
    model: str = option("vgg16", MODEL)
    weights: str = option(
        "imagenet", "imagenet (the model's default weights) | random | path or URI of a state_dict"
    )
    head: Head = option(
        Head.AVG, "the new head's input: avg (vgg16: pool5 averaged; others: their features) or vgg16's fc7"
    )
    freeze: str | None = option(None, FREEZE, metavar="{none,block1,block2,block3,block4,block5}|all|F")
    optimizer: Optimizer = option(Optimizer.ADAMW, "adamw | sgd (Nesterov momentum 0.9)")
    lr: float = option(1e-3, "the new head's learning rate")
    backbone_lr: float | None = option(None, "the unfrozen backbone layers' learning rate (default lr/10)")
    weight_decay: float = option(1e-4, "decoupled weight decay (adamw) or L2 (sgd)")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing, in [0, 1)")
    label_field: str | None = option(
        None, "tar shards: cls | txt | json:FIELD (default: KEY.cls when present)"
    )
    epochs: int = option(10, "training epochs")
    warmup_epochs: float | None = option(
        None, "linear warm-up from lr/100, then cosine decay (default 1; half the run when --epochs is 1)"
    )
    batch_size: int = option(32, "images per step per worker; the global batch is workers x batch size")
    workers: int | tuple[int, int] = option(2, WORKERS)
    device: Device = option(Device.AUTO, DEVICE)
    image_size: int | None = option(
        None, "training crop and validation centre crop in px (default: the model's weights', 224 for vgg16)"
    )
    resize_size: int | None = option(
        None, "validation: shorter side before the crop (default: the crop times the weights' ratio, 256/224)"
    )
    augment: bool = option(True, "no random resized crops and flips (validation transforms)", "--no-augment")
    min_crop_scale: float = option(0.08, "smallest share of the image a random crop covers (torchvision's)")
    precision: Precision = option(Precision.AUTO, "autocast: auto is bf16 on CUDA and on AMX CPUs")
    decode_batch: int = option(32, "files fetched and decoded per CPU task call")
    max_pixels: int = option(89_478_485, "larger images are skipped (decompression bombs; Pillow's limit)")
    allow_schemes: tuple[str, ...] = option((), ALLOW_SCHEMES)
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before the run fails")
    seed: int = option(0, "seeds the split, the head's initial weights and --weights random")
    overwrite: bool = option(False, "discard a model or an unfinished run already in MODEL_DIR")
    mlflow_uri: str | None = option(None, MLFLOW_URI)
    mlflow_experiment: str = option("raytl", "MLflow experiment of the run (made if missing)")
    mlflow_run_name: str | None = option(None, MLFLOW_RUN_NAME)

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The default sizes of vgg16's weights; --freeze as a block or a fraction of the model."""
        options = _vgg16_size(options)
        options["freeze"] = parse_freeze(options.get("freeze"), options.get("model", "vgg16"))
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        _check_paths(self, "model_dir", "the model")
        _check_val_fraction(self)
        _positive_fields(self, "epochs", "batch_size", "decode_batch", "max_pixels")
        _positive("--max-failures", self.max_failures, low=0)
        _check_model(self.model)
        if self.model != "vgg16" and self.head == Head.FC7:
            raise ConfigError(
                f"--head fc7 is vgg16's own fc6 and fc7; --model {self.model}'s new head takes the input of "
                "its final classifier layer (--head avg)."
            )
        _check_sizes(self)
        for option, rate in (("--lr", self.lr), ("--backbone-lr", self.backbone_lr)):
            if rate is not None and not (isinstance(rate, int | float) and rate > 0):
                raise ConfigError(f"{option} must be positive, not {rate!r}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be zero or positive, not {self.weight_decay!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing!r}.")
        if not 0.0 <= self.warmup < self.epochs:
            raise ConfigError(
                f"--warmup-epochs must be at least 0 and less than --epochs ({self.epochs}), "
                f"not {self.warmup_epochs!r}."
            )
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ConfigError(f"--min-crop-scale must be in (0, 1], not {self.min_crop_scale!r}.")
        if not self.weights:
            raise ConfigError("--weights is empty: give imagenet, random, or a path or URI of a state_dict.")
        _check_label_field(self.label_field)
        _check_tracking(self)

    @property
    def resize(self) -> int:
        """Validation: the shorter side before the centre crop (once `models.resolved` has set the sizes)."""
        return self.resize_size or round((self.image_size or 224) * 256 / 224)

    @property
    def crop(self) -> int:
        """The crop in pixels: --image-size, vgg16's 224 (set by create) or the model's weights' (set by
        `models.resolved`, which the command runs first)."""
        assert self.image_size is not None, "models.resolved sets the crop of models other than vgg16"
        return self.image_size

    @property
    def warmup(self) -> float:
        """Epochs of linear warm-up: --warmup-epochs, else one (half the run when it has one epoch)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(1.0, self.epochs / 2)

    @property
    def trunk_lr(self) -> float:
        """The learning rate of the unfrozen backbone layers."""
        return self.backbone_lr if self.backbone_lr is not None else self.lr / 10

    def to_json(self) -> str:
        """The whole config as JSON (passwords in URIs and secret keys redacted), for logs and for checking
        that a rerun resumes the same run."""
        return _json(self)


@dataclass(frozen=True)
class PredictConfig:
    """Everything `raytl predict` needs; build with `PredictConfig.create` to validate."""

    model_dir: str
    source: str | None  # INPUT: embeddings, or images (class-per-folder); None with --manifest
    output: str
    manifest: str | None = option(None, "CSV or Parquet file of images to classify (path, optional label)")
    weights: str | None = option(None, "the backbone weights, if they moved since the embeddings were made")
    batch_size: int | None = option(None, "images per forward pass (default: as extract)")
    num_actors: int | tuple[int, int] | None = option(None, NUM_ACTORS)
    device: Device = option(Device.AUTO, DEVICE)
    allow_schemes: tuple[str, ...] = option((), ALLOW_SCHEMES)
    overwrite: bool = option(False, "replace predictions already in OUTPUT")

    @classmethod
    def create(cls, **options: Any) -> PredictConfig:
        """Validate every value; raises ConfigError with one clear sentence."""
        options = {"source": None, **parsed(cls, options)}  # INPUT may be left out beside --manifest
        config = cls(**absolute(options, "model_dir", "source", "output", "manifest"))
        if not config.model_dir or not config.output:
            raise ConfigError("predict takes MODEL_DIR and OUTPUT, and neither may be empty.")
        if not config.source and not config.manifest:
            raise ConfigError("INPUT is empty: give embeddings, a directory or URI of images, or --manifest.")
        _positive_fields(config, "batch_size")
        return config


@dataclass(frozen=True)
class PackConfig:
    """Everything `raytl pack` needs; build with `PackConfig.create` to validate."""

    source: str | None  # None with --manifest
    output: str  # OUTPUT_PREFIX: shards go to OUTPUT_PREFIX/00000.tar, ...
    manifest: str | None = option(None, "CSV or Parquet file with columns path and optional label")
    shard_size: int = option(1000, "images per shard")
    seed: int = option(0, "seeds the shuffle of the images across shards")
    allow_schemes: tuple[str, ...] = option((), ALLOW_SCHEMES)
    overwrite: bool = option(False, "replace shards already under OUTPUT_PREFIX")

    @classmethod
    def create(cls, **options: Any) -> PackConfig:
        """Validate every value; raises ConfigError with one clear sentence."""
        options = {"source": None, **parsed(cls, options)}  # SOURCE may be left out beside --manifest
        config = cls(**absolute(options, "source", "output", "manifest"))
        _check_paths(config, "output", "shards", name="OUTPUT_PREFIX")
        _positive("--shard-size", config.shard_size)
        return config


@dataclass(frozen=True)
class ExportConfig:
    """Everything `raytl export` needs; build with `ExportConfig.create` to validate."""

    model_dir: str
    output: str  # OUT: the .pt2 file
    weights: str | None = option(None, "the backbone weights, if they moved since the model was trained")
    overwrite: bool = option(False, "replace OUT if it exists")

    @classmethod
    def create(cls, **options: Any) -> ExportConfig:
        """Validate every value; raises ConfigError with one clear sentence."""
        config = cls(**absolute(parsed(cls, options), "model_dir", "output"))
        if not config.model_dir or not config.output:
            raise ConfigError("export takes MODEL_DIR and OUT, and neither may be empty.")
        if not config.output.endswith(".pt2"):
            raise ConfigError(f"OUT must name a .pt2 file (torch.export's format), not {config.output!r}.")
        return config


REPLICAS = (
    "replicas: N, or MIN-MAX to scale with the requests in flight (one GPU each where the cluster has GPUs)"
)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `raytl serve` needs; build with `ServeConfig.create` to validate."""

    model_dir: str
    weights: str | None = option(None, "the backbone weights, if they moved since the model was trained")
    replicas: int | tuple[int, int] = option(1, REPLICAS)
    max_batch_size: int = option(16, "images a replica scores in one forward pass")
    batch_wait_ms: float = option(10.0, "how long a replica waits for more images to fill a batch")
    max_upload_mb: float = option(25.0, "larger uploads are refused (413)")
    max_pixels: int = option(89_478_485, "larger images are refused (decompression bombs; Pillow's limit)")
    device: Device = option(Device.AUTO, DEVICE)
    host: str = option("127.0.0.1", "where the HTTP proxy listens (0.0.0.0: every interface)")
    port: int = option(8000, "the HTTP port")
    route_prefix: str = option("/", "the classifier's URL path")
    name: str = option("raytl", "the Serve application's name")

    @classmethod
    def create(cls, **options: Any) -> ServeConfig:
        """Validate every value; raises ConfigError with one clear sentence."""
        options = parsed(cls, options)
        config = cls(**absolute(options, "model_dir"))
        if not config.model_dir:
            raise ConfigError("serve takes MODEL_DIR, and it may not be empty.")
        _positive_fields(config, "max_batch_size", "max_pixels")
        _positive("--port", config.port, low=1, high=65535)
        if not (isinstance(config.batch_wait_ms, int | float) and config.batch_wait_ms >= 0):
            raise ConfigError(f"--batch-wait-ms must be zero or more, not {config.batch_wait_ms!r}.")
        if not (isinstance(config.max_upload_mb, int | float) and config.max_upload_mb > 0):
            raise ConfigError(f"--max-upload-mb must be positive, not {config.max_upload_mb!r}.")
        if not config.route_prefix.startswith("/"):
            raise ConfigError(f"--route-prefix must start with /, not {config.route_prefix!r}.")
        return config


def _json(config: Any) -> str:
    return redact(json.dumps({k: str(v) if isinstance(v, Choice) else v for k, v in asdict(config).items()}))


def _check_tracking(config: Any) -> None:
    """--mlflow-uri needs MLflow's client (an extra); the experiment needs a name."""
    import importlib.util

    if config.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            '--mlflow-uri needs MLflow\'s client: pip install -c requirements/lock.txt "raytl[mlflow]".'
        )
    if not config.mlflow_experiment:
        raise ConfigError("--mlflow-experiment is empty: name the MLflow experiment to log the run in.")


def _check_label_field(label: str | None) -> None:
    if label is not None and label not in ("cls", "txt") and not (label.startswith("json:") and label[5:]):
        raise ConfigError(f"--label-field must be cls, txt or json:FIELD, not {label!r}.")
