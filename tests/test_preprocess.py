"""Decoding and preprocessing: exactly torchvision's transforms, every mode to RGB, broken files refused."""

import functools
import io
import types

import numpy as np
import pytest
import torch
import torchvision
from conftest import heavy_modules_after
from images import (
    BROKEN_REASONS,
    bomb_png,
    broken_files,
    container_bombs,
    encode,
    encodings,
    picture,
    reference_rgb,
    two_page_tiff,
)
from PIL import Image

from raytl.errors import ImageError
from raytl.vision.models import IMAGENET_MEAN, IMAGENET_STD
from raytl.vision.preprocess import Transform, decode_batch, to_rgb


def _normalise(crop: np.ndarray) -> torch.Tensor:
    """What the Embedder does on its device, on CPU here."""
    x = torch.from_numpy(crop).permute(2, 0, 1).contiguous().float().div_(255)
    return x.sub_(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(3, 1, 1))


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(encodings(3)))
def test_matches_torchvision_transforms_exactly(name, size):
    data = encodings(3)[name]
    expected = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms(
        crop_size=size, resize_size=round(size * 256 / 224)
    )(reference_rgb(data))
    crop = Transform(size, round(size * 256 / 224))(data)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert torch.equal(_normalise(crop), expected)


def test_default_transform_is_vgg16_imagenet_preset():
    data = encode(picture(5, 500, 375), "JPEG")
    expected = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()(reference_rgb(data))
    assert torch.equal(_normalise(Transform()(data)), expected)


def test_exif_rotation_is_applied():
    data = encodings(4)["rotated-4.jpg"]  # stored 40x64 with orientation 6: shown 64 wide, 40 high
    assert Image.open(io.BytesIO(data)).size == (40, 64)
    assert Transform().decode(data).size == (64, 40)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 10, 257 * 128, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 10, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "YCbCr", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    image = picture(6).convert("L" if mode in ("I", "F") else "RGB").convert(mode)
    assert to_rgb(image).mode == "RGB"


@pytest.mark.parametrize("name", sorted(BROKEN_REASONS))
def test_broken_files_raise_with_reason(name):
    with pytest.raises(ImageError, match=BROKEN_REASONS[name]):
        Transform()(broken_files()[name])


def test_bomb_guard_checks_the_header_before_decoding():
    # 100 million pixels of header and a few bytes of data: refused without allocating the image.
    with pytest.raises(ImageError, match="image of 100,000,000 px exceeds --max-pixels 1000"):
        Transform(max_pixels=1000).decode(bomb_png(10000, 10000))


@pytest.mark.parametrize("name", sorted(container_bombs()))
def test_bombs_inside_containers_are_refused_before_any_pixel_is_decoded(name, pixels_decoded):
    """An ICO holding a PNG larger than its directory says, a CUR's bitmap, a WebP canvas, a GIF frame larger
    than its screen: refused by --max-pixels before Pillow decodes (or allocates) the big image, in the
    CPU decoder and in --decode gpu's header check alike."""
    from raytl.vision.preprocess import jpeg_orientation, open_image

    data = container_bombs(200)[name]
    limit = 10_000  # 16x16 passes, 200x200 (and the WebP's 1000x1000 canvas) does not
    transform = Transform(8, 8, max_pixels=limit)
    for decode in (transform.decode, transform, lambda d: open_image(d, limit)):
        with pytest.raises(ImageError, match=rf"image of [\d,x ]+px exceeds --max-pixels {limit} \(decomp"):
            decode(data)
    assert jpeg_orientation(data, limit) is None  # not a JPEG: the decoder above names it
    assert all(w * h <= limit for w, h in pixels_decoded), pixels_decoded
    # Under a limit that allows it, the same file decodes (these are valid images).
    assert Transform(8, 8, max_pixels=10**7)(data).shape == (8, 8, 3)


def test_only_the_first_page_of_a_tiff_is_decoded(pixels_decoded):
    crop = Transform(8, 8, max_pixels=10_000)(two_page_tiff(200))
    assert crop.shape == (8, 8, 3) and tuple(crop[4, 4]) == (200, 100, 0)
    assert set(pixels_decoded) == {(16, 16)}


def test_image_bytes_are_opened_in_one_place():
    """Every decoder of untrusted bytes (extract, predict, serve, embed, the report) goes through
    preprocess.open_image, where the bomb guard is."""
    import pathlib
    import re

    import raytl

    root = pathlib.Path(raytl.__file__).parent
    opens = {
        str(path.relative_to(root)): len(re.findall(r"Image\.open\(", path.read_text()))
        for path in root.rglob("*.py")
    }
    assert {k: v for k, v in opens.items() if v} == {"vision/preprocess.py": 1}


