"""Fetch image bytes, decode, EXIF-orient, convert to RGB, resize and centre-crop: CPU tasks."""

from __future__ import annotations

import io
import math
import posixpath
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raytl.errors import ImageError
from raytl.files import storage

# The files raytl reads as images, by extension in any case; anything else in a SOURCE is ignored and counted,
# and a manifest row naming anything else is an `_errors` row (the file is never read).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image(path: str) -> bool:
    """True for an image file name (for `zip://MEMBER::ARCHIVE` and `tar://`, the member's; URLs without their
    query)."""
    if path.startswith(("zip://", "tar://")):
        path = path[len("zip://") :].split("::", 1)[0]
    elif path.startswith(("http://", "https://")):
        path = path.split("?", 1)[0].split("#", 1)[0]
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def not_an_image(path: str) -> str:
    """The `_errors` reason for a listed path raytl does not read."""
    return f"not read: not an image file name ({' '.join(sorted(IMAGE_EXTENSIONS))})"


# Pillow's own bomb checks (Image.MAX_IMAGE_PIXELS) run at raytl's --max-pixels: `open_image` sets the limit.
# Pillow warns at half the limit it raises at; raytl refuses at its own limit and ignores the warning.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# What Pillow's decoders raise on broken data (truncated streams, bad headers, corrupt chunks).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


