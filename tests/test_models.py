"""VGG16 trunks against torchvision, weights loading and validation, precision choice."""

import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import exported_scores
from images import random_state_dict

from raytl.cluster.embedder import Embedder
from raytl.config import Layer, Pool, Precision
from raytl.errors import WeightsError
from raytl.vision.models import VGG16Trunk, embedding_dim, load_weights, resolve_precision
from raytl.vision.preprocess import Transform


@pytest.fixture(scope="module")
def state():
    return random_state_dict(11, classifier=True)


@pytest.fixture(scope="module")
def vgg(state):
    """torchvision's VGG16 holding `state` (built on meta and given the tensors: no initialisation)."""
    with torch.device("meta"):
        network = torchvision.models.vgg16(weights=None)
    network.load_state_dict(state, assign=True)
    return network.eval()


@pytest.mark.parametrize(
    "layer,pool,size,dim",
    [
        ("pool5", "avg", 224, 512),
        ("pool5", "max", 64, 512),
        ("pool5", "flatten", 224, 25088),
        ("pool5", "flatten", 64, 2048),
        ("pool5", "flatten", 100, 4608),
        ("fc6", "avg", 64, 4096),
        ("fc7", "avg", 64, 4096),
    ],
)
def test_embedding_dim(layer, pool, size, dim):
    assert embedding_dim(Layer(layer), Pool(pool), size) == dim
    with torch.device("meta"):  # shapes only
        assert VGG16Trunk(Layer(layer), Pool(pool))(torch.zeros(1, 3, size, size)).shape == (1, dim)


@pytest.mark.parametrize(
    "layer,pool", [("pool5", "avg"), ("pool5", "max"), ("pool5", "flatten"), ("fc6", "avg"), ("fc7", "avg")]
)
def test_trunk_equals_torchvision_vgg16(state, vgg, layer, pool):
    trunk = VGG16Trunk.from_state_dict(state, Layer(layer), Pool(pool))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = vgg.features(x)
        expected = {
            ("pool5", "avg"): f.mean((2, 3)),
            ("pool5", "max"): f.amax((2, 3)),
            ("pool5", "flatten"): f.flatten(1),
            ("fc6", "avg"): vgg.classifier[1](vgg.classifier[0](torch.flatten(vgg.avgpool(f), 1))),
            # fc7: run the whole classifier up to fc8's input with a hook
            ("fc7", "avg"): vgg.classifier[:5](torch.flatten(vgg.avgpool(f), 1)),
        }[(layer, pool)]
        assert torch.equal(trunk(x), expected)
    if layer == "fc7":  # fc7 is what fc8 sees: the classifier's last Linear applied to it gives the logits
        with torch.no_grad():
            assert torch.allclose(vgg.classifier[6](trunk(x)), vgg(x), atol=1e-5)


def test_weights_from_file_keep_only_what_the_layer_needs(tmp_path, state):
    path = tmp_path / "vgg16.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as saved from DDP
    weights = load_weights(str(path), Layer.POOL5)
    assert set(weights.state_dict) == {k for k in state if k.startswith("features.")}
    assert torch.equal(weights.state_dict["features.0.weight"], state["features.0.weight"])
    assert weights.id.startswith(str(path) + "#sha256:")
    assert "classifier.3.weight" in load_weights(str(path), Layer.FC7).state_dict


def test_random_weights_are_torchvisions_initialisation_seeded():
    a = load_weights("random", Layer.POOL5, seed=3).state_dict
    torch.manual_seed(3)
    expected = torchvision.models.vgg16(weights=None).state_dict()
    assert set(a) == {k for k in expected if k.startswith("features.")}
    assert all(torch.equal(a[k], expected[k]) for k in a)
    before = torch.random.get_rng_state()
    b = load_weights("random", Layer.POOL5, seed=3).state_dict  # drawn once a process
    c = load_weights("random", Layer.POOL5, seed=4).state_dict
    assert torch.equal(a["features.0.weight"], b["features.0.weight"])
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left as it was
    # fc7 keeps the classifier's layers too (pool5 only makes their draws): torchvision's values all the same.
    fc7 = load_weights("random", Layer.FC7, seed=3).state_dict
    assert {k for k in fc7 if not k.startswith("features.")} == {
        f"classifier.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")
    }
    assert all(torch.equal(fc7[k], expected[k]) for k in fc7)


