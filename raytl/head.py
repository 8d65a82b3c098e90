"""The classifier stored in MODEL_DIR: standardisation, a linear layer (or scikit-learn's RBF SVC), its
classes and its backbone."""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raytl import storage

MODEL_FILE = "model.pt"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.json"
KERNEL_FILE = "kernel.pkl"  # --kernel rbf: the fitted scikit-learn pipeline, pickled (trust its MODEL_DIR)


class LinearHead(nn.Module):
    """logits = W ((x - mean) / std) + b: the standardisation travels with the weights."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.linear = nn.Linear(mean.numel(), classes)
        nn.init.zeros_(self.linear.weight)  # the convex problem needs no random start; zeros are reproducible
        nn.init.zeros_(self.linear.bias)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@dataclass(frozen=True)
class Model:
    """What `raytl predict` loads: the head's tensors and the description written beside them."""

    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (classes, D)
    bias: np.ndarray  # (classes,)
    info: dict[str, Any]  # model.json: kind, head, backend, backbone (embedding metadata), training data
    kernel: Any = None  # --kernel rbf: a fitted scikit-learn Pipeline(StandardScaler, SVC); weight unused

    @classmethod
    def from_head(cls, head: LinearHead, classes: list[str], info: dict[str, Any]) -> Model:
        state = {k: v.detach().cpu().numpy() for k, v in head.state_dict().items()}
        return cls(classes, state["mean"], state["std"], state["linear.weight"], state["linear.bias"], info)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, D) embeddings -> (N, classes) logits (SVM: decision margins), in numpy (no torch
        needed on the hot path)."""
        if self.kernel is not None:
            margins = np.asarray(self.kernel.decision_function(x), np.float32)
            return np.stack([-margins, margins], axis=1) if margins.ndim == 1 else margins
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (class index, score) per row: logreg's probability of that class, or the SVM's margin."""
        logits = self.logits(x)
        if self.info.get("head") == "svm":
            index = logits.argmax(axis=1)
            return index, logits[np.arange(len(index)), index]
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        index = prob.argmax(axis=1)
        return index, prob[np.arange(len(index)), index]

    def save(self, model_dir: str) -> None:
        tensors = {
            "mean": torch.from_numpy(self.mean),
            "std": torch.from_numpy(self.std),
            "weight": torch.from_numpy(self.weight),
            "bias": torch.from_numpy(self.bias),
        }
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        storage.write_bytes(storage.join(model_dir, MODEL_FILE), buffer.getvalue())
        if self.kernel is not None:
            storage.write_bytes(storage.join(model_dir, KERNEL_FILE), pickle.dumps(self.kernel))
        info = dict(self.info, classes=self.classes)
        storage.write_bytes(storage.join(model_dir, MODEL_JSON), json.dumps(info, indent=2).encode())

    @classmethod
    def load(cls, model_dir: str) -> Model:
        try:
            info = json.loads(storage.read_bytes(storage.join(model_dir, MODEL_JSON)))
            tensors = torch.load(
                io.BytesIO(storage.read_bytes(storage.join(model_dir, MODEL_FILE))), weights_only=True
            )
        except FileNotFoundError:
            raise storage.StorageError(
                f"MODEL_DIR {storage.redact(model_dir)} holds no raytl model ({MODEL_JSON} and {MODEL_FILE})."
            ) from None
        arrays = {k: v.numpy().astype(np.float32) for k, v in tensors.items()}
        kernel = None
        if info.get("kernel") == "rbf":
            kernel = pickle.loads(storage.read_bytes(storage.join(model_dir, KERNEL_FILE)))
        return cls(
            info["classes"], arrays["mean"], arrays["std"], arrays["weight"], arrays["bias"], info, kernel
        )
