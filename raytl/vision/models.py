"""Backbones: VGG16 cut at pool5 / fc6 / fc7, any torchvision classification model without its final
classifier layer (resolved by name through torchvision's model registry), or any timm model as
`timm/NAME` (PyTorch Image Models, `raytl[timm]`: `timm.create_model(NAME, num_classes=0)`, its pooled
features); their weights, the preprocessing their weights expect, and the precision they run at."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from raytl.config import Device, Layer, Pool, Precision
from raytl.errors import ConfigError, WeightsError
from raytl.files import storage

VGG16 = "vgg16"  # the default backbone, with its own layers (--layer) and pooling (--pool)
# --model timm/NAME: timm's model NAME, with its pretrained tag (timm/vit_small_patch14_dinov2.lvd142m)
TIMM = "timm/"
TIMM_INSTALL = 'pip install -c requirements/lock.txt "raytl[timm]"'

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """A validated VGG16 state_dict (only the tensors the chosen layer needs) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    id: str  # recorded in the embeddings' metadata, e.g. torchvision:VGG16_Weights.IMAGENET1K_V1


# torchvision's VGG16 (configuration "D": 3x3 convolutions, the numbers their channels, M a 2x2 max-pool),
# with the same module names, so that it holds a torchvision VGG16 state_dict. Built here rather than by
# torchvision so that a process running VGG16 (every model actor and training worker of the default
# backbone) never imports torchvision: its import loads torch._dynamo, 1.1 CPU-seconds a process.
# tests/test_models.py checks it against torchvision's.
_VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _VGG16(nn.Module):
    def __init__(self, classifier: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in _VGG16_CONVS:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(width), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        if not classifier:  # pool5 only: the layers' own initialisation draws are made all the same
            _draw_like_linear_layers(_VGG16_LINEARS)
            return
        self.classifier = nn.Sequential(
            nn.Linear(*_VGG16_LINEARS[0]), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(*_VGG16_LINEARS[1]), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(*_VGG16_LINEARS[2]),
        )  # fmt: skip


_VGG16_LINEARS = ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000))  # fc6, fc7, fc8: (in, out)


def _draw_like_linear_layers(shapes: Iterable[tuple[int, int]]) -> None:
    """Advance the generator as building these nn.Linear layers would (each draws its weight, then its
    bias, from a uniform distribution: one number an element), without holding them: fc6-fc8 are 124M
    numbers, 500 MB, that pool5 does not use but whose draws come before VGG16's own initialisation."""
    buffer = torch.empty(1 << 20)
    for inputs, outputs in shapes:
        for count in (inputs * outputs, outputs):
            for start in range(0, count, buffer.numel()):
                buffer[: min(buffer.numel(), count - start)].uniform_()


def _vgg16_initialised(layer: Layer) -> dict[str, torch.Tensor]:
    """`torchvision.models.vgg16(weights=None)`'s tensors under the current generator, drawn as torchvision
    draws them (every layer built in order with its own default initialisation, then VGG's: Kaiming-normal
    convolutions on their fan-out, N(0, 0.01) linear layers, zero biases), without importing torchvision;
    for pool5 only the convolutions are kept (and 60% of the CPU time saved). tests/test_models.py checks
    it against torchvision's."""
    network = _VGG16(classifier=layer != Layer.POOL5)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)  # type: ignore[arg-type]  # VGG16's convolutions all have one
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return network.state_dict()


class VGG16Trunk(nn.Module):
    """VGG16 up to pool5 (pooled avg / max / flattened) or up to fc6 / fc7 after their ReLU."""

    def __init__(self, layer: Layer = Layer.POOL5, pool: Pool = Pool.AVG) -> None:
        super().__init__()
        # Built without storage (VGG16's own init of 138M parameters takes seconds): the weights come
        # from `from_state_dict`.
        with torch.device("meta"):
            vgg = _VGG16()
        self.layer, self.pool = Layer(layer), Pool(pool)
        self.features = vgg.features
        if self.layer != Layer.POOL5:
            self.avgpool = vgg.avgpool
            # classifier: Linear(fc6) ReLU Dropout Linear(fc7) ReLU Dropout Linear(fc8)
            self.classifier = vgg.classifier[:2] if self.layer == Layer.FC6 else vgg.classifier[:5]

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], layer: Layer, pool: Pool) -> VGG16Trunk:
        """A trunk holding these tensors (all of VGG16's, or just those the layer needs)."""
        trunk = cls(layer, pool)
        needed = trunk.state_dict().keys()
        trunk.load_state_dict({k: state_dict[k] for k in needed}, assign=True)
        return trunk.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.layer != Layer.POOL5:
            return self.classifier(torch.flatten(self.avgpool(f), 1))
        if self.pool == Pool.AVG:
            return f.mean(dim=(2, 3))
        if self.pool == Pool.MAX:
            return f.amax(dim=(2, 3))
        return torch.flatten(f, 1)


