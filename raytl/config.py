"""Typed, frozen job configs, validated before any Ray work starts."""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import Field, asdict, dataclass, field, fields
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
    # Pillow in CPU tasks, JPEGs decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT)
    # whenever the shorter side stays at least the resize; then the same resize and crop. For large photos.
    DRAFT = "draft"
    GPU = "gpu"  # JPEGs decoded, resized and cropped in the model actors: nvJPEG on CUDA (torchvision on CPU)


class Device(Choice):
    AUTO = "auto"  # GPUs when the cluster has some up at start, else CPU
    CUDA = "cuda"  # ask Ray for GPUs even when none is up: an autoscaling cluster adds GPU nodes
    CPU = "cpu"  # never ask for a GPU


MODEL = (
    "the backbone: vgg16, any torchvision classification model by name (resnet50, convnext_tiny, "
    "efficientnet_v2_s, vit_b_16, ...; its features are the input of its final classifier layer), or any "
    "timm model as timm/NAME (timm/vit_small_patch14_dinov2.lvd142m, ...: its pooled features; raytl[timm])"
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


WEIGHTS = (
    "imagenet (the model's default weights) | a torchvision weights name (IMAGENET1K_V2, ...) | random | "
    "path or URI of a state_dict"
)
MOVED_WEIGHTS = "the backbone weights, if they moved since the model was trained"


class Validated:
    """A config built from options by `create`: string choices parsed, `prepare`d, the PATHS made absolute,
    then checked, each option group's `check_group` (in the order the groups are named) and the config's
    own `validate`; ConfigError with one clear sentence on the first bad value."""

    # The fields that name files or URIs, made absolute: `class X(Validated, paths=(...))`.
    PATHS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, paths: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.PATHS = paths

    @classmethod
    def create(cls, **options: Any) -> Self:
        """Parse string choices and validate every value; raises ConfigError with one clear sentence."""
        config = cls(**absolute(cls.prepare(parsed(cls, options)), *cls.PATHS))
        for group in cls.__mro__:
            check = group.__dict__.get("check_group")
            if check is not None:
                check(config)
        config.validate()
        return config

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options whose values need more than their type to parse; by default, none."""
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value of the config's own options (its groups check theirs)."""

    def to_json(self) -> str:
        """The whole config as JSON (passwords in URIs and secret keys redacted), for logs, trackers and for
        checking that a rerun resumes the same run."""
        values = asdict(self)  # type: ignore[call-overload]  # every Validated is a dataclass
        return redact(json.dumps({k: str(v) if isinstance(v, Choice) else v for k, v in values.items()}))

    @classmethod
    def option_name(cls, name: str) -> str:
        """How sentences name a field: its flag, or the path argument's NAME for a positional one."""
        item = next(f for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return flag(item) if "help" in item.metadata else name.upper()


# --- option groups: each the one home of its options (default, help) and of their checks -----------------


@dataclass(frozen=True, kw_only=True)
class BackboneOptions:
    """The network that embeds the images, its weights, its crop and its precision."""

    model: str = option("vgg16", MODEL)
    weights: str = option("imagenet", WEIGHTS)
    precision: Precision = option(Precision.AUTO, "auto: bf16 on CUDA and on AMX / AVX-512-BF16 CPUs")
    image_size: int | None = option(
        None,
        "the centre crop in pixels, finetune's training crops too (default: the model's weights', 224 for "
        "vgg16)",
    )
    resize_size: int | None = option(
        None, "shorter side before the centre crop (default: the crop times the weights' ratio, 256/224)"
    )

    def check_group(self) -> None:
        if not self.model:
            raise ConfigError(
                "--model is empty: give vgg16 or another torchvision model's name (resnet50, ...)."
            )
        if not self.weights:
            raise ConfigError("--weights is empty: give imagenet, random, or a path or URI of a state_dict.")
        if self.image_size is not None:
            _positive("--image-size", self.image_size, low=32, high=2048)
        if self.resize_size is not None and self.resize_size < (self.image_size or 32):
            raise ConfigError(
                f"--resize-size must be at least --image-size ({self.image_size}), not {self.resize_size}."
            )

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop (once `models.resolved` has set the image size)."""
        return self.resize_size or round((self.image_size or 224) * 256 / 224)


@dataclass(frozen=True, kw_only=True)
class Vgg16Features:
    """Which of vgg16's features an embedding is (other models give the input of their classifier)."""

    layer: Layer = option(Layer.POOL5, "vgg16's layer: pool5 (512 x grid), fc6 or fc7 (4096, after ReLU)")
    pool: Pool = option(
        Pool.AVG, "vgg16's pool5 pooling over the grid (flatten: the whole 25088-d map at 224 px)"
    )

    def check_group(self) -> None:
        model = getattr(self, "model", "vgg16")
        if model != "vgg16" and (self.layer != Layer.POOL5 or self.pool != Pool.AVG):
            raise ConfigError(
                f"--layer and --pool choose vgg16's features; --model {model} gives the input of its "
                "final classifier layer."
            )
        if self.pool != Pool.AVG and self.layer != Layer.POOL5:
            raise ConfigError(f"--pool {self.pool} applies to --layer pool5 only, not --layer {self.layer}.")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where the work runs."""

    device: Device = option(Device.AUTO, DEVICE)


@dataclass(frozen=True, kw_only=True)
class ModelActors(Placement):
    """The actor pool that runs the model (extract, predict, raytl.embed)."""

    batch_size: int | None = option(None, "images per forward pass (default 256 per GPU, 32 on CPU)")
    num_actors: int | tuple[int, int] | None = option(None, NUM_ACTORS)

    def check_group(self) -> None:
        _positive_fields(self, "batch_size")


@dataclass(frozen=True, kw_only=True)
class TrainWorkers(Placement):
    """The Ray Train workers (train, finetune)."""

    workers: int | tuple[int, int] = option(2, WORKERS)


@dataclass(frozen=True, kw_only=True)
class Embedding:
    """How the model actors run the backbone (extract, raytl.embed)."""

    compile: bool = option(False, "torch.compile the model (minutes of warm-up; pays on long GPU runs)")
    seed: int = option(0, "seeds --weights random")


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Which images are refused before they are decoded."""

    max_pixels: int = option(89_478_485, "larger images are refused (decompression bombs; Pillow's limit)")

    def check_group(self) -> None:
        _positive("--max-pixels", self.max_pixels)


@dataclass(frozen=True, kw_only=True)
class Reading:
    """How the CPU tasks read image files and shards."""

    # 128: a Ray task's own cost spread over 4x the files of 32 (1.5x extract's rate with a near-free model,
    # bench/pipeline.py); a task still holds only FETCH_AT_ONCE fetched files in memory at a time.
    decode_batch: int = option(128, "files fetched and decoded per CPU task call")
    label_field: str | None = option(
        None, "tar shards: cls | txt | json:FIELD (default: KEY.cls when present)"
    )

    def check_group(self) -> None:
        _positive("--decode-batch", self.decode_batch)
        label = self.label_field
        if (
            label is not None
            and label not in ("cls", "txt")
            and not (label.startswith("json:") and label[5:])
        ):
            raise ConfigError(f"--label-field must be cls, txt or json:FIELD, not {label!r}.")


@dataclass(frozen=True, kw_only=True)
class Listing:
    """Which images a verb takes besides SOURCE: a manifest, and the filesystems it may name."""

    manifest: str | None = option(
        None, "CSV or Parquet file of images: columns path and label (finetune needs it)"
    )
    allow_schemes: tuple[str, ...] = option((), ALLOW_SCHEMES)


@dataclass(frozen=True, kw_only=True)
class Validation:
    """What the model is validated (and its best epoch chosen) on."""

    val: str | None = option(
        None, "a separate validation set (train: embeddings; finetune: a class-per-folder folder or a .csv / "
        ".parquet manifest)"
    )  # fmt: skip
    val_fraction: float = option(0.2, "stratified, seeded split of the training data when --val is not given")

    def check_group(self) -> None:
        if self.val is None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"--val-fraction must be between 0 and 1 (exclusive), not {self.val_fraction!r}."
            )


@dataclass(frozen=True, kw_only=True)
class Exclude:
    """Rows left out: those that tables (raytl audit's, or any with a `path` column) list."""

    exclude: tuple[str, ...] = option(
        (), "leave out the rows these tables list (comma-separated .parquet or .csv with a path column; "
        "raytl audit's duplicates.parquet: all but the kept member of each group; label_issues.parquet: see "
        "--exclude-rank)", metavar="TABLE,...",
    )  # fmt: skip
    exclude_rank: int | None = option(
        None, "label_issues.parquet in --exclude: leave out only the issues ranked 1 to N (default all)",
        metavar="N",
    )  # fmt: skip

    def check_group(self) -> None:
        if self.exclude_rank is not None and (not self.exclude or self.exclude_rank < 1):
            raise ConfigError(
                f"--exclude-rank must be 1 or more and come with --exclude, not {self.exclude_rank!r}."
            )


def parse_tables(value: Any) -> tuple[str, ...]:
    """--exclude "a.parquet,b.csv" (or a sequence): the tables, local paths made absolute."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(absolute_path(str(item).strip()) or "" for item in items if str(item).strip())


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """Where a training run is tracked (MLflow)."""

    mlflow_uri: str | None = option(None, MLFLOW_URI)
    mlflow_experiment: str = option("raytl", "MLflow experiment of the run (made if missing)")
    mlflow_run_name: str | None = option(None, MLFLOW_RUN_NAME)
    mlflow_register: str | None = option(
        None, "register the run's MLflow model under this name in MLflow's model registry (a new version "
        "each run; default: logged, not registered)",
    )  # fmt: skip

    def check_group(self) -> None:
        """--mlflow-uri needs MLflow's client (an extra); the experiment needs a name."""
        import importlib.util

        if self.mlflow_uri and importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                '--mlflow-uri needs MLflow\'s client: pip install -c requirements/lock.txt "raytl[mlflow]".'
            )
        if not self.mlflow_experiment:
            raise ConfigError("--mlflow-experiment is empty: name the MLflow experiment to log the run in.")
        if self.mlflow_register is not None and not self.mlflow_register.strip():
            raise ConfigError("--mlflow-register is empty: name the registered model, or leave it out.")


