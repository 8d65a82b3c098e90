"""Placement on a multi-node cluster: model actors and Ray Train workers hold one GPU each and run only on
GPU nodes; with --device cuda they make Ray's autoscaler start GPU nodes from zero; runs go on when a node
is lost.

Each test's cluster runs beside the test session's Ray: a `ray.cluster_utils.Cluster` (several raylets on
this machine, some declaring a GPU) started by the test's script, or a head under Ray's fake multi-node
autoscaler (clusters.py). Without CUDA the actors fall back to the CPU, but where Ray placed them is real.
"""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from clusters import start_head, stop
from images import write_colour_corpus, write_corpus

pytestmark = pytest.mark.ray  # every test here starts a Ray cluster of its own


def on_a_cluster(script: str, *args, env: dict[str, str] | None = None) -> dict:
    """Run PRELUDE + a script that starts or joins a multi-node cluster; the JSON object it prints last.
    `env`: a joined cluster's (by default this process's, which the session's ray.init changed: it sets
    RAY_AUTH_MODE=token, and a driver in token mode on a cluster without auth sees its model actor
    destroyed as it is created)."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + script, *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    # Ray's progress lines fill stderr: on failure, show the script's own output and the error lines.
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "Traceback" in line]
    assert proc.returncode == 0, "\n".join([proc.stdout[-2000:], *errors[-30:], proc.stderr[-1500:]])
    # Ray forwards its workers' and raylets' lines to the script's stdout too, sometimes after the result.
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def test_train_workers_ask_for_one_gpu_each_on_gpu_clusters():
    # Placement itself cannot run here: NCCL refuses to start without a real GPU. What Ray Train is
    # asked for decides where its workers go.
    from raytl.cluster.training import scaling

    gpu = scaling(4, use_gpu=True)
    assert (gpu.num_workers, gpu.use_gpu, gpu.resources_per_worker) == (4, True, {"CPU": 1, "GPU": 1})
    cpu = scaling(2, use_gpu=False)
    assert (cpu.use_gpu, cpu.resources_per_worker) == (False, {"CPU": 0.25})


# Shared by the scripts below. `holding(GATE)` is a worker setup hook that holds each model actor after its
# first two batches while the file GATE exists: a new actor takes ~25 s to start on 2 busy cores and one
# actor alone ends these runs in ~60 s, so unheld, a run could end before its pool had grown. The batches
# that pass give Ray Data the model stage's rate, from which its cluster autoscaler asks for more nodes.
PRELUDE = r"""
import json, os, sys, threading, time
import ray
from ray.util.state import list_actors, list_tasks


def holding(gate):
    def hold(embedder):
        embed = embedder.Embedder.__call__

        def held(self, batch):
            held.calls += 1
            while held.calls > 2 and os.path.exists(gate):
                time.sleep(0.2)
            return embed(self, batch)

        held.calls = 0
        embedder.Embedder.__call__ = held

    def hook():
        # Patched where the model actors import raytl's embedder, as they do: every other worker of the run
        # (Ray Data's and Ray Train's own actors, ~20 of them) starts without importing torch (~2 s each).
        import importlib.abc
        import importlib.util

        class Patch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "raytl.cluster.embedder":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    hold(module)

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, Patch())

    return hook


def embedders(address, state=None):
    for attempt in range(5):  # the state API can time out while the machine is busy
        try:
            actors = list_actors(address=address, detail=True, limit=10000, timeout=30)
            break
        except Exception:
            if attempt == 4:
                raise
            time.sleep(2)
    return [a for a in actors if "Embedder" in a.class_name and state in (None, a.state)]


def hosts(address, state=None):
    return {a.node_id for a in embedders(address, state) if a.node_id}


def wait(what, condition, job):
    deadline = time.monotonic() + 300
    while not condition():
        assert time.monotonic() < deadline and job.is_alive(), what
        time.sleep(0.5)
"""

LOST_NODES = r"""
# After a node is lost, Ray Train first tries the old group size again (the node is still in the view of
# Ray's AutoscalingCoordinator) and waits this long for a placement group before it shrinks; 60 s by default.
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "4"
import re
from ray.cluster_utils import Cluster
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    get_or_create_autoscaling_coordinator,
)

source, output, images, model_dir, gate = sys.argv[1:6]
# The GCS marks a node dead after `health_check_failure_threshold` failed checks `health_check_period_ms`
# apart (5 x 3 s by default): a lost node's work is rescheduled only then.
health_checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
cluster = Cluster(
    initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": health_checks}  # decoding; no GPU
)
gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
cluster.wait_for_nodes()
address = cluster.address
ray.init(address=address, logging_level="ERROR", runtime_env={"worker_process_setup_hook": holding(gate)})

import raytl

# 1. extract: one model actor per GPU up by default. A spot GPU node is taken back mid-run, with its model
# actor and the batch that actor holds.
extracted = {}
job = threading.Thread(target=lambda: extracted.update(raytl.extract(
    source, output, weights="random", image_size=64, decode_batch=8, batch_size=8, rows_per_file=24)))
