"""Placement on a multi-node cluster: model actors hold one GPU each and run only on GPU nodes.

A `ray.cluster_utils.Cluster` (several raylets on this machine, two of them declaring a GPU) runs in a
subprocess, apart from the test session's Ray. Without CUDA the actors fall back to the CPU, but
where Ray placed them is real.
"""

import json
import subprocess
import sys

from images import write_corpus

SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})  # the head is the CPU-only node
gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="ERROR")

from raytl.commands import extract
from raytl.config import ExtractConfig

summary = extract.run(ExtractConfig.create(
    source=sys.argv[1], output=sys.argv[2], weights="random", image_size=32, decode_batch=4))
# Ray Train's placement, with the probe's own fit_ray and scaling, on the embeddings just written (the
# label pass, evaluation and report of train.run add nothing here but time).
import numpy as np
import pyarrow.parquet as pq
from raytl.commands import train
from raytl.config import TrainConfig

table = pq.read_table(sys.argv[2])
x = np.stack([np.asarray(e, np.float32) for e in table["embedding"].to_pylist()])
y = np.array([["a", "b"].index(label) for label in table["label"].to_pylist()])
rows = ray.data.from_items([{"x": xi, "y": int(yi)} for xi, yi in zip(x, y)])
plan = train.Plan(["a", "b"], None, {"a": int((y == 0).sum()), "b": int((y == 1).sum())}, {"a": 1, "b": 1})
config = TrainConfig.create(embeddings=sys.argv[2], model_dir=sys.argv[3], workers=2, epochs=3)
_, history = train.fit_ray(rows, rows, plan, config, x.mean(0), x.std(0) + 1e-6, 0.01)
metrics = {"history": history}
actors = list_actors(detail=True, limit=10000)
embedders = [a for a in actors if "Embedder" in a.class_name]
trainers = [a for a in actors if a.class_name == "RayTrainWorker"]
decoders = [t for t in list_tasks(detail=True, limit=10000) if "decode_batch" in t.name]
print(json.dumps({
    "embedded": summary["embedded"],
    "gpu_nodes": sorted(n.node_id for n in gpu_nodes),
    "embedder_nodes": sorted(a.node_id for a in embedders),
    "embedder_gpus": [a.required_resources.get("GPU", 0) for a in embedders],
    "decode_nodes": sorted({t.node_id for t in decoders}),
    "decode_gpus": sorted({t.required_resources.get("GPU", 0) for t in decoders}),
    "trainer_nodes": sorted(a.node_id for a in trainers),
    # Ray Train places its workers in a placement group: their GPU shows as GPU_group_* bundle resources
    "trainer_gpus": [max(v for k, v in a.required_resources.items() if k.startswith("GPU"))
                     for a in trainers],
    "epochs": len(metrics["history"]),
}))
ray.shutdown()
cluster.shutdown()
"""


def test_model_actors_run_on_gpu_nodes_with_one_gpu_each(tmp_path):
    good = write_corpus(tmp_path / "corpus", {"a": [1, 2], "b": [3]}, broken=False, strays=False)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "corpus"),
            str(tmp_path / "out"),
            str(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["embedded"] == len(good) == 39
    # one actor per GPU in the cluster, each holding one GPU, each on its own GPU node
    assert got["embedder_nodes"] == got["gpu_nodes"]
    assert got["embedder_gpus"] == [1.0, 1.0]
    # decoding asks for no GPU and may run anywhere
    assert got["decode_gpus"] == [0.0] and got["decode_nodes"]
    # Ray Train workers too: one GPU each, on the GPU nodes only (training on their CPUs here)
    assert got["trainer_nodes"] == got["gpu_nodes"] and got["trainer_gpus"] == [1.0, 1.0]
    assert got["epochs"] == 3


def test_train_workers_ask_for_one_gpu_each_on_gpu_clusters():
    # Placement itself cannot run here: NCCL refuses to start without a real GPU. What Ray Train is
    # asked for decides where its workers go.
    from raytl.commands.train import scaling

    gpu = scaling(4, use_gpu=True)
    assert (gpu.num_workers, gpu.use_gpu, gpu.resources_per_worker) == (4, True, {"CPU": 1, "GPU": 1})
    cpu = scaling(2, use_gpu=False)
    assert (cpu.use_gpu, cpu.resources_per_worker) == (False, {"CPU": 0.25})
