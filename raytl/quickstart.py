"""`raytl quickstart`: a small real labelled corpus (scikit-learn's digits as PNG files) through raytl."""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from raytl import storage
from raytl.config import ExtractConfig, Layer
from raytl.models import WeightsError, load_weights

IMAGE_PX = 64  # digits are 8x8; 64 px keeps VGG16 quick on a laptop CPU and leaves a 2x2 pool5 map


def run(workdir: str) -> int:
    """Write the corpus, extract embeddings, print where everything is."""
    from raytl import extract

    corpus = os.path.join(workdir, "corpus")
    count = write_digits(corpus)
    print(f"corpus: {count} labelled digit images (scikit-learn's load_digits) in {corpus}")
    weights = choose_weights()
    config = ExtractConfig.create(
        source=corpus,
        output=os.path.join(workdir, "embeddings"),
        weights=weights,
        image_size=IMAGE_PX,
        overwrite=True,
    )
    summary = extract.run(config)
    print(
        f"embeddings: {summary['embedded']} of {summary['seen']} images at {summary['images_per_second']} "
        f"images/s ({summary['failed']} failed) -> {config.output}"
    )
    return 0


def write_digits(root: str) -> int:
    """scikit-learn's 1,797 8x8 digits as 64x64 PNG files, class-per-folder; skipped if already there."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
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
            "and any classifier on them, are much weaker.",
            file=sys.stderr,
        )
        return "random"