@dataclass(frozen=True)
class Preset:
    """What a model's default weights say about their input (`weights.transforms()`), and their cost."""

    weights: str  # the enum member, e.g. ResNet50_Weights.IMAGENET1K_V2
    crop: int
    resize: int
    interpolation: str  # bilinear | bicubic | nearest (torchvision's InterpolationMode values)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gflops: float | None  # per image at the crop size, as torchvision's weights meta says


# VGG16's, as torchvision's VGG16_Weights.DEFAULT says (tests/test_models.py compares): written out, so that
# VGG16's model actors and training workers need not import torchvision.
_VGG16_PRESET = Preset(
    "VGG16_Weights.IMAGENET1K_V1", 224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 15.47
)


def preset(model: str, weights: str | None = "imagenet") -> Preset:
    """The preset of a torchvision classification model, by name, for its `--weights` (a torchvision weights
    name such as IMAGENET1K_V1 has its own sizes; anything else: the model's default weights'); one
    ConfigError sentence for a model or weights name torchvision does not have."""
    if model.startswith(TIMM):
        return timm_preset(model)
    named = named_weights(model, weights)
    if model == VGG16 and named in (None, "DEFAULT", _VGG16_PRESET.weights.split(".")[1]):
        return _VGG16_PRESET
    return torchvision_preset(model, named or "DEFAULT")


@functools.lru_cache(maxsize=16)
def timm_preset(model: str) -> Preset:
    """`preset` of a timm model, from its pretrained config (`timm.data.resolve_model_data_config`): the
    crop is its input size, the resize its crop / crop_pct (timm's eval transform: resize the shorter side,
    centre crop). Read from the model built on the meta device: nothing is downloaded."""
    network = timm_network(model, "meta")
    config = _timm().data.resolve_model_data_config(network)
    if config.get("crop_mode", "center") != "center":
        raise ConfigError(
            f"--model {model} crops with timm's crop_mode {config['crop_mode']!r}; raytl crops the centre."
        )
    crop = int(config["input_size"][-1])
    return Preset(
        f"timm:{model.removeprefix(TIMM)}", crop, int(crop / config["crop_pct"]), config["interpolation"],
        tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]), None,
    )  # fmt: skip


def _timm() -> Any:
    try:
        import timm
        import timm.data
    except ModuleNotFoundError:
        raise ConfigError(f"--model timm/... needs timm (PyTorch Image Models): {TIMM_INSTALL}.") from None
    return timm


def timm_network(model: str, storage: str = "cpu", pretrained: bool = False) -> nn.Module:
    """timm's model NAME without its classifier (num_classes=0: the pooled features), in eval mode."""
    timm, name = _timm(), model.removeprefix(TIMM)
    if not timm.is_model(name.split(".", 1)[0]):
        raise ConfigError(
            f"--model {model} is not one of timm's models; for example timm/vit_small_patch14_dinov2.lvd142m"
            ", timm/vit_base_patch16_clip_224.openai, timm/convnext_tiny.in12k (timm.list_models() has all)."
        )
    with torch.device(storage):
        return timm.create_model(name, pretrained=pretrained, num_classes=0).eval()


# `--weights` naming one of torchvision's weights of the model: `IMAGENET1K_V2`,
# `ResNet50_Weights.IMAGENET1K_V2`, or the id that raytl records for them
# (`torchvision:ResNet50_Weights.IMAGENET1K_V2`)
_WEIGHTS_NAME = re.compile(r"(?:torchvision:)?(?:(\w+_Weights)\.)?([A-Z][A-Z0-9_]*)")


