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


# --- k8s/: the same cluster on Kubernetes with KubeRay ------------------------------------------------------


def k8s_manifests() -> dict[str, dict]:
    folder = os.path.join(ROOT, "k8s")
    manifests = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name)) as f:
                (manifests[name],) = yaml.safe_load_all(f)  # one object a file
    return manifests


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def test_k8s_cluster_scales_gpus_from_zero_on_the_locked_ray(config):
    """The RayCluster mirrors cluster.yaml: a head that takes no Ray work, a GPU group from zero under
    KubeRay's autoscaler, a CPU group; its image is built from Ray's image of cluster.yaml with raytl
    installed from the lock."""
    cluster = k8s_manifests()["raycluster.yaml"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1
    with open(os.path.join(ROOT, "k8s", "Dockerfile")) as f:
        dockerfile = f.read().splitlines()
    assert f"FROM {config['docker']['image']}" in dockerfile
    assert any(line.startswith("RUN pip install") and "-c /home/ray/raytl/requirements/lock.txt" in line
               for line in dockerfile)  # fmt: skip
    images = {
        c["image"] for g in [spec["headGroupSpec"], *groups.values()] for c in containers(g["template"])
    }
    assert len(images) == 1  # every pod runs the same raytl


def test_k8s_pods_fit_what_raytl_asks_for():
    """A GPU pod holds one model actor (1 CPU, 1 GPU, embedder.ACTOR_MEMORY) or one Ray Train worker
    (1 CPU, 1 GPU) with CPUs left to decode; CPU pods have no GPU; requests equal limits (Ray reads the
    limits as the node's resources)."""
    from raytl.cluster.embedder import ACTOR_MEMORY

    def gib(quantity: str) -> float:
        assert quantity.endswith("Gi"), quantity
        return float(quantity[:-2])

    groups = {g["groupName"]: g for g in k8s_manifests()["raycluster.yaml"]["spec"]["workerGroupSpecs"]}
    (gpu,) = containers(groups["gpu"]["template"])
    (cpu,) = containers(groups["cpu"]["template"])
    for container in (gpu, cpu):
        assert container["resources"]["requests"] == container["resources"]["limits"]
    gpu_limits, cpu_limits = gpu["resources"]["limits"], cpu["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1" and int(gpu_limits["cpu"]) >= 2
    assert (
        gib(gpu_limits["memory"]) * 1024**3 >= 2 * ACTOR_MEMORY
    )  # the actor, and the object store beside it
    assert "nvidia.com/gpu" not in cpu_limits and int(cpu_limits["cpu"]) >= 2


def test_k8s_credentials_come_from_a_secret_never_from_runtime_env():
    manifests = k8s_manifests()
    spec = manifests["raycluster.yaml"]["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in containers(group["template"]):
            assert container["envFrom"] == [{"secretRef": {"name": "raytl-s3", "optional": True}}]
            assert "env" not in container
    for name, manifest in manifests.items():
        text = yaml.safe_dump(manifest)
        assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text, name
        assert "runtimeEnvYAML" not in manifest["spec"] or "AWS_" not in manifest["spec"]["runtimeEnvYAML"]


def test_k8s_jobs_run_each_verb_on_the_cluster_with_arguments_raytl_accepts():
    """A RayJob per verb, on the RayCluster (clusterSelector); each entrypoint is a raytl command line
    that raytl's own parser accepts and whose config validates, asking for GPUs (--device cuda)."""
    import shlex

    from raytl.cli import build_parser, config_of
    from raytl.config import Device

    manifests = k8s_manifests()
    cluster = manifests["raycluster.yaml"]["metadata"]["name"]
    jobs = {name: m for name, m in manifests.items() if m["kind"] == "RayJob"}
    assert set(jobs) == {f"rayjob-{verb}.yaml" for verb in ("extract", "train", "finetune", "predict")}
    for name, job in jobs.items():
        verb = name.removeprefix("rayjob-").removesuffix(".yaml")
        assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"] == f"raytl-{verb}"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}
        program, *argv = shlex.split(job["spec"]["entrypoint"])
        assert program == "raytl" and argv[0] == verb
        config = config_of(build_parser().parse_args(argv), verb)
        assert config.device == Device.CUDA, name


# --- Ray Serve: serve.yaml (serve deploy / serve run) and k8s/rayservice.yaml (KubeRay) -------------------


def serve_config() -> dict:
    with open(os.path.join(ROOT, "serve.yaml")) as f:
        return yaml.safe_load(f)


def test_serve_config_passes_serves_own_schema_and_raytls_options():
    """serve.yaml is what `serve deploy` accepts (Ray Serve's own schema, which `serve deploy` and KubeRay's
    serveConfigV2 are checked against), and its app's args are options `raytl serve` accepts, asking
    for GPUs as the jobs do (GPU nodes that scale from zero are not up when it deploys)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from raytl.config import Device, ServeConfig

    config = serve_config()
    ServeDeploySchema.model_validate(config)
    broken = copy.deepcopy(config)
    broken["applications"][0]["import_path"] = "raytl"
    with pytest.raises(ValidationError, match='invalid import path "raytl"'):
        ServeDeploySchema.model_validate(broken)
    (app,) = config["applications"]
    # Serve's schema lets unknown fields by: no misspelt one here
    assert set(config) <= set(ServeDeploySchema.model_fields)
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "raytl.commands.serve:app" and app["route_prefix"] == "/"
    options = ServeConfig.create(**app["args"])
    assert options.device == Device.CUDA and options.replicas == (1, 4) and options.max_batch_size == 32
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_k8s_rayservice_serves_serve_yaml_on_the_raycluster():
    """The RayService is serve.yaml (serveConfigV2, the same config) on raycluster.yaml's cluster
    (rayClusterConfig, the same spec), whose head names Serve's port; its image has the serve extra."""
    manifests = k8s_manifests()
    service = manifests["rayservice.yaml"]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config()
    cluster = manifests["raycluster.yaml"]["spec"]
    assert service["spec"]["rayClusterConfig"] == cluster
    (head,) = containers(cluster["headGroupSpec"]["template"])
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    with open(os.path.join(ROOT, "k8s", "Dockerfile")) as f:
        assert '"/home/ray/raytl[serve]"' in f.read()
