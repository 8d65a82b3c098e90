"""A MODEL_DIR's classifier as one torch module, uint8 crops in and class scores out: what `raytl export`
saves for plain PyTorch and what `raytl serve` runs in its replicas."""

from __future__ import annotations

import torch
from torch import nn

from raytl.errors import ConfigError
from raytl.files import storage
from raytl.modeling.classifier import Model, backbone_weights
from raytl.vision.models import from_state_dict


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
    state = backbone_weights(model, model_dir, weights)
    trunk = from_state_dict(backbone.model, state.state_dict, backbone.layer, backbone.pool)
    return Portable(trunk, model, backbone.image_size).eval()
