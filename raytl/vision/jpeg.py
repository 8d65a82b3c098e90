"""JPEGs decoded, EXIF-oriented, resized and centre-cropped on the model's device (nvJPEG on CUDA)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from raytl.vision.preprocess import CROP, JPEG, Transform

# EXIF orientation -> the operation on (..., H, W) that makes the image upright, as ImageOps.exif_transpose.
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


class DeviceDecoder:
    """Columns data, kind, orientation (preprocess.fetch_batch) -> (uint8 NHWC crops on device, errors).

    Decoding runs batched on the GPU (nvJPEG); the resize is torchvision's antialiased bilinear on tensors, so
    crops differ from Pillow's by rounding (a few grey levels at most): embeddings record `decode: gpu`."""

    def __init__(self, transform: Transform, device: torch.device) -> None:
        self.size = transform.image_size
        self.resize = transform.resize_size
        self.interpolation = InterpolationMode(transform.interpolation)
        self.device = device

    def __call__(
        self, data: np.ndarray, kind: np.ndarray, orientation: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        out = torch.zeros((len(kind), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        errors = np.full(len(kind), "", dtype=object)
        decoded = self._decode(np.flatnonzero(kind == JPEG), data, errors)
        # Same-sized images with the same orientation are resized together: one kernel launch per group.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in decoded.items():
            groups[(*image.shape, int(orientation[i]))].append(i)
        for (*_, upright), rows in groups.items():
            images = _UPRIGHT[upright](torch.stack([decoded[i] for i in rows]))
            out[rows] = self._resize_crop(images).permute(0, 2, 3, 1)
        crops = np.flatnonzero(kind == CROP)
        if len(crops):
            shape = (self.size, self.size, 3)
            ready = np.stack([np.frombuffer(data[i], dtype=np.uint8).reshape(shape) for i in crops])
            out[crops.tolist()] = torch.from_numpy(ready).to(self.device)
        return out, errors.astype(str)

    def _decode(self, rows: np.ndarray, data: np.ndarray, errors: np.ndarray) -> dict[int, torch.Tensor]:
        """Row -> CHW uint8 RGB on device; a failed batch is decoded one by one to find the broken files."""
        if not len(rows):
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # read-only bytes (torch only reads them); torchvision's deprecation
            encoded = [torch.from_numpy(np.frombuffer(data[i], dtype=np.uint8)) for i in rows]
            try:
                return dict(zip(rows.tolist(), self._jpeg(encoded), strict=True))
            except RuntimeError:
                pass
            out = {}
            for i, one in zip(rows.tolist(), encoded, strict=True):
                try:
                    out[i] = self._jpeg([one])[0]
                except RuntimeError as exc:
                    errors[i] = f"cannot decode: {str(exc).strip().splitlines()[0]}"
            return out

    def _jpeg(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W uint8 -> N x 3 x size x size: shorter side to resize_size, then the centre crop."""
        images = F.resize(images, [self.resize], interpolation=self.interpolation, antialias=True)
        return F.center_crop(images, [self.size])