@dataclass(frozen=True)
class Transform:
    """Decode bytes to the uint8 RGB crop that the model's weights' transforms() would see (by default
    VGG16_Weights.IMAGENET1K_V1's)."""

    image_size: int = 224
    resize_size: int = 256
    max_pixels: int = 89_478_485
    interpolation: str = "bilinear"  # of the resize (InterpolationMode's value), as the model's weights say
    # --decode draft: a JPEG at least twice the resize (shorter side) is decoded at 1/2, 1/4 or 1/8 scale by
    # libjpeg's scaled IDCT (Pillow's draft mode), never below the resize; other images exactly as without.
    draft: bool = False

    def __call__(self, data: bytes) -> np.ndarray:
        """bytes -> uint8 array (image_size, image_size, 3); raises ImageError with the reason."""
        return self.crop(self.decode(data))

    def crop(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> the uint8 crop. Exactly torchvision's ImageClassification on a PIL image:
        bilinear (antialiased) resize of the shorter side, then centre crop; the float conversion and
        normalisation happen on the model's device."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.resize_size * long / short)
        size = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
        if size != image.size:
            image = image.resize(size, _pil_filter(self.interpolation))
        return np.asarray(_center_crop(image, self.image_size), dtype=np.uint8)

    def of_value(self, value: object) -> np.ndarray:
        """A dataset cell -> the uint8 crop: encoded bytes (EXIF-oriented as files are), a uint8 array
        (H, W) or (H, W, C), a PIL image, or a {'bytes': ...} dict (Hugging Face's Image feature)."""
        if isinstance(value, dict) and value.get("bytes") is not None:
            value = value["bytes"]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self(bytes(value))
        if isinstance(value, np.ndarray):
            array = value
            # Ray Data gives (H, W) arrays a leading 1 when a batch mixes them with (H, W, C) ones.
            while array.ndim > 2 and array.shape[0] == 1 and (array.ndim > 3 or array.shape[2] > 4):
                array = array[0]
            if array.dtype != np.uint8 or array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] > 4:
                raise ImageError(f"an array of {value.dtype} {value.shape} is not a uint8 (H, W[, C]) image")
            value = Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        if not isinstance(value, Image.Image):
            raise ImageError(f"a {type(value).__name__} is not an image (bytes, uint8 array or PIL image)")
        check_size(value.size, self.resize_size, self.max_pixels)
        return self.crop(to_rgb(value))

    def decode(self, data: bytes) -> Image.Image:
        """bytes -> EXIF-oriented RGB PIL image."""
        image = open_image(data, self.max_pixels)
        check_size(image.size, self.resize_size, self.max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings are not errors
                if self.draft and image.format == "JPEG":
                    # The largest scale 1/k (k in 1, 2, 4, 8) with both sides still >= the resize: the
                    # shorter side, whichever way EXIF turns the image, is never upsampled afterwards.
                    image.draft(image.mode, (self.resize_size, self.resize_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
        except _DECODE_ERRORS as exc:
            raise ImageError(f"cannot decode: {exc}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """bytes -> a PIL image whose header is read and whose pixels are not decoded yet; ImageError when the
    bytes are empty, not an image, or a container declaring anything over max_pixels.

    Pillow decodes some images inside `Image.open` (the PNG inside an ICO, whatever its directory says) and
    sizes others from their contents (a GIF frame larger than its screen, a TIFF tile, a WebP canvas); its own
    decompression-bomb checks guard each of those places before any pixel is decoded, so they run here at
    raytl's limit. The one place raytl opens image bytes."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    # Pillow raises over twice its limit: half of raytl's, as a float so that an odd limit stays exact.
    Image.MAX_IMAGE_PIXELS = max_pixels / 2  # type: ignore[assignment]
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} px" if found else "more pixels"
        raise ImageError(
            f"image of {size} exceeds --max-pixels {max_pixels} (decompression bomb guard)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode: {exc}") from None


# torchvision's InterpolationMode values -> Pillow's filters, as torchvision.transforms.functional maps them
# for PIL images (where it resizes with Pillow, always antialiased). This module does torchvision's PIL path
# with Pillow alone: CPU decode tasks then never import torch (seconds and hundreds of MB a worker process).
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


INTERPOLATIONS = tuple(_PIL_FILTERS)


def _pil_filter(interpolation: str) -> Image.Resampling:
    try:
        return _PIL_FILTERS[interpolation]
    except KeyError:
        allowed = ", ".join(_PIL_FILTERS)
        raise ValueError(f"interpolation must be one of {allowed}, not {interpolation!r}") from None


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's center_crop of a PIL image to size x size, with its zero padding of a smaller image."""
    width, height = image.size
    if size > width or size > height:
        padded = Image.new(image.mode, (max(size, width), max(size, height)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, width, height = padded, padded.width, padded.height
        if (width, height) == (size, size):
            return image
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# Longest side / shortest side beyond which an image is refused: its centre crop would show under 1% of it,
# and resizing its shorter side would make a strip as long as a decompression bomb (a 1x100000 PNG of 92
# bytes asks for a 256x25,600,000 px resize, ~20 GB).
MAX_ASPECT = 100


def check_size(size: tuple[int, int], resize_size: int, max_pixels: int) -> None:
    """Refuse, from the header's size alone, an image that is too large to decode (--max-pixels), too large
    once its shorter side is resized to resize_size, or of an absurd aspect ratio (decompression bombs)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image of {width}x{height} px has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"image of {width}x{height} px exceeds --max-pixels {max_pixels} (decompression bomb guard)"
        )
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT * short:
        raise ImageError(
            f"image of {width}x{height} px has an aspect ratio over {MAX_ASPECT}:1 (decompression bomb guard)"
        )
    resized_long = math.ceil(long * resize_size / short)
    if resize_size * resized_long > max_pixels:
        raise ImageError(
            f"image of {width}x{height} px would be {resize_size * resized_long:,} px once its shorter side "
            f"is resized to {resize_size}, over --max-pixels {max_pixels} (decompression bomb guard)"
        )


@dataclass(frozen=True)
class TrainTransform(Transform):
    """Training augmentation: torchvision's RandomResizedCrop (antialiased, with the weights' interpolation)
    and a random horizontal flip, on the decoded image. Fresh randomness on every call: every epoch sees new
    crops."""

    min_scale: float = 0.08
    flip: bool = True

    def __call__(self, data: bytes) -> np.ndarray:
        image = self.decode(data)
        rng = np.random.default_rng()
        top, left, height, width = crop_box(image.size, self.min_scale, rng)
        image = image.crop((left, top, left + width, top + height))
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), _pil_filter(self.interpolation))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.uint8)


def crop_box(
    size: tuple[int, int],
    min_scale: float,
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering [min_scale, 1] of the area at an aspect ratio
    in `ratio`: torchvision's RandomResizedCrop.get_params, on a numpy generator."""
    width, height = size
    area = width * height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback, as torchvision: the largest centred crop within the ratio bounds.
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16- and 32-bit greyscale are scaled, not clipped as Pillow would."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own I;16 -> RGB conversion clips at 255, turning a 16-bit scan white. 16-bit
        # greyscale (PNG, TIFF) opens as I;16 or I; scale its 0..65535 range to 0..255 instead.
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
        scaled = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode != "RGB":
        # RGBA, LA and P with transparency drop alpha as torchvision's `.convert("RGB")` does; CMYK,
        # YCbCr, L and 1 go through Pillow's standard conversions.
        image = image.convert("RGB")
    return image


# Files a CPU task holds in memory at once, read concurrently: a task of --decode-batch files reads them
# this many at a time, so that its memory does not grow with --decode-batch (128 camera photos are 0.5 GB).
FETCH_AT_ONCE = 32


def fetched(paths: list[str], errors: list[str]) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of each path that names an image and could be read (FETCH_AT_ONCE at a time, in
    parallel); why the others could not goes to `errors`."""
    readable = [i for i, p in enumerate(paths) if is_image(p)]
    for i in set(range(len(paths))) - set(readable):
        errors[i] = not_an_image(paths[i])
    for start in range(0, len(readable), FETCH_AT_ONCE):
        chunk = readable[start : start + FETCH_AT_ONCE]
        for i, data in zip(chunk, storage.fetch_many([paths[i] for i in chunk]), strict=True):
            if isinstance(data, Exception):
                errors[i] = "cannot read: " + storage.describe_error(data)
            else:
                yield i, data


def decode_batch(batch: dict[str, np.ndarray], transform: Transform) -> dict[str, np.ndarray]:
    """A batch of (path, label) rows -> rows with `image` (uint8 NHWC) and `error` ('' when decoded)."""
    paths = [str(p) for p in batch["path"]]
    size = transform.image_size
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors = [""] * len(paths)
    for i, data in fetched(paths, errors):
        try:
            images[i] = transform(data)
        except ImageError as exc:
            errors[i] = storage.redact(str(exc))
        except Exception as exc:  # a decoder bug on a hostile file must not end the run
            errors[i] = "cannot decode: " + storage.describe_error(exc)
    return {"path": batch["path"], "label": batch["label"], "image": images, "error": np.array(errors)}


# What fetch_batch ships per row (`kind`): a JPEG for the model's device to decode, or a finished crop.
FAILED, JPEG, CROP = 0, 1, 2


def fetch_batch(batch: dict[str, np.ndarray], transform: Transform) -> dict[str, np.ndarray]:
    """For --decode gpu: rows with `data` = the JPEG bytes (checked from the header only) and their EXIF
    `orientation`, or, for other formats and CMYK JPEGs, the uint8 crop decoded here (`kind` says which)."""
    paths = [str(p) for p in batch["path"]]
    data: list[bytes] = [b""] * len(paths)
    kind = np.full(len(paths), FAILED, dtype=np.uint8)
    orientation = np.ones(len(paths), dtype=np.uint8)
    errors = [""] * len(paths)
    for i, got in fetched(paths, errors):
        try:
            jpeg = jpeg_orientation(got, transform.max_pixels, transform.resize_size)
            if jpeg is not None:
                data[i], kind[i], orientation[i] = got, JPEG, jpeg
            else:
                data[i], kind[i] = transform(got).tobytes(), CROP
        except ImageError as exc:
            errors[i] = storage.redact(str(exc))
        except Exception as exc:
            errors[i] = "cannot decode: " + storage.describe_error(exc)
    return {
        "path": batch["path"],
        "label": batch["label"],
        "data": np.array(data, dtype=object),
        "kind": kind,
        "orientation": orientation,
        "error": np.array(errors),
    }


def jpeg_orientation(data: bytes, max_pixels: int, resize_size: int = 256) -> int | None:
    """The EXIF orientation (1..8) of an RGB or greyscale JPEG, read from its header; None for anything else.

    Raises ImageError for a JPEG over max_pixels, as a full decode would."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    image = open_image(data, max_pixels)  # over max_pixels: refused here, as a full decode would
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = image.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return None  # let the full decoder name the problem
    check_size(image.size, resize_size, max_pixels)
    if image.mode not in ("RGB", "L"):
        return None  # CMYK / YCCK JPEGs: Pillow's conversion, as the CPU path
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
