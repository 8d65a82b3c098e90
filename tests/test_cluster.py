"""cluster.yaml passes Ray's own cluster-launcher validation, offline, and says what raytl relies on."""

import copy
import os

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_ray_validates_cluster_yaml(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_validator_rejects_a_broken_copy(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["node_config"] = "g5.xlarge"  # must be a mapping
    with pytest.raises(jsonschema.ValidationError, match="'g5.xlarge' is not of type 'object'"):
        validate_config(prepare_config(broken))


def test_node_types(config):
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs drivers only
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["min_workers"] >= 1
    assert "GPU" not in types["cpu"]["resources"] and types["cpu"]["resources"]["CPU"] > 0
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= types["gpu"]["max_workers"]


def test_image_matches_the_installed_ray(config):
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in c and "raytl" in c for c in config["setup_commands"])
