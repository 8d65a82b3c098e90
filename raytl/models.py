"""VGG16 trunks cut at pool5 / fc6 / fc7, their weights, and the precision they run at."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from raytl import storage
from raytl.config import Layer, Pool, Precision
from raytl.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """A validated VGG16 state_dict (only the tensors the chosen layer needs) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    id: str  # recorded in the embeddings' metadata, e.g. torchvision:VGG16_Weights.IMAGENET1K_V1


class VGG16Trunk(nn.Module):
    """VGG16 up to pool5 (pooled avg / max / flattened) or up to fc6 / fc7 after their ReLU."""

    def __init__(self, layer: Layer = Layer.POOL5, pool: Pool = Pool.AVG) -> None:
        super().__init__()
        # Built without storage (VGG16's own init of 138M parameters takes seconds): the weights come
        # from `from_state_dict`.
        with torch.device("meta"):
            vgg = torchvision.models.vgg16(weights=None)
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


def embedding_dim(layer: Layer, pool: Pool, image_size: int) -> int:
    """D, the length of one embedding."""
    if layer != Layer.POOL5:
        return 4096
    if pool != Pool.FLATTEN:
        return 512
    side = image_size
    for _ in range(5):  # five 2x2 max-pools, each rounding down
        side //= 2
    return 512 * side * side


def load_weights(spec: str, layer: Layer, seed: int = 0) -> Weights:
    """Load and validate `--weights` (imagenet | random | path or URI) into the tensors `layer` needs."""
    if spec == "imagenet":
        state, weights_id = _imagenet_state_dict(), "torchvision:VGG16_Weights.IMAGENET1K_V1"
    elif spec == "random":
        torch.manual_seed(seed)
        state, weights_id = torchvision.models.vgg16(weights=None).state_dict(), f"random:seed={seed}"
    else:
        state, weights_id = _state_dict_from_file(spec)
    needed = VGG16Trunk(layer).state_dict().keys()
    check_fits_vgg16(state, spec, needed)
    return Weights({k: state[k].detach().contiguous() for k in needed}, weights_id)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        where = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"--weights imagenet could not be downloaded ({storage.describe_error(exc)}); stage the file "
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


def check_fits_vgg16(state: dict[str, torch.Tensor], spec: str, needed: Iterable[str]) -> None:
    """Raise WeightsError unless `state` has the `needed` VGG16 tensors, each at the right shape (a
    fine-tuned backbone holds only the layers it uses; a full torchvision state_dict has them all)."""
    with torch.device("meta"):
        full = torchvision.models.vgg16(weights=None).state_dict()
    expected = {k: full[k] for k in needed}
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(
            f"--weights {storage.redact(spec)} is not a torchvision VGG16 state_dict: "
            f"{len(missing)} tensors are missing, the first is {missing[0]!r}."
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"--weights {storage.redact(spec)} does not fit VGG16: {key} has shape "
                f"{tuple(state[key].shape)}, expected {tuple(tensor.shape)}."
            )


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX-512-BF16, where bf16 autocast is several times faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """`auto` -> bf16 on CUDA (with bf16 support) and fast-bf16 CPUs, else fp32; others unchanged."""
    if precision != Precision.AUTO:
        return precision
    if device.type == "cuda":
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    return Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32
