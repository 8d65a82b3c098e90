"""Generated test images: many encodings and modes, broken files, and torchvision's reference embedding."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps


def picture(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    """A smooth, distinct RGB picture (gradients and a bright disc), so embeddings differ per image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.3, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 120 * np.sin(fx * x + fy * y + phase))
    img = np.stack(channels, -1)
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 20)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def encodings(seed: int) -> dict[str, bytes]:
    """File name -> bytes, one per encoding / mode raytl must read."""
    base = picture(seed)
    rotated = encode(picture(seed + 100, 40, 64), "JPEG", exif=_exif_orientation(6), quality=95)
    gray16 = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((base.height, base.width), 128, np.uint8)))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    return {
        f"baseline-{seed}.jpg": encode(base, "JPEG", quality=92),
        f"progressive-{seed}.JPEG": encode(base, "JPEG", quality=90, progressive=True),
        f"gray-{seed}.jpg": encode(base.convert("L"), "JPEG"),
        f"rotated-{seed}.jpg": rotated,
        f"cmyk-{seed}.jpg": encode(base.convert("CMYK"), "JPEG"),
        f"plain-{seed}.png": encode(base, "PNG"),
        f"rgba-{seed}.png": encode(rgba, "PNG"),
        f"palette-{seed}.png": encode(palette, "PNG", transparency=0),
        f"gray16-{seed}.png": encode(Image.fromarray(gray16), "PNG"),
        f"photo-{seed}.webp": encode(base, "WEBP", quality=90),
        f"bitmap-{seed}.bmp": encode(base, "BMP"),
        f"anim-{seed}.gif": encode(base.convert("P"), "GIF"),
        f"scan-{seed}.TIF": encode(base, "TIFF"),
    }


def broken_files() -> dict[str, bytes]:
    """File name -> bytes that no decoder accepts, and the word its error reason must contain."""
    good = encode(picture(999), "JPEG")
    return {
        "empty.jpg": b"",
        "notes-as-image.jpg": b"this is a text file, not a JPEG\n" * 4,
        "truncated.jpg": good[: len(good) // 2],
        "bomb.png": bomb_png(20000, 20000),
    }


BROKEN_REASONS = {
    "empty.jpg": "empty file",
    "notes-as-image.jpg": "not a recognised image format",
    "truncated.jpg": "truncated",
    "bomb.png": "decompression bomb",
}

NON_IMAGES = {"README.txt": b"not an image\n", "labels.csv": b"a,b\n", "photo.jpg.json": b"{}"}


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (a decompression bomb), with a tiny payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def container_bombs(inner: int = 200) -> dict[str, bytes]:
    """Hostile containers whose first header says 16x16 but which hold, or size themselves to, an image of
    inner x inner px (or, for the WebP, a canvas of 5 * inner): Pillow reaches the big image inside
    `Image.open` (ICO's PNG is decoded there, a WebP's canvas allocated there, a GIF's first frame or a CUR's
    bitmap resizes the image). Each is a few hundred bytes."""
    big = Image.new("RGBA", (inner, inner), (1, 2, 3, 255))
    ico = ico_holding(encode(big, "PNG"))
    dib = encode(big.convert("RGB"), "BMP")[14:]  # the bitmap without its file header, as ICO/CUR store it
    dib = dib[:8] + struct.pack("<i", 2 * inner) + dib[12:]  # an icon's bitmap height counts its mask too
    cur = struct.pack("<HHH", 0, 2, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 0, 0, len(dib), 22) + dib
    small = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(2)]
    webp = encode(small[0], "WEBP", save_all=True, append_images=small[1:], lossless=True)
    canvas = (5 * inner - 1).to_bytes(3, "little")
    webp = webp[:24] + canvas + canvas + webp[30:]  # VP8X: the canvas the decoder allocates when created
    gif = encode(Image.new("P", (inner, inner)), "GIF")
    gif = gif[:6] + struct.pack("<HH", 16, 16) + gif[10:]  # a 16x16 screen, a frame of inner x inner
    return {"ico_png.ico": ico, "ico_png.png": ico, "cur_bmp.cur": cur, "canvas.webp": webp, "frame.gif": gif}


