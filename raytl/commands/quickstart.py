"""`raytl quickstart`: a small real labelled corpus (scikit-learn's digits as PNG files) through
extract -> train -> predict, on this machine."""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from raytl.config import ExtractConfig, Layer, PredictConfig, TrainConfig
from raytl.errors import WeightsError
from raytl.files import storage
from raytl.modeling.model_dir import REPORT_FILE
from raytl.vision.models import load_weights

IMAGE_PX = 64  # digits are 8x8; 64 px keeps VGG16 quick on a laptop CPU and leaves a 2x2 pool5 map
HELD_OUT = 297  # the last digits play "new images" for predict


def run(workdir: str) -> int:
    """Write the corpus, then extract, train and predict; print the accuracy and where everything is."""
    from raytl.commands import extract, predict, train

    paths = {
        name: os.path.join(workdir, name) for name in ("train", "new", "embeddings", "model", "predictions")
    }
    count = write_digits(paths["train"], paths["new"])
    print(f"corpus: {count} labelled digit images (scikit-learn's load_digits), class-per-folder")
    weights = choose_weights()
    config = ExtractConfig.create(
        source=paths["train"],
        output=paths["embeddings"],
        weights=weights,
        image_size=IMAGE_PX,
        overwrite=True,
    )
    summary = extract.run(config)
    print(f"extract: {summary['embedded']} embeddings at {summary['images_per_second']} images/s")
    metrics = train.run(
        TrainConfig.create(embeddings=paths["embeddings"], model_dir=paths["model"], overwrite=True)
    )
    print(f"train: linear probe with Ray Train, validation accuracy {metrics['accuracy']:.3f}")
    result = predict.run(
        PredictConfig.create(
            model_dir=paths["model"], source=paths["new"], output=paths["predictions"], overwrite=True
        )
    )
    print(f"predict: {result['predicted']} new images, accuracy {result['accuracy']:.3f}")
    print(
        "\n".join(
            [
                "outputs:",
                f"  images       {paths['train']} (training), {paths['new']} (new)",
                f"  embeddings   {paths['embeddings']}  (Parquet; _summary.json, _errors/)",
                f"  model        {paths['model']}  (model.pt, model.json, metrics.json, train/ checkpoints)",
                f"  report       {os.path.join(paths['model'], REPORT_FILE)}  (open it in a browser)",
                f"  predictions  {paths['predictions']}  (Parquet: path, predicted_label, score, label)",
                "next: how many labels the digits need, accuracy against labels per class:",
                f"  raytl curve {paths['embeddings']} {os.path.join(workdir, 'curve')}",
            ]
        )
    )
    return 0


def write_digits(train_root: str, new_root: str) -> int:
    """scikit-learn's 1,797 8x8 digits as 64x64 PNG files, class-per-folder; skipped if already there."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    held_out_from = len(digits.target) - HELD_OUT
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        root = new_root if i >= held_out_from else train_root
        path = os.path.join(root, str(target), f"digit-{i:04d}.png")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grey = (pixels * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(grey).resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BILINEAR).save(path)
    return len(digits.target)


def choose_weights() -> str:
    """ImageNet weights when they can be had; otherwise say so plainly and use seeded random weights."""
    try:
        load_weights("imagenet", Layer.POOL5)
        print("weights: torchvision's ImageNet VGG16")
        return "imagenet"
    except WeightsError as exc:
        print(
            f"weights: ImageNet VGG16 weights are not available here ({storage.redact(str(exc))}). "
            "Carrying on with seeded random weights: the pipeline runs the same, but the features, "
            "and any classifier on them, are weaker.",
            file=sys.stderr,
        )
        return "random"
