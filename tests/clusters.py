"""A Ray cluster of its own for a test, beside the session's: `ray start --head` on free ports with its own
temp dir, optionally under Ray's fake multi-node autoscaler (the node provider Ray tests its autoscaler
with), and stopped without `ray stop`, which would stop the test session's Ray too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# A GPU node type that the autoscaler starts from zero, as cluster.yaml's and k8s/raycluster.yaml's: each
# "GPU" is only a resource here (torch sees no CUDA), but where Ray places work is real.
# `memory` as a cloud provider reports it (raytl's model actors reserve 3 GiB): see fakenodes.py.
GPU_NODE = {
    "resources": {"CPU": 1, "GPU": 1, "memory": 8 * 1024**3, "object_store_memory": 200_000_000},
    "node_config": {},
}
_COMMANDS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
    "rsync_filter",
)  # fmt: skip


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: str
    gcs: str  # for ray.init(address=...)
    dashboard: str  # for `ray job submit --address ...`
    env: dict[str, str]  # for the CLI commands that talk to it


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def autoscaling_config(gcs_port: int, head_cpus: int, max_gpu_nodes: int) -> dict:
    """A cluster-launcher config for the fake multi-node provider: the head, and GPU_NODE from zero."""
    return {
        "cluster_name": "raytl-test",
        "max_workers": max_gpu_nodes,
        "upscaling_speed": 1.0,
        # Long enough that a node is not taken back between two tasks of a run (which fails them).
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "external",
            "module": "fakenodes.MemoryFakeProvider",  # Ray's fake_multinode, with node memory
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu": {**GPU_NODE, "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{name: [] for name in _COMMANDS},
    }


def start_head(env: dict[str, str], max_gpu_nodes: int = 0, head_cpus: int = 2) -> Head:
    """The head (with the job API), and an autoscaler that may start up to max_gpu_nodes GPU nodes;
    returns once the job API answers. Its temp dir is a short one of its own: Ray's socket paths inside it
    must stay under 108 bytes, which pytest's temp dirs (under pytest-xdist more so) can pass."""
    gcs, dashboard, client, agent, metrics = free_ports(5)
    env = {**env, "RAY_AUTH_MODE": "disabled"}  # Ray 2.60 turns on token auth for `ray start` by default
    temp_dir = tempfile.mkdtemp(prefix="rayhead-")
    autoscaling = []
    if max_gpu_nodes:
        config = os.path.join(temp_dir, "autoscaling.json")
        with open(config, "w") as f:
            json.dump(autoscaling_config(gcs, head_cpus, max_gpu_nodes), f)
        autoscaling = [f"--autoscaling-config={config}"]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")  # the provider requires the first
        # The autoscaler (started by `ray start`) imports the provider from tests/.
        tests = os.path.dirname(os.path.abspath(__file__))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            *autoscaling,
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            f"--num-cpus={head_cpus}",
            "--object-store-memory=400000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    head = Head(process, temp_dir, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    try:
        _wait_for_job_api(head)
    except BaseException:
        stop(head)
        raise
    return head


def _wait_for_job_api(head: Head, timeout: float = 120) -> None:
    """Until the job API lists jobs (the request `ray job list` makes; asked over HTTP here, not by a new
    Python process importing Ray each time)."""
    import urllib.error
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.process.poll() is None, "ray start --head exited"
        try:
            with direct.open(f"{head.dashboard}/api/jobs/", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the job API at {head.dashboard} did not come up")


def stop(head: Head) -> None:
    """Stop this cluster's processes only: the head's, and the nodes its autoscaler started (every one
    of them names the head's temp dir)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_mentioning(head.temp_dir) + [head.process.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    head.process.wait(timeout=30)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def pids_mentioning(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]