@dataclass(frozen=True, kw_only=True)
class Overwrite:
    """Whether what raytl wrote at the destination before may be replaced."""

    overwrite: bool = option(False, "replace what raytl wrote there before (OUTPUT, MODEL_DIR or OUT)")


@dataclass(frozen=True, kw_only=True)
class MovedWeights:
    """Where a trained model's backbone weights are now (predict, export, serve)."""

    weights: str | None = option(None, MOVED_WEIGHTS)


# --- the verbs' configs: their paths, their own options, and the groups they take -------------------------


@dataclass(frozen=True)
class ExtractConfig(
    Validated, BackboneOptions, Vgg16Features, ModelActors, Embedding, ImageLimits, Reading, Listing,
    Overwrite, paths=("source", "output", "manifest"),
):  # fmt: skip
    """Everything `raytl extract` needs; build with `ExtractConfig.create` to validate."""

    source: str
    output: str
    # gpu: when CPU JPEG decoding cannot keep GPUs busy (H100: ~10x a core's rate)
    decode: Decode = option(
        Decode.CPU,
        "cpu: Pillow in CPU tasks; draft: the same, large JPEGs decoded at 1/2-1/8 scale (several times "
        "faster on camera photos, near-exact embeddings); gpu: JPEGs decoded by nvJPEG in the actors",
    )
    rows_per_file: int | None = option(
        None, "rows per Parquet part (default: about a minute of work on CPU, 8192 on GPU clusters)"
    )
    max_errors: int | float | None = option(
        None, "stop when more files than this count (100) or share (0.01, 1%%) are broken"
    )
    max_failures: int = option(
        3, "times a run that loses a node or a model actor resumes from what OUTPUT holds before it fails"
    )

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The default sizes of vgg16's weights; --max-errors as a count or a share."""
        options = _vgg16_size(options)
        options["max_errors"] = parse_max_errors(options.get("max_errors"))
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        _check_paths(self, "output", "embeddings")
        _positive_fields(self, "rows_per_file")
        _positive("--max-failures", self.max_failures, low=0)

    def error_limit(self, files: int) -> int | None:
        """How many of `files` may fail before the run stops (None: no limit)."""
        if self.max_errors is None:
            return None
        if isinstance(self.max_errors, float):
            return math.floor(self.max_errors * files)
        return self.max_errors


