"""--decode gpu: fetch_batch's header checks and DeviceDecoder (run here on the CPU) against Pillow's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import (
    BROKEN_REASONS,
    _exif_orientation,
    broken_files,
    encode,
    encodings,
    picture,
    random_state_dict,
)

from raytl.cluster.embedder import Embedder
from raytl.vision.jpeg import DeviceDecoder
from raytl.vision.preprocess import CROP, FAILED, JPEG, Transform, decode_batch, fetch_batch

TRANSFORM = Transform(image_size=48, resize_size=56)


def fetched(tmp_path, files: dict[str, bytes], transform: Transform = TRANSFORM) -> dict[str, np.ndarray]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = np.array([str(tmp_path / name) for name in files])
    return fetch_batch({"path": paths, "label": np.array([""] * len(files))}, transform)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    data = encode(picture(orientation, 90, 60), "JPEG", quality=95, exif=_exif_orientation(orientation))
    batch = fetched(tmp_path, {"a.jpg": data})
    assert batch["kind"].tolist() == [JPEG] and batch["orientation"].tolist() == [orientation]
    crops, errors = DeviceDecoder(TRANSFORM, torch.device("cpu"))(
        batch["data"], batch["kind"], batch["orientation"]
    )
    assert errors.tolist() == [""]
    expected = TRANSFORM(data).astype(int)
    difference = np.abs(crops[0].numpy().astype(int) - expected)
    # Same libjpeg decode; torchvision's uint8 antialiased resize rounds differently from Pillow's by a level.
    assert difference.max() <= 2 and difference.mean() < 0.5, (difference.max(), difference.mean())


def test_mixed_batch_kinds_errors_and_embeddings(tmp_path):
    """Every encoding and broken file: JPEGs go to the device, others arrive as crops, errors stay per row."""
    files = {**encodings(3), **broken_files()}
    batch = fetched(tmp_path, files)
    kinds = dict(zip(files, batch["kind"].tolist(), strict=True))
    assert {n for n, k in kinds.items() if k == JPEG} == {
        "baseline-3.jpg",
        "progressive-3.JPEG",
        "gray-3.jpg",
        "rotated-3.jpg",
        "truncated.jpg",  # its header is fine: the device decoder finds the damage
    }
    assert kinds["cmyk-3.jpg"] == CROP and kinds["plain-3.png"] == CROP
    assert (
        kinds["bomb.png"] == FAILED and "decompression bomb" in batch["error"][list(files).index("bomb.png")]
    )

    state = {k: v for k, v in random_state_dict(4).items() if k.startswith("features.")}
    on_device = Embedder(state, batch_size=4, device_decode=TRANSFORM)(batch)
    reference = decode_batch({"path": batch["path"], "label": batch["label"]}, TRANSFORM)
    on_cpu = Embedder(state, batch_size=4)(reference)
    errors = dict(zip(files, on_device["error"].to_pylist(), strict=True))
    for name, reason in BROKEN_REASONS.items():
        assert errors.pop(name), name  # every broken file has its reason
        if name != "truncated.jpg":  # nvJPEG / libjpeg word truncation differently from Pillow
            assert reason in on_device["error"][list(files).index(name)].as_py()
    assert set(errors.values()) == {""}
    good = [i for i, n in enumerate(files) if n in errors]
    got = np.stack(on_device["embedding"].to_numpy(zero_copy_only=False)[good])
    expected = np.stack(on_cpu["embedding"].to_numpy(zero_copy_only=False)[good])
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.999
    assert on_device["embedding"].null_count == len(BROKEN_REASONS)