def test_weights_of_the_wrong_shape_are_refused(tmp_path, state):
    convolutions = {k: v for k, v in state.items() if k.startswith("features.")}  # all pool5 reads
    bad = dict(convolutions, **{"features.0.weight": torch.zeros(32, 3, 3, 3)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(
        WeightsError, match=r"features.0.weight has shape \(32, 3, 3, 3\), expected \(64, 3, 3, 3\)"
    ):
        load_weights(str(tmp_path / "bad.pt"), Layer.POOL5)


def test_resnet_weights_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(WeightsError, match="is not a torchvision VGG16 state_dict: 26 tensors are missing"):
        load_weights(str(tmp_path / "resnet.pt"), Layer.POOL5)


def test_unreadable_weights_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="is not a PyTorch state_dict file"):
        load_weights(str(tmp_path / "junk.pt"), Layer.POOL5)
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(str(tmp_path / "missing.pt"), Layer.POOL5)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision(Precision.FP32, cpu) == Precision.FP32
    assert resolve_precision(Precision.BF16, cpu) == Precision.BF16
    assert resolve_precision(Precision.AUTO, cpu) in (Precision.FP32, Precision.BF16)


def test_vgg16_is_torchvisions_without_importing_it():
    """raytl builds VGG16 itself (the same modules under the same names; the preset its weights give), so
    that a process embedding with it, or fine-tuning it, never imports torchvision (1.1 CPU-s a process)."""
    import subprocess
    import sys

    from raytl.vision.models import _VGG16, VGG16, preset, torchvision_preset

    with torch.device("meta"):  # modules and shapes: no weights needed
        ours, theirs = _VGG16(), torchvision.models.vgg16(weights=None)
    for name in ("features", "avgpool", "classifier"):
        assert repr(getattr(ours, name)) == repr(getattr(theirs, name))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert preset(VGG16) == torchvision_preset(VGG16)
    worker = """
import sys
import numpy as np, torch
import raytl.commands.finetune as finetune, raytl.commands.predict, raytl.commands.extract
from raytl.config import FinetuneConfig
from raytl.cluster.embedder import Embedder
from raytl.vision.models import VGG16Trunk, preset
from raytl.modeling.network import build_network

torch.manual_seed(0)
state = {k: torch.randn(v.shape) * 0.01 for k, v in VGG16Trunk().state_dict().items()}
Embedder(state, precision="fp32", batch_size=2).embed(np.zeros((2, 32, 32, 3), np.uint8))
config = FinetuneConfig.create(source="s", model_dir="m", image_size=32)
network = build_network(state, config, classes=3)
network(torch.zeros(2, 3, 32, 32)).sum().backward()
print(preset("vgg16").mean, "torchvision" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False", out


def test_embedder_without_ray_matches_torchvision(state, vgg):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    fp32 = Embedder({k: state[k] for k in VGG16Trunk().state_dict()}, precision=Precision.FP32, batch_size=2)
    got = fp32.embed(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = vgg.features(x).mean((2, 3)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    bf16 = Embedder({k: state[k] for k in VGG16Trunk().state_dict()}, precision=Precision.BF16).embed(images)
    cos = (bf16 * expected).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.99


def test_only_the_tensors_a_layer_needs_are_required(tmp_path, state):
    """A VGG16 fine-tuned elsewhere (10 classes), or a conv-only backbone, serves pool5; fc7 needs fc6/fc7."""
    ten_classes = dict(
        state, **{"classifier.6.weight": torch.zeros(10, 4096), "classifier.6.bias": torch.zeros(10)}
    )
    torch.save(ten_classes, tmp_path / "ten.pt")
    assert set(load_weights(str(tmp_path / "ten.pt"), Layer.FC7).state_dict) == {
        k for k in state if not k.startswith("classifier.6.")
    }
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, tmp_path / "conv.pt")
    assert len(load_weights(str(tmp_path / "conv.pt"), Layer.POOL5).state_dict) == 26
    with pytest.raises(WeightsError, match="4 tensors are missing, the first is 'classifier.0.weight'"):
        load_weights(str(tmp_path / "conv.pt"), Layer.FC7)


def test_a_model_actor_that_ray_gave_no_gpu_stays_on_the_cpu_of_a_gpu_node(state, monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES as the node has it in a process that it gave no GPU, so torch there
    sees the node's GPUs: on_actors tells each model actor the device that its num_gpus asked Ray for."""
    import types

    import ray.data

    from raytl.cluster.embedder import Resources, on_actors
    from raytl.config import Device
    from raytl.vision.models import model_device

    calls = []

    class Rows:  # what on_actors uses of a Ray Dataset
        context = ray.data.DataContext()

        def map_batches(self, fn, **options):
            calls.append(options)
            return self

    options = types.SimpleNamespace(
        model="vgg16", layer=Layer.POOL5, pool=Pool.AVG, precision=Precision.FP32, batch_size=2,
        num_actors=None, compile=False,
    )  # fmt: skip
    for gpu in (False, True):
        on_actors(Rows(), Embedder, "weights", options, Resources(gpus=int(gpu), cpus=2, use_gpu=gpu))
    asked = [(c["num_gpus"], c["fn_constructor_kwargs"]["device"]) for c in calls]
    assert asked == [(0, Device.CPU), (1, Device.CUDA)]

    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = Embedder(features, precision=Precision.FP32, batch_size=2).embed(images)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as such an actor sees it
    assert model_device(Device.AUTO).type == "cuda"
    on_cpu = Embedder(features, precision=Precision.FP32, batch_size=2, device=asked[0][1])
    assert on_cpu.device.type == "cpu"
    np.testing.assert_array_equal(on_cpu.embed(images), expected)


def test_compiled_embedder_matches_eager_and_compiles_once(state):
    """--compile: torch.compile (inductor, a C++ build on CPU) computes the same embeddings, and batches
    shorter than --batch-size (a block's last, one without its failed rows) reuse the one compiled graph
    (padded), where each new shape compiled again: a minute or more per shape on a GPU."""
    from torch._dynamo.utils import counters

    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    eager = Embedder(features, precision=Precision.FP32, batch_size=4)
    compiled = Embedder(features, precision=Precision.FP32, batch_size=4, compile=True)
    counters.clear()
    for rows in (4, 3, 1):
        np.testing.assert_allclose(
            compiled.embed(images[:rows]), eager.embed(images[:rows]), rtol=1e-4, atol=1e-5
        )
    assert counters["stats"]["unique_graphs"] == 1


# --- any torchvision classification backbone (--model) ------------------------------------------------------

# Each at a size it takes (a ViT's is fixed: its default, from its weights' transforms). VGG16 against
# torchvision: test_extract, and the tests above.
BACKBONES = [
    ("vgg16", 64),
    ("resnet50", 64),
    ("convnext_tiny", 64),
    ("efficientnet_v2_s", 64),
    ("vit_b_32", None),  # a ViT-B with 32 px patches: a quarter of vit_b_16's compute, the same code
]


@pytest.fixture(scope="module")
def backbones(ray_session, tmp_path_factory):
    """26 images (13 encodings of two pictures, a class each) in the loopback S3, and `extracted(model,
    size)`: `raytl extract --model` on them, once per model, with seeded random weights from a file (in S3
    for vgg16)."""
    import boto3
    import pyarrow.parquet as pq
    import s3fs
    from conftest import upload_dir
    from images import write_corpus

    import raytl

    tmp = tmp_path_factory.mktemp("backbones")
    write_corpus(tmp / "corpus", {"cat": [1], "dog": [2]}, broken=False, strays=False)
    boto3.client("s3").create_bucket(Bucket="raytl-backbones")
    uri = upload_dir(tmp / "corpus", "raytl-backbones", "corpus")
    done: dict = {}

    def extracted(model: str, size: int | None) -> dict:
        if model not in done:
            torch.manual_seed(5)
            network = torchvision.models.get_model(model, weights=None).eval()
            state = network.state_dict()
            if model == "vgg16":  # pool5 needs only the conv layers: a 58 MB file, not 528 MB
                state = {k: v for k, v in state.items() if k.startswith("features.")}
            torch.save(state, tmp / f"{model}.pt")
            weights = str(tmp / f"{model}.pt")
            if model == "vgg16":  # weights from S3 once (the others are 100-330 MB: a local file)
                boto3.client("s3").upload_file(weights, "raytl-backbones", f"weights/{model}.pt")
                weights = f"s3://raytl-backbones/weights/{model}.pt"
            out = f"s3://raytl-backbones/emb-{model}"
            options = {"model": model, "weights": weights, "precision": "fp32"}
            summary = raytl.extract(uri, out, **options, **({"image_size": size} if size else {}))
            table = pq.read_table(out.removeprefix("s3://"), filesystem=s3fs.S3FileSystem())
            done[model] = {"summary": summary, "table": table, "network": network, "out": out}
        return done[model]

    return {"tmp": tmp, "uri": uri, "extracted": extracted}


def _penultimate(network: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """torchvision's own model on x: the input of its final classifier layer (its last nn.Linear); for
    VGG16, raytl's default pool5 averaged over the grid."""
    if isinstance(network, torchvision.models.VGG):
        with torch.no_grad():
            return network.features(x).mean(dim=(2, 3)).numpy()
    last = [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = {}
    hook = last.register_forward_hook(lambda module, inputs, output: seen.setdefault("x", inputs[0]))
    with torch.no_grad():
        network(x)
    hook.remove()
    return seen["x"].numpy()


@pytest.mark.parametrize("model,size", BACKBONES)
def test_any_torchvision_backbone_extracts_as_torchvision_computes(backbones, model, size):
    """`raytl extract --model M` from S3 equals torchvision's M with the same weights and its weights'
    own transforms (at --image-size, resize scaled as the weights scale it), in fp32."""
    from images import cosine, reference_rgb

    run = backbones["extracted"](model, size)
    table = run["table"]
    assert run["summary"]["embedded"] == 26 and run["summary"]["failed"] == 0
    weights = torchvision.models.get_model_weights(model).DEFAULT
    preset = weights.transforms()
    crop = size or preset.crop_size[0]
    resize = round(crop * preset.resize_size[0] / preset.crop_size[0])
    meta = json.loads(table.schema.metadata[b"raytl"])
    assert (meta["model"], meta["image_size"], meta["preprocessing"]["resize"]) == (model, crop, resize)
    assert meta["preprocessing"]["interpolation"] == preset.interpolation.value
    assert (
        meta["preprocessing"]["mean"] == list(preset.mean)
        and meta["dim"] == table["embedding"].type.list_size
    )
    transform = weights.transforms(crop_size=crop, resize_size=resize)
    corpus = backbones["tmp"] / "corpus"
    files = [(corpus / p.split("/corpus/", 1)[1]).read_bytes() for p in table["path"].to_pylist()]
    expected = _penultimate(run["network"], torch.stack([transform(reference_rgb(data)) for data in files]))
    got = np.array(table["embedding"].to_pylist(), np.float32)
    assert got.shape == expected.shape and cosine(got, expected).min() >= 0.999


# predict rebuilds the backbone from model.json with the same code for every torchvision model: the three
# that differ in kind (a ResNet, an EfficientNet resized to its crop, a ViT at its fixed size). VGG16, raytl's
# own trunk, is test_predict's.
@pytest.mark.parametrize(
    "model,size", [b for b in BACKBONES if b[0] in ("resnet50", "efficientnet_v2_s", "vit_b_32")]
)
def test_a_probe_on_any_backbone_predicts_from_images_as_from_embeddings(backbones, tmp_path, model, size):
    """train -> predict from the images runs the model's own backbone and preprocessing (EfficientNetV2-S
    at 64 px is resized to 64, as its weights' 384 / 384): what the probe gives on the stored embeddings.
    EfficientNetV2-S's probe is also exported: plain torch scores the images the same."""
    import pyarrow.parquet as pq

    import raytl
    from raytl.modeling.classifier import Model

    run = backbones["extracted"](model, size)
    raytl.train(run["out"], str(tmp_path / "probe"), backend="sklearn", val_fraction=0.25)
    result = raytl.predict(str(tmp_path / "probe"), backbones["uri"], str(tmp_path / "pred"))
    probe = Model.load(str(tmp_path / "probe"))
    dim = run["table"]["embedding"].type.list_size
    assert probe.info.recorded_backbone["model"] == model and probe.info.recorded_backbone["dim"] == dim
    paths = run["table"]["path"].to_pylist()
    index, score = probe.predict(np.array(run["table"]["embedding"].to_pylist(), np.float32))
    stored = {p: (probe.classes[i], s) for p, i, s in zip(paths, index, score, strict=True)}
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    assert result["predicted"] == 26 and len(rows) == 26
    for row in rows:
        assert row["predicted_label"] == stored[row["path"]][0]
        assert row["score"] == pytest.approx(stored[row["path"]][1], abs=1e-4)
    if model != "efficientnet_v2_s":
        return
    # Exported, it runs the same network with plain torch (as `raytl serve` does in its replicas).
    raytl.export(str(tmp_path / "probe"), str(tmp_path / "probe.pt2"))
    transform = Transform(64, 64, interpolation="bilinear")
    corpus = backbones["tmp"] / "corpus"
    crops = np.stack([transform((corpus / r["path"].split("/corpus/", 1)[1]).read_bytes()) for r in rows])
    exported = exported_scores(tmp_path / "probe.pt2", crops, tmp_path)
    scores = np.array(exported["scores"])
    assert exported["info"]["backbone"]["model"] == "efficientnet_v2_s"
    assert [probe.classes[i] for i in scores.argmax(1)] == [r["predicted_label"] for r in rows]
    np.testing.assert_allclose(scores.max(1), [r["score"] for r in rows], atol=1e-4)


def test_backbone_options_are_checked(tmp_path):
    from raytl.config import ExtractConfig
    from raytl.errors import ConfigError
    from raytl.vision.models import preset

    with pytest.raises(
        ConfigError, match=r"^--model 'fasterrcnn_resnet50_fpn' is not a torchvision classification"
    ):
        preset("fasterrcnn_resnet50_fpn")
    with pytest.raises(
        ConfigError, match=r"^--model vit_b_16 does not take 64 px crops .*its weights expect 224 px\.$"
    ):
        embedding_dim(Layer.POOL5, Pool.AVG, 64, "vit_b_16")
    with pytest.raises(
        ConfigError, match="--layer and --pool choose vgg16's features; --model resnet50 gives"
    ):
        ExtractConfig.create(source="s", output="o", model="resnet50", layer="fc7")
    with pytest.raises(
        WeightsError, match=r"is not a torchvision resnet50 state_dict: \d+ tensors are missing"
    ):
        torch.save(random_state_dict(1), tmp_path / "vgg.pt")
        load_weights(str(tmp_path / "vgg.pt"), Layer.POOL5, model="resnet50")
    assert embedding_dim(Layer.POOL5, Pool.AVG, 64, "regnet_y_400mf") == 440  # built on CPU, not on meta


def test_torchvision_weights_names_load_those_weights_with_their_preprocessing(tmp_path, monkeypatch, capsys):
    """`--weights IMAGENET1K_V1` (torchvision's names of a model's weights, as in `get_model(weights=...)`):
    those weights' file (staged where torch.hub looks: nothing downloaded), their own resize (MobileNetV2's
    V1 resizes to 256, its default V2 to 232), their id in the metadata, which predict maps back to them."""
    from conftest import assert_user_error

    from raytl.config import ExtractConfig
    from raytl.modeling.classifier import weights_spec
    from raytl.vision.models import preset, resolved

    torch.manual_seed(4)
    state = torchvision.models.mobilenet_v2().state_dict()
    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for spec in ("IMAGENET1K_V1", "MobileNet_V2_Weights.IMAGENET1K_V1"):
        loaded = load_weights(spec, Layer.POOL5, model="mobilenet_v2")
        assert loaded.id == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1"
        assert set(loaded.state_dict) == set(state) - {"classifier.1.weight", "classifier.1.bias"}
        assert all(torch.equal(loaded.state_dict[k], state[k]) for k in loaded.state_dict)
        config = resolved(ExtractConfig.create(source="s", output="o", model="mobilenet_v2", weights=spec))
        assert (config.image_size, config.resize_size) == (224, 256)
    again = load_weights(weights_spec(loaded.id)[0], Layer.POOL5, model="mobilenet_v2")  # predict's way back
    assert again.id == loaded.id
    default = resolved(ExtractConfig.create(source="s", output="o", model="mobilenet_v2"))
    assert default.resize_size == 232 and preset("mobilenet_v2").weights.endswith("IMAGENET1K_V2")
    assert preset("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").interpolation == "bicubic"
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    base = ["extract", str(tmp_path / "corpus"), str(tmp_path / "out"), "--model", "mobilenet_v2"]
    assert_user_error(
        capsys,
        [*base, "--weights", "IMAGENET1K_V3"],
        "--weights IMAGENET1K_V3 is not one of mobilenet_v2's torchvision weights (IMAGENET1K_V1, "
        "IMAGENET1K_V2)",
    )
    assert_user_error(
        capsys,
        ["extract", str(tmp_path / "corpus"), str(tmp_path / "out"), "--weights", "IMAGENET1K_FEATURES"],
        "--weights IMAGENET1K_FEATURES normalises images unlike vgg16's other weights",
    )
    assert not (tmp_path / "out").exists()


def test_a_timm_backbone_gives_timms_own_features_and_predicts_and_exports_as_the_others(backbones, tmp_path):
    """--model timm/NAME (timm's tiny test ViT, seeded weights in a file): each embedding is what timm's own
    model and eval transform compute (its pretrained config: 160 px, bicubic, crop_pct 0.95, mean 0.5), as
    the metadata says; a probe on them predicts from the images as from the stored embeddings, and its
    exported program (plain torch, timm not imported) scores the images the same."""
    import pyarrow.parquet as pq
    import timm
    from images import reference_rgb

    import raytl
    from raytl.errors import ConfigError
    from raytl.modeling.classifier import Model

    name = "test_vit.r160_in1k"
    torch.manual_seed(3)
    network = timm.create_model(name, pretrained=False, num_classes=0).eval()
    torch.save(network.state_dict(), tmp_path / "w.pt")
    out, model = str(tmp_path / "emb"), f"timm/{name}"
    raytl.extract(backbones["uri"], out, model=model, weights=str(tmp_path / "w.pt"), precision="fp32")
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"raytl"])
    assert (meta["model"], meta["dim"], meta["image_size"], meta["layer"]) == (model, 64, 160, "penultimate")
    pre = meta["preprocessing"]
    assert (pre["resize"], pre["interpolation"], pre["mean"], pre["std"]) == (
        168,
        "bicubic",
        [0.5] * 3,
        [0.5] * 3,
    )
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(network))
    corpus = backbones["tmp"] / "corpus"
    files = [(corpus / p.split("/corpus/", 1)[1]).read_bytes() for p in table["path"].to_pylist()]
    with torch.no_grad():
        expected = network(torch.stack([transform(reference_rgb(data)) for data in files])).numpy()
    got = np.array(table["embedding"].to_pylist(), np.float32)
    assert got.shape == (26, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    raytl.train(out, str(tmp_path / "probe"), backend="sklearn", val_fraction=0.25)
    raytl.predict(str(tmp_path / "probe"), backbones["uri"], str(tmp_path / "pred"))
    probe = Model.load(str(tmp_path / "probe"))
    index, score = probe.predict(got)
    stored = {
        p: (probe.classes[i], s) for p, i, s in zip(table["path"].to_pylist(), index, score, strict=True)
    }
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    assert len(rows) == 26 and [r["predicted_label"] for r in rows] == [stored[r["path"]][0] for r in rows]
    assert [r["score"] for r in rows] == pytest.approx([stored[r["path"]][1] for r in rows], abs=1e-4)
    raytl.export(str(tmp_path / "probe"), str(tmp_path / "probe.pt2"))
    crop = Transform(160, 168, interpolation="bicubic")
    crops = np.stack([crop((corpus / r["path"].split("/corpus/", 1)[1]).read_bytes()) for r in rows])
    exported = exported_scores(tmp_path / "probe.pt2", crops, tmp_path)
    scores = np.array(exported["scores"])
    assert exported["info"]["backbone"]["model"] == model and exported["raytl_imported"] == []
    assert [probe.classes[i] for i in scores.argmax(1)] == [r["predicted_label"] for r in rows]
    np.testing.assert_allclose(scores.max(1), [r["score"] for r in rows], atol=1e-4)
    with pytest.raises(ConfigError, match="--model timm/no_such_net is not one of timm's models"):
        raytl.extract(backbones["uri"], str(tmp_path / "none"), model="timm/no_such_net")