_IMAGE_COLUMN = (
    "the column of images: encoded files (bytes), uint8 arrays (H, W) or (H, W, C), PIL images, or "
    "{'bytes': ...} dicts (Hugging Face's Image feature)"
)


@dataclass(frozen=True)
class EmbedConfig(Validated, BackboneOptions, Vgg16Features, ModelActors, Embedding, ImageLimits):
    """What raytl.embed needs: extract's backbone options (the same groups) and the image column."""

    column: str = option("image", _IMAGE_COLUMN)

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _vgg16_size(options)

    def validate(self) -> None:
        if not self.column:
            raise ConfigError("column is empty: name the dataset's column of images.")


def embed_config(**options: Any) -> EmbedConfig:
    """A validated EmbedConfig (one ConfigError sentence for a bad value or an unknown option)."""
    return EmbedConfig.create(**options)


def _vgg16_size(options: dict[str, Any]) -> dict[str, Any]:
    """vgg16's crop is 224 px unless given (another model's is its weights', set by models.resolved,
    which needs torchvision: this module stays light)."""
    if options.get("image_size") is None and options.get("model", "vgg16") == "vgg16":
        return {**options, "image_size": 224}
    return options


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
    if "exclude" in known:
        options["exclude"] = parse_tables(options.get("exclude"))
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