job.start()
wait("a model actor on each GPU node", lambda: len(hosts(address, "ALIVE")) == 2, job)
wait("a part written", lambda: any(f.startswith("part-") for f in os.listdir(output)), job)
embedder_nodes = sorted(hosts(address))
lost = next(n for n in gpu_nodes if n.node_id == embedders(address, "ALIVE")[0].node_id)
cluster.remove_node(lost, allow_graceful=False)
os.remove(gate)
job.join()
tasks = list_tasks(address=address, detail=True, limit=10000, timeout=30)
decoders = [t for t in tasks if "decode_batch" in t.name]

# 2. finetune --workers 1-2 with two GPU nodes up again: a Ray Train worker on each. The node of one is
# taken back after the first checkpoint.
live = [n for n in gpu_nodes if n is not lost] + [cluster.add_node(num_cpus=1, num_gpus=1)]
cluster.wait_for_nodes()
# Ray Train sizes an elastic group from the nodes that Ray's AutoscalingCoordinator actor saw last, and it
# looks every 20 s: had it looked while only one GPU node was up, the group would start with one worker.
# (A user's group grows later: Ray Train checks for more resources while it trains.) Make it look now.
coordinator = get_or_create_autoscaling_coordinator()
ray.get(coordinator.get_reserved_resources.remote("raytl-test", recompute=True))
trained = {}
job = threading.Thread(target=lambda: trained.update(raytl.finetune(
    images, model_dir, weights="random", image_size=32, epochs=4, batch_size=4, lr=0.2, warmup_epochs=0.5,
    device="cuda", workers="1-2")))
job.start()


def checkpoints():
    snapshot = os.path.join(model_dir, "train", "checkpoint_manager_snapshot.json")
    if not os.path.exists(snapshot):
        return set()
    with open(snapshot) as f:
        return set(re.findall(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+", f.read()))


def trainers():
    actors = list_actors(address=address, detail=True, limit=10000, timeout=30)
    return [a for a in actors if a.class_name == "RayTrainWorker" and a.state == "ALIVE"]


wait("a checkpoint", checkpoints, job)
first = trainers()
cluster.remove_node(next(n for n in live if n.node_id == first[0].node_id), allow_graceful=False)
# Ray Train retries the old group size until the coordinator's view drops the node (10 s a try): once Ray
# has marked the node dead, make the coordinator look (a user's cluster waits up to 20 s more here).
gone = first[0].node_id
wait("the node marked dead", lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == gone), job)
ray.get(coordinator.get_reserved_resources.remote("raytl-test", recompute=True))
job.join()
print("RESULT", json.dumps({
    "embedded": extracted["embedded"],
    "gpu_nodes": sorted(n.node_id for n in gpu_nodes),
    "embedder_nodes": embedder_nodes,
    "embedder_gpus": sorted({a.required_resources.get("GPU", 0) for a in embedders(address)}),
    "decode_nodes": sorted({t.node_id for t in decoders}),
    "decode_gpus": sorted({t.required_resources.get("GPU", 0) for t in decoders}),
    "live_gpu_nodes": sorted(n.node_id for n in live),
    "trainer_nodes": sorted(a.node_id for a in first),
    # Ray Train places its workers in a placement group: their GPU shows as GPU_group_* bundle resources
    "trainer_gpus": [max(v for k, v in a.required_resources.items() if k.startswith("GPU")) for a in first],
    "history": trained["history"],
    "resumed": trained["resumed_at_epochs"],
    "accuracy": trained["accuracy"],
    "model": sorted(os.listdir(model_dir)),
}))
ray.shutdown()
cluster.shutdown()
"""


def test_lost_gpu_nodes_cost_no_image_and_no_training(tmp_path):
    """On a cluster with two GPU nodes (`ray.cluster_utils.Cluster`; one script, one cluster):
    - extract: by default one model actor per GPU up, each holding one GPU, one on each GPU node and none on
      the CPU-only head; decoding asks for no GPU. One GPU node is removed mid-run (a spot node taken back)
      while its actor holds a batch: the run finishes, and every image is in OUTPUT exactly once.
    - finetune --device cuda --workers 1-2, two GPU nodes up again: a Ray Train worker holding one GPU on
      each (training on their CPUs here: Ray places, torch sees no CUDA). One node is removed after the
      first checkpoint: Ray Train's elastic group carries on with one worker from the last checkpoint, and
      the run writes MODEL_DIR."""
    good = write_corpus(
        tmp_path / "corpus", {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}, broken=False, strays=False
    )
    write_colour_corpus(tmp_path / "images", per_class=8, seed=0)
    (tmp_path / "gate").touch()
    names = ("corpus", "out", "images", "model", "gate")
    got = on_a_cluster(LOST_NODES, *(tmp_path / name for name in names))
    assert got["embedded"] == len(good)
    assert got["embedder_nodes"] == got["gpu_nodes"]  # both GPU nodes, never the CPU-only head
    assert got["embedder_gpus"] == [1.0]
    assert got["decode_gpus"] == [0.0] and got["decode_nodes"]
    paths = pq.read_table(tmp_path / "out", columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(good)

    assert got["trainer_nodes"] == got["live_gpu_nodes"] and got["trainer_gpus"] == [1.0, 1.0]
    epochs = [record["epoch"] for record in got["history"]]
    resumed = got["resumed"]
    assert epochs == list(range(4)) and len(resumed) == 1 and 1 <= resumed[0] < 4, (epochs, resumed)
    workers = [record["workers"] for record in got["history"]]
    assert workers == [2] * resumed[0] + [1] * (4 - resumed[0])
    assert {"model.json", "model.pt", "backbone.pt", "metrics.json"} <= set(got["model"])
    assert 0 <= got["accuracy"] <= 1


AUTOSCALED = r"""
address, source, output, gate = sys.argv[1:5]
ray.init(address=address, logging_level="ERROR", runtime_env={"worker_process_setup_hook": holding(gate)})
gpus_at_start = ray.cluster_resources().get("GPU", 0)

import raytl

result = {}
job = threading.Thread(target=lambda: result.update(raytl.extract(
    source, output, weights="random", image_size=64, decode_batch=8, batch_size=8, rows_per_file=24,
    device="cuda", num_actors="1-2")))
job.start()
wait("the autoscaler's GPU nodes hosting the pool", lambda: len(hosts(address, "ALIVE")) == 2, job)
os.remove(gate)
job.join()
print("RESULT", json.dumps({
    "gpus_at_start": gpus_at_start,
    "embedded": result["embedded"],
    "embedder_nodes": sorted(hosts(address)),
    "gpu_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")),
    "head": ray.get_runtime_context().get_node_id(),
}))
"""


@pytest.fixture
def autoscaling_head():
    """A cluster of its own (clusters.py): a head with 2 CPUs and no GPU, under Ray's fake multi-node
    autoscaler with a GPU node type that scales from zero to two."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = start_head(env, max_gpu_nodes=2)
    yield head
    stop(head)


