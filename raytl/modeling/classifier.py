"""The classifier stored in MODEL_DIR: standardisation, a linear layer (or scikit-learn's RBF SVC), its
classes and its backbone."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from raytl.errors import StorageError, WeightsError
from raytl.files import storage
from raytl.files.embeddings import matrix
from raytl.modeling.model_dir import (
    BACKBONE_FILE,
    KERNEL_FILE,
    MODEL_FILE,
    MODEL_JSON,
    Backbone,
    ModelInfo,
    classes_of,
    named,
    read_files,
    write_json,
)
from raytl.vision.models import Weights, load_weights


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
    info: ModelInfo  # model.json: kind, head, backend, backbone (embedding metadata), training data
    kernel: Any = None  # --kernel rbf: a fitted scikit-learn Pipeline(StandardScaler, SVC); weight unused

    @property
    def backbone(self) -> Backbone:
        """How the model's embeddings are made (model.json's `backbone`, checked)."""
        return self.info.backbone

    @classmethod
    def from_head(cls, head: LinearHead, classes: list[str], info: ModelInfo) -> Model:
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
        if self.info.svm:
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
            import skops.io  # here, not at the top: it imports all of scikit-learn (~5 s a process)

            storage.write_bytes(storage.join(model_dir, KERNEL_FILE), skops.io.dumps(self.kernel))
        write_json(model_dir, MODEL_JSON, self.info.to_json(self.classes))

    @classmethod
    def load(cls, model_dir: str) -> Model:
        raw, data = read_files(model_dir, MODEL_JSON, MODEL_FILE)
        arrays = _tensors(data, storage.join(model_dir, MODEL_FILE))
        classes = classes_of(raw, named(model_dir))
        _check(classes, arrays, model_dir)
        info = ModelInfo.parse(raw, named(model_dir))  # every field, once
        kernel = _kernel(model_dir) if info.kernel == "rbf" else None
        return cls(classes, arrays["mean"], arrays["std"], arrays["weight"], arrays["bias"], info, kernel)


def _tensors(data: bytes, uri: str) -> dict[str, np.ndarray]:
    """model.pt's four arrays; a damaged file is one StorageError sentence."""
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        arrays = {k: tensors[k].numpy().astype(np.float32) for k in ("mean", "std", "weight", "bias")}
    except Exception as exc:
        raise StorageError(
            f"{storage.redact(uri)} is not a raytl model file ({storage.describe_error(exc)}): it was "
            "damaged; restore it or train again."
        ) from None
    return arrays


def _check(classes: list[str], arrays: dict[str, np.ndarray], model_dir: str) -> None:
    """model.json and model.pt agree: classes, dimension and shapes."""
    where = named(model_dir)
    dim = arrays["mean"].size
    if arrays["weight"].shape != (len(classes), dim) or arrays["bias"].shape != (len(classes),):
        raise StorageError(
            f"{where}: {MODEL_FILE} has weights of shape {arrays['weight'].shape} but {MODEL_JSON} names "
            f"{len(classes)} classes of {dim}-d embeddings; the two files come from different models."
        )


def _kernel(model_dir: str) -> Any:
    """The RBF SVC pipeline, loaded by skops with only the types scikit-learn's and numpy's own estimators
    need; anything else in the file is refused, never run."""
    import skops.io  # here, not at the top: it imports all of scikit-learn (~5 s a process)

    uri = storage.join(model_dir, KERNEL_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise StorageError(
            f"{named(model_dir)} names an RBF kernel in {MODEL_JSON} but has no "
            f"{KERNEL_FILE}; train it again."
        ) from None
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
        if untrusted:
            raise StorageError(
                f"{storage.redact(uri)} holds types raytl does not load ({', '.join(untrusted[:3])}); it "
                "was not written by raytl train."
            )
        return skops.io.loads(data)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(
            f"{storage.redact(uri)} is not a scikit-learn model raytl can load "
            f"({storage.describe_error(exc)})."
        ) from None


def classify(batch: pa.Table, model: Model, dim: int) -> pa.Table:
    """Rows with `embedding` (null where decoding failed) -> path, predicted_label, score, label, correct,
    error."""
    n = batch.num_rows
    error = batch["error"] if "error" in batch.column_names else pa.array([""] * n)
    ok = np.asarray(batch["embedding"].is_valid())
    names = np.array(model.classes, dtype=object)
    predicted = np.full(n, None, dtype=object)
    score = np.zeros(n, dtype=np.float32)
    if ok.any():
        embedded = batch["embedding"].filter(pa.array(ok))
        index, probability = model.predict(matrix(embedded, dim))
        predicted[ok], score[ok] = names[index], probability
    labels = batch["label"].to_pylist() if "label" in batch.column_names else [None] * n
    correct = [
        None if not label or p is None else p == label for label, p in zip(labels, predicted, strict=True)
    ]
    return pa.table(
        {
            "path": batch["path"],
            "predicted_label": pa.array(predicted.tolist(), pa.string()),
            "score": pa.array(score),
            "label": pa.array([label or None for label in labels], pa.string()),
            "correct": pa.array(correct, pa.bool_()),
            "error": error,
        }
    )


# --- the backbone a model's embeddings came from -----------------------------------------------------------


def backbone_weights(model: Model, model_dir: str, weights: str | None = None) -> Weights:
    """The tensors of the model's backbone: from where the model's embeddings were made (a fine-tuned
    backbone lives in MODEL_DIR itself), or from `weights` when they moved; other weights are refused."""
    backbone = model.backbone
    spec = weights or default_weights(model, model_dir)
    loaded = load_weights(spec, backbone.layer, weights_spec(backbone.weights)[1], backbone.model)
    if weights_content(loaded.id) != weights_content(backbone.weights) and not weights:
        raise WeightsError(
            f"the backbone weights changed since the model was trained: {loaded.id} != {backbone.weights}."
        )
    return loaded


def default_weights(model: Model, model_dir: str) -> str:
    """The --weights the model's backbone came from; a fine-tuned backbone lives in MODEL_DIR itself."""
    if model.info.kind == "finetune":
        return storage.join(model_dir, BACKBONE_FILE)
    return weights_spec(model.backbone.weights)[0]


def weights_content(weights_id: str) -> str:
    """What identifies weights: a file's digest (files may move with their MODEL_DIR), else the id."""
    return weights_id.rsplit("#sha256:", 1)[-1]


def weights_spec(weights_id: str) -> tuple[str, int]:
    """A weights id from the metadata back to a --weights value (and seed)."""
    if weights_id.startswith("torchvision:"):  # torchvision's (VGG16_Weights.IMAGENET1K_V1, ...)
        return weights_id, 0  # --weights takes the id as it is
    if weights_id.startswith("random:seed="):
        return "random", int(weights_id.split("=", 1)[1])
    return weights_id.split("#sha256:", 1)[0], 0