@dataclass(frozen=True, kw_only=True)
class Probe:
    """The linear probe fitted on embeddings (train, and every point of curve)."""

    head: ProbeHead = option(ProbeHead.LOGREG, "logreg: softmax; svm: one-vs-rest squared hinge (LinearSVC)")
    l2: float | str | None = option(
        None, "L2 penalty lambda/2 * ||W||^2 (default 1/n_train, scikit-learn's C=1); auto: chosen on the "
        "validation split by a Ray Tune sweep", metavar="X|auto",
    )  # fmt: skip
    class_weight: ClassWeight = option(ClassWeight.NONE, "balanced: each class weighted n / (classes * n_c)")
    seed: int = option(0, "seeds the split and every random draw (shuffles, curve's labelled subsets)")

    def check_group(self) -> None:
        if isinstance(self.l2, float) and not self.l2 >= 0:
            raise ConfigError(f"--l2 must be zero or positive, or auto, not {self.l2!r}.")


L2_AUTO = "auto"


def parse_l2(value: Any) -> float | str | None:
    """--l2: a number (as text from the CLI), auto, or None (the default)."""
    if value is None or value == L2_AUTO:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--l2 must be zero or positive, or auto, not {value!r}.") from None


@dataclass(frozen=True)
class TrainConfig(
    Validated, Validation, Probe, TrainWorkers, Exclude, Tracking, Overwrite,
    paths=("embeddings", "model_dir", "val"),
):  # fmt: skip
    """Everything `raytl train` needs; build with `TrainConfig.create` to validate."""

    embeddings: str
    model_dir: str
    backend: Backend = option(Backend.RAY, "ray: Ray Train, data-parallel; sklearn: on one node")
    kernel: Kernel = option(Kernel.LINEAR, "svm: rbf is scikit-learn's SVC (--backend sklearn; small data)")
    epochs: int = option(100, "at most this many epochs")
    patience: int = option(10, "stop after this many epochs without a better kept epoch")
    batch_size: int = option(256, "rows per optimiser step on each worker")
    lr: float = option(0.01, "Adam learning rate, decayed to zero over --epochs on a cosine")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "l2": parse_l2(options.get("l2"))}

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        if self.l2 == L2_AUTO and self.kernel == Kernel.RBF:
            raise ConfigError("--l2 auto sweeps the linear probe's penalty; give --kernel rbf a number.")
        if not self.embeddings or not self.model_dir:
            raise ConfigError("train takes EMBEDDINGS and MODEL_DIR, and neither may be empty.")
        _positive_fields(self, "epochs", "patience", "batch_size")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, not {self.lr!r}.")
        if self.kernel == Kernel.RBF and (self.head != ProbeHead.SVM or self.backend != Backend.SKLEARN):
            raise ConfigError(
                "--kernel rbf is scikit-learn's SVC on one node: give it with --head svm --backend sklearn."
            )


