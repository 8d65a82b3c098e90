"""The Python API: the README's example as it is written, and raytl.embed on Ray Datasets against
torchvision's own computation."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from images import cosine, random_state_dict, reference_embeddings, write_corpus
from PIL import Image

import raytl

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
CLASSES = {"cat": [1], "dog": [2]}


def readme_example() -> str:
    section = open(README).read().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def api_run(ray_session, tmp_path_factory):
    """The README's example, run in a folder holding `images/` (class-per-folder), with torchvision's
    ImageNet weights file staged where torch.hub looks for it (seeded random tensors: nothing downloaded)."""
    tmp = tmp_path_factory.mktemp("api")
    good = write_corpus(tmp / "images", CLASSES, broken=False, strays=False)
    state = random_state_dict(3, classifier=True)  # the whole network, as torchvision's file holds it
    checkpoints = tmp / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / os.path.basename(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url))
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    torch.save(state, tmp / "vgg16.pt")
    saved = os.getcwd(), os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(tmp / "torch")
    os.chdir(tmp)
    try:
        namespace: dict = {}
        exec(compile(readme_example(), README, "exec"), namespace)
    finally:
        os.chdir(saved[0])
        if saved[1] is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = saved[1]
    return {"tmp": tmp, "good": good, "state": state, **namespace}


def test_the_readme_example_runs(api_run):
    n = len(api_run["good"])
    assert api_run["summary"]["embedded"] == n and api_run["summary"]["failed"] == 0
    assert api_run["result"]["predicted"] == n and 0.0 <= api_run["result"]["accuracy"] <= 1.0
    assert 0.0 <= api_run["metrics"]["accuracy"] <= 1.0
    # raytl curve's last point is train --backend sklearn on the same split
    assert api_run["curve"]["points"][-1]["accuracy"] == pytest.approx(api_run["metrics"]["accuracy"])
    assert pq.read_table(api_run["tmp"] / "out" / "embeddings").num_rows == n
    first = api_run["first"]
    assert len(first["embedding"]) == 512 and first["error"] == ""
    assert "image" not in first  # the images column is dropped


def test_embed_matches_torchvision_and_extract_for_bytes_arrays_and_bad_cells(api_run):
    """Encoded files (EXIF honoured, as extract reads them), uint8 arrays and a cell that is no image, in
    one Ray Dataset of the user's: every other column kept, embeddings equal to torchvision's on the same
    files, a NaN embedding and the reason for the bad cell."""
    import ray

    tmp, state = api_run["tmp"], api_run["state"]
    names = sorted(api_run["good"])
    files = [(tmp / "images" / name).read_bytes() for name in names]
    rgb = [
        np.asarray(Image.open(io.BytesIO(files[0])).convert("RGB")),
        np.asarray(Image.new("L", (50, 40), 90)),
    ]
    items = [{"image": data, "name": name} for name, data in zip(names, files, strict=True)]
    items += [{"image": b"not an image", "name": "bad"}]
    weights = str(tmp / "vgg16.pt")
    # fp32: torchvision's computation (auto would be bf16 on CPUs with AMX or AVX-512-BF16)
    dataset = raytl.embed(ray.data.from_items(items), weights=weights, image_size=64, precision="fp32")
    dataset = dataset.materialize()
    got = {r["name"]: r for r in dataset.take_all()}
    assert set(got) == {*names, "bad"} and set(got["bad"]) == {"name", "embedding", "error"}
    assert got["bad"]["error"] == "not a recognised image format" and np.isnan(got["bad"]["embedding"]).all()
    expected = reference_embeddings(files, state, 64)
    embedded = np.stack([got[name]["embedding"] for name in names])
    assert all(got[name]["error"] == "" for name in names)
    np.testing.assert_allclose(embedded, expected, rtol=1e-3, atol=1e-4)
    # The README's extract ran at the default precision: bf16 rounds, fp32 agrees to float rounding.
    table = pq.read_table(tmp / "out" / "embeddings")
    bf16 = json.loads(table.schema.metadata[b"raytl"])["precision"] == "bf16"
    by_path = {row["path"].rsplit("/images/", 1)[1]: row["embedding"] for row in table.to_pylist()}
    similar = cosine(embedded, np.array([by_path[name] for name in names], np.float32)).min()
    assert similar >= (0.999 if bf16 else 0.9999), similar
    # Written by Ray Data, extract's embedding type and `raytl` metadata (how the embeddings were made).
    dataset.write_parquet(str(tmp / "embedded"))
    written = pq.read_table(tmp / "embedded")
    assert written.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    assert sorted(written.column_names) == ["embedding", "error", "name"] and written.num_rows == len(items)
    meta, extracted = (
        json.loads(written.schema.metadata[b"raytl"]),
        json.loads(table.schema.metadata[b"raytl"]),
    )
    assert set(meta) == set(extracted) - {"schemes", "precision_option"}
    assert (meta["model"], meta["dim"], meta["image_size"], meta["precision"]) == ("vgg16", 512, 64, "fp32")
    assert "vgg16.pt#sha256:" in meta["weights"] and meta["preprocessing"] == extracted["preprocessing"]

    pixels = ray.data.from_items([{"pixels": a} for a in rgb])
    arrays = raytl.embed(pixels, column="pixels", weights=weights, image_size=64, precision="fp32")
    vectors = np.stack([r["embedding"] for r in arrays.take_all()])
    pngs = []
    for array in rgb:
        sink = io.BytesIO()
        Image.fromarray(array).save(sink, format="PNG")
        pngs.append(sink.getvalue())
    np.testing.assert_allclose(vectors, reference_embeddings(pngs, state, 64), rtol=1e-3, atol=1e-4)