def named_weights(model: str, spec: str | None) -> str | None:
    """The torchvision weights name that `--weights` gives (`imagenet`: DEFAULT), or None (random, a file,
    none given); a name that the model's weights do not have is one ConfigError sentence."""
    if spec is None:
        return None
    if spec == "imagenet":
        return "DEFAULT"
    if model.startswith(TIMM):  # its weights are named by the model name's tag
        return "DEFAULT" if spec == preset(model).weights else None
    found = _WEIGHTS_NAME.fullmatch(spec)
    if found is None or (not spec.startswith("torchvision:") and os.path.exists(spec)):
        return None
    enum = _weights_enum(model)
    names = [w.name for w in enum]
    if found.group(1) not in (None, enum.__name__) or found.group(2) not in [*names, "DEFAULT"]:
        raise ConfigError(
            f"--weights {spec} is not one of {model}'s torchvision weights ({', '.join(names)}), imagenet "
            "(its default), random, or a state_dict file's path or URI."
        )
    weights, default = enum[found.group(2)].transforms(), enum.DEFAULT.transforms()
    if (weights.mean, weights.std) != (default.mean, default.std):
        raise ConfigError(
            f"--weights {spec} normalises images unlike {model}'s other weights (mean {list(weights.mean)}), "
            "which raytl does not support."
        )
    return found.group(2)


def torchvision_preset(model: str, name: str = "DEFAULT") -> Preset:
    """`preset`, read from torchvision's weights of that name."""
    weights = _weights_enum(model)[name]
    transforms = weights.transforms()
    return Preset(
        f"{type(weights).__name__}.{weights.name}",
        int(transforms.crop_size[0]),
        int(transforms.resize_size[0]),
        transforms.interpolation.value,
        tuple(float(v) for v in transforms.mean),
        tuple(float(v) for v in transforms.std),
        weights.meta.get("_ops"),
    )


def _weights_enum(model: str) -> Any:
    import torchvision

    if model not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"--model {model!r} is not a torchvision classification model; for example vgg16, resnet50, "
            "convnext_tiny, efficientnet_v2_s, vit_b_16 (torchvision.models.list_models() names them all)."
        )
    return torchvision.models.get_model_weights(model)


def resolved(config: Any) -> Any:
    """An extract or embed config with the crop and resize sizes set: --image-size, else the crop the
    model's weights expect; --resize-size, else the crop scaled by the weights' resize / crop ratio."""
    found = preset(config.model, config.weights)
    size = config.image_size or found.crop
    resize = config.resize_size or round(size * found.resize / found.crop)
    return dataclasses.replace(config, image_size=size, resize_size=resize)


def trunk(model: str, layer: Layer = Layer.POOL5, pool: Pool = Pool.AVG, storage: str = "meta") -> nn.Module:
    """The backbone without weights: VGG16's trunk, or the model with its final classifier layer (its last
    nn.Linear) replaced by an identity, so that it returns that layer's input: the pooled 2048-d of a
    ResNet-50, the class token of a ViT. On the meta device (no memory) unless `storage` is "cpu"."""
    if model == VGG16:
        return VGG16Trunk(layer, pool)
    if model.startswith(TIMM):
        return timm_network(model, storage)
    import torchvision

    options = _builder_options(model)
    try:
        with torch.device(storage):
            network = torchvision.models.get_model(model, weights=None, **options)
    except NotImplementedError:  # a builder that computes with tensors (RegNet's widths) cannot run on meta
        with _ParametersOnMeta():
            network = torchvision.models.get_model(model, weights=None, **options)
    last = final_layer(network, model)
    parent, _, leaf = last.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, leaf, nn.Identity())
    return network.eval()


class _ParametersOnMeta(TorchFunctionMode):
    """Tensors made by the constructors that nn.Module parameters and buffers use (empty, zeros, ones,
    full) on the meta device; the rest (arange, tensor: what RegNet's builder computes its stage widths
    with, and reads back) on the CPU. Builds regnet_y_128gf in 0.3 s, not 18 s and 2.6 GB of weights."""

    _ON_META = frozenset((torch.empty, torch.zeros, torch.ones, torch.full))

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in self._ON_META and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _builder_options(model: str) -> dict[str, Any]:
    """What torchvision's builder sets from a model's default weights when it loads them, which raytl sets
    itself (it builds with weights=None, then loads the tensors): a ViT's image_size (vit_h_14's default
    weights are for 518 px crops, its builder's default 224)."""
    if not model.startswith("vit_"):
        return {}
    size = int(_weights_enum(model).DEFAULT.meta.get("min_size", (224, 224))[0])
    return {"image_size": size} if size != 224 else {}