@dataclass(frozen=True)
class CurveConfig(
    Validated, Validation, Probe, TrainWorkers, Overwrite, paths=("embeddings", "output", "val")
):
    """Everything `raytl curve` needs; build with `CurveConfig.create` to validate."""

    embeddings: str
    output: str
    shots: tuple[int, ...] | None = option(
        None, "labels per class at each point below 'all', e.g. 1,5,10 (default 1, 2, 4, ... below the "
        "largest class)", metavar="K,K,...",
    )  # fmt: skip
    repeats: int = option(5, "seeded draws of each point's labelled rows (the spread over them is shown)")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "shots": parse_shots(options.get("shots")), "l2": parse_l2(options.get("l2"))}

    def validate(self) -> None:
        if not self.embeddings or not self.output:
            raise ConfigError("curve takes EMBEDDINGS and OUT, and neither may be empty.")
        _positive_fields(self, "repeats")

    def probe(self, model_dir: str, backend: Backend) -> TrainConfig:
        """The probe of each point, as `raytl train` would fit it (its split, head, l2 and seed)."""
        return train_config_of(self, model_dir, backend)


def train_config_of(config: Any, model_dir: str, backend: Backend) -> TrainConfig:
    """The TrainConfig of the probe a curve or an audit fits: `raytl train`'s, with the options they share
    (the split, the Probe group, the workers) taken from theirs."""
    shared = {f.name: getattr(config, f.name) for f in fields(TrainConfig) if hasattr(config, f.name)}
    if config.val is not None:
        del shared["val_fraction"]  # unused, and refused beside --val
    return TrainConfig.create(**{**shared, "model_dir": model_dir, "backend": backend})


def parse_shots(value: Any) -> tuple[int, ...] | None:
    """--shots "1,2,4" (or a sequence): distinct positive whole numbers, sorted; "all" may end it."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(item).strip() for item in items if str(item).strip().lower() != "all"]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ConfigError(
            f"--shots must be labels per class as whole numbers above 0, e.g. 1,2,4, not {value!r}."
        )
    return tuple(sorted({int(item) for item in items}))


# audit: two rows whose normalised embeddings have at least this cosine are near-duplicates. Provisional:
# bench/audit.py measures it, but only trained weights can (README, "Which labels and images are wrong").
DUPLICATE_THRESHOLD = 0.9


class Check(Choice):
    LABELS = "labels"  # likely label errors: out-of-fold probe probabilities, confident learning (cleanlab)
    DUPLICATES = "duplicates"  # near-duplicate groups by cosine of the normalised embeddings
    LEAKAGE = "leakage"  # validation rows with a near-duplicate in training; the accuracy without them


class FilterBy(Choice):
    """cleanlab.filter.find_label_issues's filter_by: which rows confident learning flags."""

    PRUNE_BY_NOISE_RATE = "prune_by_noise_rate"
    PRUNE_BY_CLASS = "prune_by_class"
    BOTH = "both"
    CONFIDENT_LEARNING = "confident_learning"
    PREDICTED_NEQ_GIVEN = "predicted_neq_given"