def test_decode_batch_marks_errors_and_keeps_order(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(encode(picture(1), "PNG"))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"")
    batch = {
        "path": np.array([str(good), str(bad), str(tmp_path / "missing.jpg")]),
        "label": np.array(["x", "y", "z"]),
    }
    out = decode_batch(batch, Transform(32, 37))
    assert out["image"].shape == (3, 32, 32, 3)
    assert out["error"][0] == ""
    assert out["error"][1] == "empty file (0 bytes)"
    assert out["error"][2].startswith("cannot read: FileNotFoundError")
    assert out["image"][0].any() and not out["image"][1].any()
    assert out["label"].tolist() == ["x", "y", "z"]


def _strip(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A real, tiny image of an extreme shape (Pillow writes it; a few hundred bytes)."""
    return encode(Image.new("RGB", (width, height), (120, 30, 200)), fmt)


@pytest.mark.parametrize(
    "size, message",
    [
        ((1, 100_000), "1x100000 px has an aspect ratio over 100:1"),  # 92 bytes that asked for ~20 GB
        ((100_000, 1), "100000x1 px has an aspect ratio over 100:1"),
        ((3, 1_000), "3x1000 px has an aspect ratio over 100:1"),
    ],
)
def test_bomb_guard_refuses_absurd_aspect_ratios_from_the_header(size, message):
    data = _strip(*size)
    assert len(data) < 2000 and size[0] * size[1] <= 100_000  # far under --max-pixels by its header
    with pytest.raises(ImageError, match=message):
        Transform().decode(data)


def test_bomb_guard_counts_the_pixels_after_resizing():
    # 40x3000 = 120,000 px in the header; its shorter side resized to 256 makes 256x19200 = 4,915,200 px.
    data = _strip(40, 3000)
    with pytest.raises(ImageError, match=r"would be 4,915,200 px once its shorter side is resized to 256"):
        Transform(max_pixels=1_000_000).decode(data)
    assert Transform(32, 37, max_pixels=1_000_000)(data).shape == (32, 32, 3)  # 37x2775: fine
    assert Transform()(data).shape == (224, 224, 3)  # under the default limit


def test_gpu_decode_path_applies_the_same_guard():
    from raytl.vision.preprocess import jpeg_orientation

    with pytest.raises(ImageError, match="aspect ratio over 100:1"):
        jpeg_orientation(_strip(2, 1000, "JPEG"), 89_478_485)
    with pytest.raises(ImageError, match="once its shorter side is resized to 256"):
        jpeg_orientation(_strip(40, 3000, "JPEG"), 1_000_000, 256)
    assert jpeg_orientation(_strip(40, 300, "JPEG"), 1_000_000, 256) == 1


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("shape, size, resize", [((50, 70), 32, 37), ((90, 40), 32, 37), ((30, 30), 48, 40)])
def test_crops_are_torchvision_resize_and_center_crop(interpolation, shape, size, resize):
    """raytl resizes and crops with Pillow alone, as torchvision's functional API does for PIL images:
    any interpolation, either orientation, and a crop larger than the resized image (zero padding)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8))
    mode = InterpolationMode(interpolation)
    expected = F.center_crop(F.resize(image, [resize], interpolation=mode, antialias=True), [size])
    got = Transform(size, resize, interpolation=interpolation).crop(image)
    assert got.shape == (size, size, 3) and np.array_equal(got, np.asarray(expected))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_crops_are_torchvision_resized_crop_and_flip(monkeypatch, interpolation):
    """TrainTransform's crop of a random box, resized, flipped half the time: torchvision's resized_crop and
    hflip of the same box give the same pixels."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    import raytl.vision.preprocess as preprocess

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    data = encode(image, "PNG")
    flips = 0
    for seed in range(12):
        monkeypatch.setattr(preprocess.np.random, "default_rng", lambda s=seed: np.random.Generator(
            np.random.PCG64(s)))  # fmt: skip
        got = preprocess.TrainTransform(32, 37, interpolation=interpolation, min_scale=0.2)(data)
        rng = np.random.Generator(np.random.PCG64(seed))
        top, left, height, width = preprocess.crop_box(image.size, 0.2, rng)
        mode = InterpolationMode(interpolation)
        expected = F.resized_crop(image, top, left, height, width, [32, 32], mode, antialias=True)
        if rng.random() < 0.5:
            expected, flips = F.hflip(expected), flips + 1
        assert np.array_equal(got, np.asarray(expected)), seed
    assert 0 < flips < 12


def test_cpu_decode_tasks_import_neither_torch_nor_torchvision():
    """What extract's CPU tasks run (listing, manifests, tar shards, decoding, writing parts) lives in
    modules that never import torch: a decode worker process starts in a fraction of the time and memory."""
    modules = (
        "raytl.vision.preprocess, raytl.corpus.reader, raytl.corpus.shards, raytl.files.writer, "
        "raytl.files.doneset, raytl.files.output"
    )
    assert heavy_modules_after(modules, ("torch", "torchvision")) == []


@functools.cache
def _sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


@functools.cache
def _camera_photo(seed: int, size: tuple[int, int] = (4032, 3024), orientation: int | None = None) -> bytes:
    """A 12-MP JPEG (a phone camera's 4032x3024): a crop of one of scikit-learn's photographs, scaled up."""
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(_sample_photos()[seed % 2])
    w, h = int(photo.width * rng.uniform(0.6, 0.9)), int(photo.height * rng.uniform(0.6, 0.9))
    left, top = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
    image = photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def test_draft_decodes_large_jpegs_at_a_reduced_scale_and_nothing_else():
    """--decode draft: a JPEG at least twice the resize is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, its
    shorter side never below the resize (EXIF-turned or not); smaller JPEGs and other formats exactly."""
    exact, draft = Transform(), Transform(draft=True)
    photo = _camera_photo(0)
    assert exact.decode(photo).size == (4032, 3024)
    assert draft.decode(photo).size == (504, 378)  # 1/8: 3024 / 8 = 378 >= 256
    turned = _camera_photo(1, orientation=6)  # stored landscape, shown portrait
    assert draft.decode(turned).size == (378, 504) and exact.decode(turned).size == (3024, 4032)
    assert draft.decode(_camera_photo(0, size=(1000, 700))).size == (500, 350)  # 1/2: 700 // 256 = 2
    crop, reference = draft(photo).astype(float), exact(photo).astype(float)
    assert crop.shape == reference.shape == (224, 224, 3)
    assert 0 < np.abs(crop - reference).mean() < 3  # of 255: a different, close decode
    small = _camera_photo(0, size=(500, 375))  # 375 < 2 x 256: full scale
    png = encode(Image.open(io.BytesIO(photo)).resize((1200, 900)), "PNG")
    for data in (small, png):
        np.testing.assert_array_equal(draft(data), exact(data))


def test_draft_embeddings_are_near_the_exact_decoders():
    """VGG16 pool5 at 224 px (seeded torchvision-initialised weights) of 12-MP photographs (crops of both
    of scikit-learn's): the draft decode's embeddings have a cosine >= 0.99 to the exact decode's."""
    from images import cosine, random_state_dict

    from raytl.cluster.embedder import Embedder
    from raytl.config import Precision

    photos = [_camera_photo(seed) for seed in range(3)]
    embedder = Embedder(random_state_dict(5), precision=Precision.FP32, batch_size=4)
    exact = embedder.embed(np.stack([Transform()(p) for p in photos]))
    draft = embedder.embed(np.stack([Transform(draft=True)(p) for p in photos]))
    assert cosine(exact, draft).min() >= 0.99


def test_draft_is_recorded_with_the_embeddings_and_kept_by_predict():
    """The embeddings' metadata says `decode: draft`; a model trained on them decodes the same way (predict's
    stages; serve makes its crop through the same `Stages.of(model.backbone)`)."""
    from raytl.cluster.pipeline import Stages, embeddings_metadata
    from raytl.commands.predict import backbone_stages
    from raytl.config import ExtractConfig, PredictConfig
    from raytl.modeling.model_dir import parse_backbone

    config = ExtractConfig.create(source="s", output="o", decode="draft", image_size=64)
    stages = Stages.of(config)
    exact = ExtractConfig.create(source="s", output="o")
    assert stages.transform.draft and not Stages.of(exact).transform.draft
    metadata = embeddings_metadata(stages, "random:seed=0", 512)
    assert metadata["preprocessing"]["decode"] == "draft"
    model = types.SimpleNamespace(backbone=parse_backbone(metadata, "MODEL_DIR"))  # model.json's record
    predicting = backbone_stages(model, PredictConfig.create(model_dir="m", source="s", output="o"))
    assert predicting.transform == Transform(64, 73, config.max_pixels, "bilinear", draft=True)