def final_layer(network: nn.Module, model: str) -> str:
    """The name of the layer that maps a model's features to its classes: its last nn.Linear, or, for
    SqueezeNet (a classifier of Dropout, a 1x1 conv, ReLU and global pooling), its last 1x1 nn.Conv2d,
    whose removal leaves the pooled features (already ReLU'd) as the embedding."""
    modules = list(network.named_modules())
    linear = [name for name, module in modules if isinstance(module, nn.Linear)]
    conv = [
        name for name, module in modules if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
    ]
    if not linear and not conv:
        raise ConfigError(
            f"--model {model} has no final nn.Linear or 1x1 nn.Conv2d to take an embedding from."
        )
    return linear[-1] if linear else conv[-1]


def from_state_dict(model: str, state_dict: dict[str, torch.Tensor], layer: Layer, pool: Pool) -> nn.Module:
    """A backbone holding these tensors, ready to run (eval mode, on CPU)."""
    if model == VGG16:
        return VGG16Trunk.from_state_dict(state_dict, layer, pool)
    network = trunk(model, storage="cpu")
    network.load_state_dict({k: state_dict[k] for k in network.state_dict()})
    return network.eval()


def embedding_dim(layer: Layer, pool: Pool, image_size: int, model: str = VGG16) -> int:
    """D, the length of one embedding; ConfigError when the model does not take image_size px crops."""
    if model == VGG16:
        return _vgg16_dim(layer, pool, image_size)
    network = trunk(model)
    device = next(network.parameters()).device  # meta, or CPU for a builder that cannot run on meta
    try:
        with torch.no_grad():
            out = network(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as exc:
        raise ConfigError(
            f"--model {model} does not take {image_size} px crops ({type(exc).__name__}: {exc}); its "
            f"weights expect {preset(model).crop} px."
        ) from None
    return int(out.shape[1])


def _vgg16_dim(layer: Layer, pool: Pool, image_size: int) -> int:
    """D, the length of one embedding."""
    if layer != Layer.POOL5:
        return 4096
    if pool != Pool.FLATTEN:
        return 512
    side = image_size
    for _ in range(5):  # five 2x2 max-pools, each rounding down
        side //= 2
    return 512 * side * side


def load_weights(spec: str, layer: Layer, seed: int = 0, model: str = VGG16) -> Weights:
    """Load and validate `--weights` (imagenet | random | path or URI) into the tensors the backbone needs."""
    if spec == "random":
        return _random_weights(model, Layer(layer), seed)
    named = named_weights(model, spec)
    if named is not None and model.startswith(TIMM):
        state, weights_id = _timm_state_dict(model, spec), preset(model).weights
    elif named is not None:
        state = _torchvision_state_dict(model, named, spec)
        weights_id = f"torchvision:{preset(model, spec).weights}"
    else:
        state, weights_id = _state_dict_from_file(spec)
    return _fitted(state, spec, layer, model, weights_id)


@functools.lru_cache(maxsize=1)
def _random_weights(model: str, layer: Layer, seed: int) -> Weights:
    """torchvision's own initialisation of the model, seeded (a seed gives the weights it always gave), on a
    copy of the global generator. Kept for the next call in this process with the same arguments (a
    notebook's, a test suite's): VGG16 draws 138M numbers (0.6 CPU-seconds for pool5, 1.3 with its fc layers;
    torchvision's own build 1.3, after 1.4 to import it). Its tensors are shared: read them (as the model
    stages and Ray's object store do), never change them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model == VGG16:
            state = _vgg16_initialised(layer)
        elif model.startswith(TIMM):
            state = timm_network(model).state_dict()  # timm's own initialisation
        else:
            import torchvision

            state = torchvision.models.get_model(model, weights=None).state_dict()
    return _fitted(state, "random", layer, model, f"random:seed={seed}")


def _fitted(state: dict[str, torch.Tensor], spec: str, layer: Layer, model: str, weights_id: str) -> Weights:
    """The tensors of `state` that the backbone cut at `layer` needs, once they are checked to fit it."""
    needed = trunk(model, layer).state_dict().keys()
    check_fits(state, spec, needed, model)
    return Weights({k: state[k].detach().contiguous() for k in needed}, weights_id)


def _timm_state_dict(model: str, spec: str) -> dict[str, torch.Tensor]:
    """The model's pretrained weights as timm loads them (from the Hugging Face Hub, or its local cache)."""
    try:
        return timm_network(model, pretrained=True).state_dict()
    except ConfigError:
        raise
    except Exception as exc:
        raise WeightsError(
            f"--weights {spec} could not be downloaded ({storage.describe_error(exc)}); stage the model in "
            "the Hugging Face cache (HF_HOME) or save its state_dict and pass --weights PATH_OR_URI."
        ) from None


def _torchvision_state_dict(model: str, name: str, spec: str) -> dict[str, torch.Tensor]:
    weights = _weights_enum(model)[name]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        where = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"--weights {spec} could not be downloaded ({storage.describe_error(exc)}); stage the file "
            f"{os.path.basename(weights.url)} in {where} or pass --weights PATH_OR_URI."
        ) from None