@dataclass(frozen=True)
class AuditConfig(
    Validated, Validation, Probe, TrainWorkers, Overwrite, paths=("embeddings", "output", "val")
):
    """Everything `raytl audit` needs; build with `AuditConfig.create` to validate."""

    embeddings: str
    output: str
    checks: tuple[Check, ...] = option(
        (Check.LABELS, Check.DUPLICATES, Check.LEAKAGE), "which checks to run, of labels, duplicates and "
        "leakage (default all three)", metavar="CHECK,...",
    )  # fmt: skip
    folds: int = option(5, "label issues: out-of-fold probabilities from this many folds (by path hash)")
    filter_by: FilterBy = option(
        FilterBy.PRUNE_BY_NOISE_RATE, "label issues: cleanlab's find_label_issues filter_by (both: fewer, "
        "surer issues; predicted_neq_given: every row the probe disagrees with)",
    )  # fmt: skip
    threshold: float = option(
        DUPLICATE_THRESHOLD, "near-duplicates: the cosine of the normalised embeddings at and above which "
        "two rows are duplicates",
    )  # fmt: skip
    neighbours: int = option(10, "near-duplicates: each row's most similar rows looked at")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "checks": parse_checks(options.get("checks")), "l2": parse_l2(options.get("l2"))}

    def validate(self) -> None:
        if not self.embeddings or not self.output:
            raise ConfigError("audit takes EMBEDDINGS and OUT, and neither may be empty.")
        if self.l2 == L2_AUTO:
            raise ConfigError("audit does not take --l2 auto; give a number or leave --l2 out (1/n).")
        _positive_fields(self, "neighbours")
        if self.folds < 2:
            raise ConfigError(f"--folds must be 2 or more, not {self.folds!r}.")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold is a cosine, between -1 and 1, not {self.threshold!r}.")

    def probe(self, model_dir: str, backend: Backend) -> TrainConfig:
        """The probe that label issues (logistic regression) and leakage (--head) fit, as train would."""
        return train_config_of(self, model_dir, backend)


def parse_checks(value: Any) -> tuple[Check, ...]:
    """--checks "labels,duplicates" (or a sequence): known checks, in the order they run."""
    if value is None:
        return tuple(Check)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(getattr(item, "value", item)).strip() for item in items if str(item).strip()]
    known = [c.value for c in Check]
    wrong = [name for name in names if name not in known]
    if wrong or not names:
        raise ConfigError(f"--checks must name some of {', '.join(known)}, not {value!r}.")
    return tuple(c for c in Check if c.value in names)


class Strategy(Choice):
    RANDOM = "random"
    TYPICAL = "typical"  # cold start: the most typical row of each k-means cluster (TypiClust)
    KCENTER = "kcenter"  # cold start: greedy k-center coverage
    MARGIN = "margin"  # --model: the smallest gap between the two most probable classes
    ENTROPY = "entropy"  # --model: the most uncertain class probabilities
    MARGIN_DIVERSE = "margin-diverse"  # --model: the smallest margin within each of --budget clusters


MODEL_STRATEGIES = (Strategy.MARGIN, Strategy.ENTROPY, Strategy.MARGIN_DIVERSE)


