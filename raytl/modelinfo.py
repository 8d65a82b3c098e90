"""model.json's `backbone` (the embeddings' metadata a model was trained on) as a checked, typed record:
read once, when a MODEL_DIR is loaded, so that predict, export and serve never look a key up themselves.

A MODEL_DIR may come from elsewhere or be edited by hand: every field is checked, each bad one named in the
one sentence that refuses it, and a model that is not a torchvision classification model is refused by
name (nothing a MODEL_DIR names is downloaded to find out what it is)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raytl.config import ConfigError, Decode, Layer, Pool, Precision
from raytl.errors import StorageError
from raytl.models import IMAGENET_MEAN, IMAGENET_STD, VGG16, preset
from raytl.preprocess import INTERPOLATIONS


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
        precision=_choice(Precision, raw.get("precision", "auto"), "backbone.precision", problems)
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
        problems.append(f"backbone.model is {value!r}, not a torchvision classification model")
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