def test_the_autoscaler_starts_gpu_nodes_for_device_cuda(autoscaling_head, tmp_path):
    """extract --device cuda --num-actors 1-2 on a cluster whose GPU node type scales from zero (Ray's
    fake multi-node autoscaler): the pending model actor makes the autoscaler start a GPU node, the pool
    grows and makes it start a second, and the model actors run there, one on each, never on the head.
    Every image is in OUTPUT once. (The model stage is held until the pool has grown: see PRELUDE.)"""
    good = write_corpus(tmp_path / "corpus", {"a": [1, 2, 3], "b": [4, 5, 6]}, broken=False, strays=False)
    (tmp_path / "gate").touch()
    paths = (tmp_path / n for n in ("corpus", "out", "gate"))
    got = on_a_cluster(AUTOSCALED, autoscaling_head.gcs, *paths, env=autoscaling_head.env)
    assert got["gpus_at_start"] == 0 and got["embedded"] == len(good)
    assert len(got["gpu_nodes"]) == 2 and got["embedder_nodes"] == got["gpu_nodes"]
    assert got["head"] not in got["gpu_nodes"]
    paths = pq.read_table(tmp_path / "out", columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(good)


def test_device_and_actor_pool_options():
    """What the pool and the Ray Train workers ask Ray for, by --device and --num-actors."""
    from raytl.cluster.embedder import Resources, actor_pool
    from raytl.config import ExtractConfig
    from raytl.errors import ConfigError

    none_up, two_up = Resources(gpus=0, cpus=8, use_gpu=True), Resources(gpus=2, cpus=8, use_gpu=True)
    cpu = Resources(gpus=0, cpus=8, use_gpu=False)

    def pool(resources, num_actors=None):
        strategy = actor_pool(
            ExtractConfig.create(source="s", output="o", num_actors=num_actors).num_actors, resources
        )
        return strategy.min_size, strategy.max_size

    assert pool(none_up) == (1, float("inf"))  # grows with the GPU nodes an autoscaler adds
    assert pool(two_up) == (2, float("inf"))
    assert pool(cpu) == (1, 1)
    assert pool(cpu, "3") == pool(two_up, 3) == (3, 3)
    assert pool(two_up, "1-8") == pool(cpu, (1, 8)) == (1, 8)
    with pytest.raises(ConfigError, match=r"--num-actors must be a count \(4\) or a range MIN-MAX"):
        ExtractConfig.create(source="s", output="o", num_actors="8-2")
    from raytl.cluster.training import uses_gpu
    from raytl.config import Device

    assert uses_gpu(Device.CUDA) and not uses_gpu(Device.CPU)  # Ray Train workers: without asking Ray
    with pytest.raises(ConfigError, match="--device must be one of auto, cuda, cpu, not 'gpu'"):
        ExtractConfig.create(source="s", output="o", device="gpu")