def _state_dict_from_file(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    name = f"--weights {storage.redact(uri)}"
    with storage.opening(f"{name}: no such file.", f"{name} cannot be read", WeightsError):
        data = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        raise WeightsError(
            f"--weights {storage.redact(uri)} is not a PyTorch state_dict file (torch.load failed)."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {storage.redact(uri)} does not hold a state_dict of tensors.")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    digest = hashlib.sha256(data).hexdigest()[:16]
    return state, f"{storage.redact(uri)}#sha256:{digest}"


def check_fits(state: dict[str, torch.Tensor], spec: str, needed: Iterable[str], model: str = VGG16) -> None:
    """Raise WeightsError unless `state` has the `needed` tensors of the model, each at the right shape (a
    fine-tuned backbone holds only the layers it uses; a full torchvision state_dict has them all)."""
    full = trunk(model).state_dict() if model != VGG16 else _vgg16_shapes()
    expected = {k: full[k] for k in needed}
    name = "VGG16" if model == VGG16 else model
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(
            f"--weights {storage.redact(spec)} is not a torchvision {name} state_dict: "
            f"{len(missing)} tensors are missing, the first is {missing[0]!r}."
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"--weights {storage.redact(spec)} does not fit {name}: {key} has shape "
                f"{tuple(state[key].shape)}, expected {tuple(tensor.shape)}."
            )


def _vgg16_shapes() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return _VGG16().state_dict()


def prefers_channels_last(network: nn.Module) -> bool:
    """True for convnets (more than one Conv2d), whose convolutions oneDNN and cuDNN run faster in the
    channels_last layout; a transformer's single patch-embedding conv gains nothing (bench/backbones.py,
    2 AVX2 cores, fp32 images/s channels_last vs NCHW: vgg16 3.87 vs 2.28, resnet50 9.91 vs 8.68,
    convnext_tiny 6.97 vs 7.06, vit_b_16 2.54 vs 2.78)."""
    return sum(isinstance(m, nn.Conv2d) for m in network.modules()) > 1


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX-512-BF16, where bf16 autocast is several times faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def model_device(device: Device = Device.AUTO) -> torch.device:
    """Where a model runs in this process: the CPU for Device.CPU, else CUDA where it works. A Ray actor
    that Ray gave no GPU still sees the node's GPUs (Ray leaves CUDA_VISIBLE_DEVICES alone when num_gpus is
    0), so its driver passes CPU: a model actor or replica of `--device cpu` placed on a GPU node must not
    take a GPU that Ray gives to others."""
    return torch.device("cuda" if device != Device.CPU and torch.cuda.is_available() else "cpu")


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """`auto` -> bf16 on CUDA (with bf16 support) and fast-bf16 CPUs, else fp32; others unchanged."""
    if precision != Precision.AUTO:
        return precision
    if device.type == "cuda":
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    return Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32