@dataclass(frozen=True)
class SelectConfig(Validated, Overwrite, paths=("embeddings", "output", "model")):
    """Everything `raytl select` needs; build with `SelectConfig.create` to validate."""

    embeddings: str
    output: str
    budget: int = option(0, "how many unlabelled rows to pick (required)")
    strategy: Strategy = option(
        Strategy.TYPICAL, "how to pick; margin, entropy and margin-diverse need --model"
    )
    model: str | None = option(
        None, "a MODEL_DIR of a probe trained on these embeddings' backbone", metavar="MODEL_DIR"
    )
    seed: int = option(0, "seeds random's draw, typical's sample and its k-means")

    def validate(self) -> None:
        if not self.embeddings or not self.output:
            raise ConfigError("select takes EMBEDDINGS and OUT, and neither may be empty.")
        if not self.output.lower().endswith((".parquet", ".pq", ".csv")):
            raise ConfigError(f"OUT is a manifest and must end in .parquet or .csv, not {self.output!r}.")
        if self.budget < 1:
            raise ConfigError(f"--budget must be a whole number above 0, not {self.budget!r}.")
        if self.strategy in MODEL_STRATEGIES and not self.model:
            raise ConfigError(
                f"--strategy {self.strategy} ranks by a model's predictions: give --model MODEL_DIR."
            )
        if self.model and self.strategy not in MODEL_STRATEGIES:
            raise ConfigError(
                f"--strategy {self.strategy} uses no model: --model goes with margin, entropy or "
                "margin-diverse."
            )


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
class FinetuneConfig(
    Validated, BackboneOptions, Validation, TrainWorkers, ImageLimits, Reading, Listing, Exclude, Tracking,
    Overwrite, paths=("source", "model_dir", "manifest", "val"),
):  # fmt: skip
    """Everything `raytl finetune` needs; build with `FinetuneConfig.create` to validate."""

    source: str | None
    model_dir: str
    head: Head = option(
        Head.AVG, "the new head's input: avg (vgg16: pool5 averaged; others: their features) or vgg16's fc7"
    )
    freeze: str | None = option(None, FREEZE, metavar="{none,block1,block2,block3,block4,block5}|all|F")
    optimizer: Optimizer = option(Optimizer.ADAMW, "adamw | sgd (Nesterov momentum 0.9)")
    lr: float = option(1e-3, "the new head's learning rate")
    backbone_lr: float | None = option(None, "the unfrozen backbone layers' learning rate (default lr/10)")
    weight_decay: float = option(1e-4, "decoupled weight decay (adamw) or L2 (sgd)")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing, in [0, 1)")
    epochs: int = option(10, "training epochs")
    warmup_epochs: float | None = option(
        None, "linear warm-up from lr/100, then cosine decay (default 1; half the run when --epochs is 1)"
    )
    batch_size: int = option(32, "images per step per worker; the global batch is workers x batch size")
    augment: bool = option(True, "no random resized crops and flips (validation transforms)", "--no-augment")
    min_crop_scale: float = option(0.08, "smallest share of the image a random crop covers (torchvision's)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before the run fails")
    seed: int = option(0, "seeds the split, the head's initial weights and --weights random")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The default sizes of vgg16's weights; --freeze as a block or a fraction of the model."""
        options = _vgg16_size(options)
        options["freeze"] = parse_freeze(options.get("freeze"), options.get("model", "vgg16"))
        return options

    def validate(self) -> None:
        """Raise ConfigError on the first bad value."""
        _check_paths(self, "model_dir", "the model")
        _positive_fields(self, "epochs", "batch_size")
        _positive("--max-failures", self.max_failures, low=0)
        if self.model != "vgg16" and self.head == Head.FC7:
            raise ConfigError(
                f"--head fc7 is vgg16's own fc6 and fc7; --model {self.model}'s new head takes the input of "
                "its final classifier layer (--head avg)."
            )
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


@dataclass(frozen=True)
class PredictConfig(
    Validated,
    MovedWeights,
    ModelActors,
    Listing,
    Overwrite,
    paths=("model_dir", "source", "output", "manifest"),
):
    """Everything `raytl predict` needs; build with `PredictConfig.create` to validate."""

    model_dir: str
    source: str | None  # INPUT: embeddings, or images (class-per-folder); None with --manifest
    output: str

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"source": None, **options}  # INPUT may be left out beside --manifest

    def validate(self) -> None:
        if not self.model_dir or not self.output:
            raise ConfigError("predict takes MODEL_DIR and OUTPUT, and neither may be empty.")
        if not self.source and not self.manifest:
            raise ConfigError("INPUT is empty: give embeddings, a directory or URI of images, or --manifest.")