def ico_holding(png: bytes) -> bytes:
    """An ICO whose directory says 16x16 and which holds png (Pillow decodes it inside `Image.open`)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def two_page_tiff(inner: int = 200) -> bytes:
    """A TIFF whose first page is 16x16 and whose second is inner x inner px."""
    first = Image.new("RGB", (16, 16), (200, 100, 0))
    return encode(first, "TIFF", save_all=True, append_images=[Image.new("RGB", (inner, inner))])


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def write_corpus(root, classes: dict[str, list[int]], broken: bool = True, strays: bool = True) -> dict:
    """Class-per-folder corpus under root; returns {relative path: label} of the good images."""
    good = {}
    for label, seeds in classes.items():
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for seed in seeds:
            for name, data in encodings(seed).items():
                with open(os.path.join(root, label, name), "wb") as f:
                    f.write(data)
                good[f"{label}/{name}"] = label
    first = next(iter(classes))
    if broken:
        for name, data in broken_files().items():
            with open(os.path.join(root, first, name), "wb") as f:
                f.write(data)
    if strays:
        for name, data in NON_IMAGES.items():
            with open(os.path.join(root, first, name), "wb") as f:
                f.write(data)
    return good


def reference_rgb(data: bytes) -> Image.Image:
    """How a user opens an image with Pillow for torchvision: EXIF-orient, then RGB (16-bit scaled)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, np.float64) / 257).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def reference_embeddings(
    files: list[bytes], state_dict: dict, image_size: int, layer: str = "pool5", pool: str = "avg"
) -> np.ndarray:
    """torchvision's own computation: VGG16_Weights transforms, vgg16 in fp32, cut at the layer."""
    transform = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms(
        crop_size=image_size, resize_size=round(image_size * 256 / 224)
    )
    with torch.device("meta"):  # the tensors are the state_dict's (pool5 needs only the convolutions)
        model = torchvision.models.vgg16(weights=None)
    model.load_state_dict(state_dict, strict=layer != "pool5", assign=True)
    model.eval()
    x = torch.stack([transform(reference_rgb(data)) for data in files])
    with torch.no_grad():
        f = model.features(x)
        if layer == "pool5":
            return {"avg": f.mean((2, 3)), "max": f.amax((2, 3)), "flatten": f.flatten(1)}[pool].numpy()
        h = model.classifier[: 2 if layer == "fc6" else 5](torch.flatten(model.avgpool(f), 1))
        return h.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def random_state_dict(seed: int = 7, classifier: bool = False) -> dict:
    """A seeded VGG16 state_dict drawn as torchvision initialises VGG16 (convolutions Kaiming-normal on their
    fan-out, linear layers N(0, 0.01), biases 0): its convolutions (features.*, all that pool5 needs: 58 MB)
    and with `classifier` its fc6, fc7 and fc8 too (528 MB, 100 times the random numbers)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = torchvision.models.vgg16(weights=None).state_dict()
    state = {}
    for key, meta in shapes.items():
        if not (classifier or key.startswith("features.")):
            continue
        tensor = torch.empty(meta.shape)
        if key.endswith(".bias"):
            tensor.zero_()
        elif key.startswith("features."):
            torch.nn.init.kaiming_normal_(tensor, mode="fan_out", nonlinearity="relu")
        else:
            tensor.normal_(0, 0.01)
        state[key] = tensor
    return state


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_colour_corpus(
    root, per_class: int, seed: int = 0, size: int = 40, noise: float = 20
) -> dict[str, list[str]]:
    """A learnable corpus: per class, noisy pictures dominated by its colour, with a random grey square.
    Returns label -> file paths (class-per-folder under root)."""
    rng = np.random.default_rng(seed)
    files: dict[str, list[str]] = {}
    for label, rgb in COLOURS.items():
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(per_class):
            img = np.array(rgb, np.float32) + rng.normal(0, noise, (size, size, 3))
            x, y, side = *rng.integers(0, size // 2, 2), int(rng.integers(size // 5, size // 2))
            img[y : y + side, x : x + side] = rng.uniform(60, 200)
            path = os.path.join(root, label, f"{label}-{seed}-{i:03d}.png")
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
            files.setdefault(label, []).append(path)
    return files
