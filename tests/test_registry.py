"""Every classification model in torchvision's registry is a backbone raytl can embed with."""

import re
from pathlib import Path

import pytest
import torch
import torchvision

from raytl.config import Layer, Pool
from raytl.errors import ConfigError
from raytl.vision.models import embedding_dim, from_state_dict, preset, trunk

REGISTRY = torchvision.models.list_models(module=torchvision.models)


def test_every_registered_classification_model_gives_an_embedding_and_the_readme_lists_them():
    dims = {name: embedding_dim(Layer.POOL5, Pool.AVG, preset(name).crop, name) for name in REGISTRY}
    assert len(dims) == 80 and all(isinstance(d, int) and d > 0 for d in dims.values())
    assert (dims["resnet50"], dims["vit_b_16"], dims["vit_h_14"], dims["squeezenet1_0"]) == (
        2048,
        768,
        1280,
        512,
    )
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = re.search(r"All 80 are supported \([^)]*\): (.*?)\. Detection", readme, re.S)
    assert listed is not None
    names = {re.sub(r" \(.*", "", n.strip()) for n in listed.group(1).replace("\n", " ").split(",")}
    assert names == set(REGISTRY)


@pytest.mark.parametrize("model", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_embeds_the_pooled_input_of_its_1x1_conv_classifier(model):
    """SqueezeNet has no nn.Linear: its classifier is Dropout, a 1x1 conv to the classes, ReLU and global
    pooling. The embedding is that conv's input, pooled: from a full torchvision state_dict (a --weights
    file), computed here from torchvision's own modules."""
    torch.manual_seed(0)
    full = torchvision.models.get_model(model, weights=None).eval()
    network = from_state_dict(model, full.state_dict(), Layer.POOL5, Pool.AVG)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.adaptive_avg_pool2d(full.features(x), 1).flatten(1)
        got = network(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000 for m in trunk(model).modules())


def test_models_that_are_not_classifiers_are_refused_by_name():
    for name in ("fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18", "../../x"):
        with pytest.raises(
            ConfigError, match=rf"^--model '{re.escape(name)}' is not a torchvision classification"
        ):
            preset(name)