@dataclass(frozen=True)
class ListConfig(Validated, Exclude, paths=("source", "manifest")):
    """Everything `raytl list` needs; build with `ListConfig.create` to validate."""

    source: str
    manifest: str

    def validate(self) -> None:
        if not self.source or not self.manifest:
            raise ConfigError("list takes SOURCE and MANIFEST, and neither may be empty.")


@dataclass(frozen=True)
class PackConfig(Validated, Listing, Overwrite, paths=("source", "output", "manifest")):
    """Everything `raytl pack` needs; build with `PackConfig.create` to validate."""

    source: str | None  # None with --manifest
    output: str  # OUTPUT_PREFIX: shards go to OUTPUT_PREFIX/00000.tar, ...
    shard_size: int = option(1000, "images per shard")
    seed: int = option(0, "seeds the shuffle of the images across shards")

    @classmethod
    def prepare(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"source": None, **options}  # SOURCE may be left out beside --manifest

    def validate(self) -> None:
        _check_paths(self, "output", "shards", name="OUTPUT_PREFIX")
        _positive("--shard-size", self.shard_size)


@dataclass(frozen=True)
class ExportConfig(Validated, MovedWeights, Overwrite, paths=("model_dir", "output")):
    """Everything `raytl export` needs; build with `ExportConfig.create` to validate."""

    model_dir: str
    output: str  # OUT: the .pt2 file

    def validate(self) -> None:
        if not self.model_dir or not self.output:
            raise ConfigError("export takes MODEL_DIR and OUT, and neither may be empty.")
        if not self.output.endswith(".pt2"):
            raise ConfigError(f"OUT must name a .pt2 file (torch.export's format), not {self.output!r}.")


REPLICAS = (
    "replicas: N, or MIN-MAX to scale with the requests in flight (one GPU each where the cluster has GPUs)"
)


@dataclass(frozen=True)
class LoadConfig(Validated, MovedWeights, ImageLimits, Placement, paths=("model_dir",)):
    """A trained model in this process (`raytl.load`); build with `LoadConfig.create` to validate."""

    model_dir: str

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("load takes MODEL_DIR, and it may not be empty.")


@dataclass(frozen=True)
class ServeConfig(Validated, MovedWeights, ImageLimits, Placement, paths=("model_dir",)):
    """Everything `raytl serve` needs; build with `ServeConfig.create` to validate."""

    model_dir: str
    replicas: int | tuple[int, int] = option(1, REPLICAS)
    max_batch_size: int = option(16, "images a replica scores in one forward pass")
    batch_wait_ms: float = option(10.0, "how long a replica waits for more images to fill a batch")
    max_upload_mb: float = option(25.0, "larger uploads are refused (413)")
    host: str = option("127.0.0.1", "where the HTTP proxy listens (0.0.0.0: every interface)")
    port: int = option(8000, "the HTTP port")
    route_prefix: str = option("/", "the classifier's URL path")
    name: str = option("raytl", "the Serve application's name")

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("serve takes MODEL_DIR, and it may not be empty.")
        _positive_fields(self, "max_batch_size")
        _positive("--port", self.port, low=1, high=65535)
        if not (isinstance(self.batch_wait_ms, int | float) and self.batch_wait_ms >= 0):
            raise ConfigError(f"--batch-wait-ms must be zero or more, not {self.batch_wait_ms!r}.")
        if not (isinstance(self.max_upload_mb, int | float) and self.max_upload_mb > 0):
            raise ConfigError(f"--max-upload-mb must be positive, not {self.max_upload_mb!r}.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"--route-prefix must start with /, not {self.route_prefix!r}.")
