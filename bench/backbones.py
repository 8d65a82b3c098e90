"""Images per second of each backbone's model stage on this machine: raytl's Embedder (what a model actor
runs) on ready uint8 crops at the crop size the model's weights expect, in fp32 and in bf16 autocast, with
the network and its inputs in channels_last and in NCHW, to see what that layout buys per family (raytl
picks channels_last for convnets: models.prefers_channels_last).

    python bench/backbones.py           # vgg16 resnet50 convnext_tiny efficientnet_v2_s vit_b_16
    python bench/backbones.py --models resnet50 swin_t --images 64 --precision fp32 --layout channels_last

Weights: seeded random (the speed is the same as with the trained ones). Printed per model: embedding
dimension, crop and resize sizes, torchvision's GFLOPs per image, images/s per precision and layout (after
one warm-up batch), and the threads torch used.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from raytl.cluster.embedder import Embedder
from raytl.config import Layer, Pool, Precision
from raytl.vision.models import embedding_dim, load_weights, preset

DEFAULT = ["vgg16", "resnet50", "convnext_tiny", "efficientnet_v2_s", "vit_b_16"]


def measure(model: str, images: int, batch: int, precisions: list[str], layouts: list[str]) -> dict:
    found = preset(model)
    weights = load_weights("random", Layer.POOL5, 0, model)
    crops = np.random.default_rng(0).integers(0, 256, (images, found.crop, found.crop, 3), dtype=np.uint8)
    row: dict = {
        "model": model,
        "dim": embedding_dim(Layer.POOL5, Pool.AVG, found.crop, model),
        "crop": found.crop,
        "resize": found.resize,
        "gflops": found.gflops,
        "threads": torch.get_num_threads(),
    }
    for precision in precisions:
        for layout in layouts:
            embedder = Embedder(
                weights.state_dict, precision=Precision(precision), batch_size=batch, model=model,
                mean=found.mean, std=found.std,
            )  # fmt: skip
            network = embedder.model.to(  # type: ignore[attr-defined]
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
            )  # whichever raytl chose for the model (models.prefers_channels_last)
            embedder.channels_last = layout == "channels_last"
            embedder.model = network
            embedder.embed(crops[:batch])  # warm-up
            started = time.perf_counter()
            embedder.embed(crops)
            row[f"images_per_s_{precision}_{layout}"] = round(images / (time.perf_counter() - started), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--layout", nargs="+", default=["channels_last", "nchw"], choices=["channels_last", "nchw"]
    )
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(measure(model, args.images, args.batch, args.precision, args.layout)), flush=True)


if __name__ == "__main__":
    main()
