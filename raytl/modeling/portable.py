"""A MODEL_DIR's classifier as one torch module, uint8 crops in and class scores out: what `raytl export`
saves for plain PyTorch and what `raytl serve` runs in its replicas."""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch import nn

from raytl.errors import ConfigError
from raytl.files import storage
from raytl.modeling.classifier import Model, backbone_weights
from raytl.modeling.model_dir import named
from raytl.version import VERSION
from raytl.vision.models import embedding_dim, from_state_dict

INFO_FILE = "raytl.json"  # the extra file inside an exported program: `describe`


class Portable(nn.Module):
    """uint8 RGB crops (N, S, S, 3) -> (N, classes) scores, as `raytl predict` computes them: the backbone
    on normalised pixels, the head on standardised embeddings, then softmax probabilities (a logistic
    regression or fine-tuned head) or the SVM's margins."""

    def __init__(self, trunk: nn.Module, model: Model, image_size: int) -> None:
        super().__init__()
        self.trunk, self.image_size = trunk, image_size
        self.softmax = not model.info.svm
        mean, std = model.backbone.mean, model.backbone.std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for name in ("mean", "std", "weight", "bias"):
            self.register_buffer(name, torch.from_numpy(getattr(model, name)).float())

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        torch._check(images.shape[1] == size and images.shape[2] == size and images.shape[3] == 3)
        x = images.permute(0, 3, 1, 2).float().contiguous()
        x = x.div(255).sub(self.pixel_mean).div(self.pixel_std)
        logits = ((self.trunk(x) - self.mean) / self.std) @ self.weight.T + self.bias
        return torch.softmax(logits, dim=1) if self.softmax else logits


def check_linear(model: Model, model_dir: str, verb: str) -> None:
    """Raise ConfigError for an RBF-kernel SVM: scikit-learn's SVC has no linear layer to run in torch."""
    if model.kernel is not None:
        raise ConfigError(
            f"MODEL_DIR {storage.redact(model_dir)} holds an RBF-kernel SVM (scikit-learn's SVC), "
            f"which has no linear layer to {verb}; train it with --kernel linear to {verb} it."
        )


def build(model: Model, model_dir: str, weights: str | None = None) -> Portable:
    """The model's backbone (its own backbone.pt, or the weights its embeddings were made with; `weights`
    when they moved) and head as one module, in eval mode, in fp32."""
    check_linear(model, model_dir, "run")
    backbone = model.backbone
    dim = embedding_dim(backbone.layer, backbone.pool, backbone.image_size, backbone.model)
    takes = model.weight.shape[1]
    if dim != takes:
        raise ConfigError(
            f"{named(model_dir)}'s head takes {takes}-dimensional embeddings, but its backbone "
            f"({backbone.model} at {backbone.image_size} px) gives {dim}: they were made by another backbone."
        )
    state = backbone_weights(model, model_dir, weights)
    trunk = from_state_dict(backbone.model, state.state_dict, backbone.layer, backbone.pool)
    return Portable(trunk, model, backbone.image_size).eval()


def export(model: Model, model_dir: str, weights: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """The model as torch.export's ExportedProgram (a `.pt2` file's bytes, any batch size) with `describe`
    inside as raytl.json; and that description."""
    network = build(model, model_dir, weights)
    size = network.image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes={"images": {0: batch}})
    info = describe(model, model_dir)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={INFO_FILE: json.dumps(info, indent=2)})
    return buffer.getvalue(), info


def describe(model: Model, model_dir: str) -> dict[str, Any]:
    """An exported program's raytl.json: what goes in, what comes out, and how the images must be prepared."""
    backbone = model.backbone
    size, resize, interpolation = backbone.image_size, backbone.resize, backbone.interpolation
    return {
        "format": "raytl-export/1",
        "raytl": VERSION,
        "torch": torch.__version__,
        "input": f"uint8 RGB crops, shape (N, {size}, {size}, 3), prepared as `preprocessing` says",
        "scores": "SVM margins" if model.info.svm else "softmax probabilities",
        "classes": model.classes,
        "preprocessing": {
            "steps": [
                "EXIF orientation applied, converted to RGB",
                f"shorter side resized to {resize} px ({interpolation}, antialiased)",
                f"centre crop of {size} x {size} px",
            ],
            "resize": resize,
            "crop": size,
            "interpolation": interpolation,
            # extract's --decode (draft: a JPEG at least twice the resize decoded at 1/2, 1/4 or 1/8 scale)
            "decode": str(backbone.decode),
            # inside the program: pixels / 255, then these per channel
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        },
        "precision": "fp32",
        "model": {k: v for k, v in model.info.to_json(model.classes).items() if k != "backbone"},
        "backbone": model.info.recorded_backbone,  # as recorded (checked into `model.backbone`)
        "model_dir": storage.redact(model_dir),
    }
