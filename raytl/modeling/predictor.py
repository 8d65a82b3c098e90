"""A MODEL_DIR's classifier in this process: images in, labels and scores out (`raytl.load`, and what each
`raytl serve` replica runs)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from raytl.config import Decode, Device, LoadConfig, ServeConfig
from raytl.errors import ImageError
from raytl.modeling import portable
from raytl.modeling.classifier import Model
from raytl.vision.models import model_device
from raytl.vision.preprocess import Transform


class Predictor:
    """A classifier of uint8 crops (`modeling.portable`, what `raytl export` saves: fp32, eval mode) on
    `device`, with the crop its embeddings were made with (extract's preprocessing, --decode draft
    included). `predict(images)`: encoded files (bytes), uint8 arrays (H, W) or (H, W, C), PIL images or
    {"bytes": ...} dicts -> one {"label", "score", "scores"} an image, `score` as in predict's output.
    Made from a MODEL_DIR (`load`) or from an exported program (`from_program`: the MLflow model)."""

    def __init__(self, network: Any, classes: list[str], transform: Transform, device: torch.device) -> None:
        self.network, self.classes, self.transform, self.device = network, classes, transform, device

    @classmethod
    def load(cls, config: LoadConfig | ServeConfig, device: Device | None = None) -> Predictor:
        """MODEL_DIR's model on `device` (default: the config's)."""
        model = Model.load(config.model_dir)
        on = model_device(device or config.device)  # serve: its replica's (a GPU if Ray gave one)
        network = portable.build(model, config.model_dir, config.weights).to(on)
        b = model.backbone
        transform = Transform(
            b.image_size, b.resize, config.max_pixels, b.interpolation, b.decode == Decode.DRAFT
        )
        return cls(network, list(model.classes), transform, on)

    @classmethod
    def from_program(cls, path: str) -> Predictor:
        """A `.pt2` that `raytl export` wrote (its raytl.json gives the classes and the crop), on the CPU."""
        extra = {portable.INFO_FILE: ""}
        program = torch.export.load(path, extra_files=extra)
        info = json.loads(extra[portable.INFO_FILE])
        pre = info["preprocessing"]
        transform = Transform(
            int(pre["crop"]), int(pre["resize"]), interpolation=pre["interpolation"],
            draft=pre.get("decode") == str(Decode.DRAFT),
        )  # fmt: skip
        return cls(program.module(), list(info["classes"]), transform, torch.device("cpu"))

    def scores(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops (N, S, S, 3) -> float32 (N, classes): probabilities, or an SVM's margins."""
        with torch.inference_mode():
            return self.network(torch.from_numpy(crops).to(self.device)).float().cpu().numpy()

    def answer(self, scores: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
        """One image's scores -> {"label", "score", "scores"} (`top_k`: the K best classes, best first)."""
        order = np.argsort(-scores, kind="stable")[:top_k] if top_k else range(len(self.classes))
        best = int(np.argmax(scores))
        return {
            "label": self.classes[best],
            "score": float(scores[best]),
            "scores": {self.classes[i]: float(scores[i]) for i in order},
        }

    def predict(self, images: Iterable[Any], batch_size: int = 32, top_k: int | None = None) -> list[dict]:
        """Each image's label and scores; ImageError naming the first one that is not a usable image."""
        crops = []
        for i, image in enumerate(images):
            try:
                crops.append(self.transform.of_value(image))
            except ImageError as exc:
                raise ImageError(f"image {i} is not a usable image: {exc}") from None
        answers: list[dict] = []
        for start in range(0, len(crops), batch_size):
            scores = self.scores(np.stack(crops[start : start + batch_size]))
            answers.extend(self.answer(row, top_k) for row in scores)
        return answers
