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
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["min_workers"] == 0
    assert "GPU" not in types["cpu"]["resources"] and types["cpu"]["resources"]["CPU"] > 0
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= types["gpu"]["max_workers"]


def test_nodes_run_the_locked_versions(config):
    """The image's Ray is the lock's (and so the driver's), and setup_commands install from the lock."""
    with open(os.path.join(ROOT, "requirements", "lock.txt")) as f:
        locked_ray = next(line.split("==")[1].strip() for line in f if line.startswith("ray=="))
    assert locked_ray == ray.__version__
    assert config["docker"]["image"] == f"rayproject/ray:{locked_ray}-py311-gpu"
    assert config["setup_commands"] == [
        "pip install -q -c /home/ray/raytl/requirements/lock.txt -e /home/ray/raytl"
    ]
