"""The GPU path measured and checked on one GPU machine, in one run (issue #20): figures as JSON.

    bash bench/gpu.sh                    # on a lent GPU machine: installs .gpu/wheels, then this script
    python bench/gpu.py --out DIR        # where Ray and the GPU are already there
    python bench/gpu.py --quick          # the dry run on a CPU machine: every step, small sizes

Steps, each written to DIR/gpu.json as soon as it is done (a run cut short keeps what it measured):
  environment  GPU, driver, CUDA, cuDNN, torch, torchvision, Ray, CPU, /dev/shm
  photos       --images ~500x375 JPEGs (bench/extract.py's), written by every core
  a_model      Embedder on uint8 batches already on the GPU (the ceiling) and from host memory (the
               --decode cpu actor's path): bf16, fp16, fp32 (TF32) x batch 128, 256, 512, with the share of
               the chip's dense rate; cudnn.benchmark at bf16, batch 256
  c_decode     images/s that one CPU core decodes and crops (Pillow), and all cores together; nvJPEG
               decoding + resizing alone, and with the model (the --decode gpu actor's work)
  d_correct    cosine of GPU embeddings (fp32, bf16, fp16) against torchvision's CPU fp32 VGG16 on the
               same crops; nvJPEG crops against Pillow's (grey levels)
  b_extract    `raytl extract` over all photos from local disk, --decode cpu and --decode gpu: images/s,
               GPU utilisation (nvidia-smi every 0.2 s), b/a; the two outputs' embeddings compared
  e_train      `raytl train` (a GPU worker), `raytl predict` from images on the GPU and on the CPU (the
               labels must agree), `raytl finetune` (bf16 autocast, NCCL, one GPU worker)
  a_compile    (a) at bf16, batch 256, with torch.compile (--compile): last, its warm-up takes minutes
Weights are random (torchvision's initialisation, seeded): nothing is downloaded, and speed does not depend
on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import write_photos  # noqa: E402  (bench/extract.py)

from raytl.cluster.embedder import Embedder  # noqa: E402
from raytl.config import Layer, Pool, Precision  # noqa: E402
from raytl.vision.models import load_weights  # noqa: E402
from raytl.vision.preprocess import Transform, decode_batch, fetch_batch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# H100/H200 SXM datasheet dense rates (no sparsity), TFLOP/s: the denominators of "share of the chip".
PEAK_TFLOPS = {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7}  # fp32 runs as TF32 on the tensor cores
TRANSFORM = Transform(224, 256)


def main() -> None:
    args = parse_args()
    # Process pools (photos, CPU decoding) start fresh interpreters: forking a process that holds a CUDA
    # context and torch's thread pools can hang the children.
    multiprocessing.set_start_method("spawn", force=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    report = Report(out / "gpu.json", "python " + " ".join(sys.argv))
    report.step("environment", environment)
    state = load_weights("random", Layer.POOL5, seed=0).state_dict
    files = report.step("photos", lambda: photos(work / "photos", args.images))
    if files is None:
        sys.exit("no photographs: nothing to measure")
    a = report.step("a_model", lambda: model_alone(state, args))
    report.step("c_decode", lambda: decode_rates(files, state, a))
    report.step("d_correct", lambda: correctness(files[: args.check_images], state))
    if not args.no_ray:
        weights = work / "vgg16-features.pt"
        torch.save(state, weights)
        report.step("b_extract", lambda: extract_runs(files, weights, work, a, args))
        report.step("e_train", lambda: training_runs(files, work, args))
    if not args.no_compile:
        report.step("a_compile", lambda: compiled(state, args))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="gpu.json goes here")
    parser.add_argument("--work", default="/tmp/raytl-gpu", help="photos and raytl's outputs")
    parser.add_argument("--images", type=int, default=20_000, help="photos for b_extract (>= 10,000)")
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[128, 256, 512])
    parser.add_argument("--timed-batches", type=int, default=20, help="batches timed per a_model case")
    parser.add_argument("--check-images", type=int, default=128, help="images for d_correct")
    parser.add_argument("--subset", type=int, default=2048, help="images for train, predict, finetune")
    parser.add_argument("--no-ray", action="store_true", help="a, c, d only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    parser.add_argument("--quick", action="store_true", help="dry run on CPU: tiny sizes, every step")
    args = parser.parse_args()
    if args.quick:
        args.images, args.timed_batches, args.check_images, args.subset = 96, 1, 8, 48
        args.batches = [4, 8]
    return args


class Report:
    """The JSON file, rewritten after every step; a step that raises is recorded with its traceback and the
    run goes on (one broken step must not cost the others' device time)."""

    def __init__(self, path: Path, command: str) -> None:
        self.path = path
        self.data: dict = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def step(self, name: str, run: Callable[[], object]) -> object:
        log(f"-- {name}")
        started = time.perf_counter()
        try:
            value = run()
            result = value if not isinstance(value, list) else {"count": len(value)}
        except Exception as exc:
            value, result = (
                None,
                {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
            )
            log(result["traceback"])
        self.data[name] = {**(result if isinstance(result, dict) else {"value": result})}
        self.data[name]["step_seconds"] = round(time.perf_counter() - started, 1)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        log(json.dumps({name: _short(self.data[name])}, default=str))
        return value


def environment() -> dict:
    import torchvision

    info = {
        "gpu": torch.cuda.get_device_name() if CUDA else None,
        "driver": _smi("driver_version"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if CUDA else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
        ),
        "cores": os.cpu_count(),
        "dev_shm_gib": round(shutil.disk_usage("/dev/shm").total / 1024**3, 1),
    }
    with contextlib.suppress(ImportError):
        import ray
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        info["ray"] = ray.__version__
        info["ray_sees_gpus"] = NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()
    return info


def photos(root: Path, count: int) -> list[Path]:
    """The photographs, written once: a rerun on the same (warm) machine finds them."""
    files = sorted(root.glob("*/*.jpg"), key=lambda f: f.name)  # by number: the classes alternate
    return files if len(files) == count else write_photos(_fresh(root), count, workers=os.cpu_count() or 1)


def model_alone(state: dict, args: argparse.Namespace) -> dict:
    """(a): images/s of the actor's Embedder, its batches on the device (the ceiling) and in host memory."""
    flops = _flops_per_image()
    cases: list[dict] = []
    for precision in ("bf16", "fp16", "fp32"):
        for batch in args.batches:
            cases.append({**_case(precision, batch), **_rates(state, precision, batch, args)})
    middle = args.batches[len(args.batches) // 2]  # 256 on the GPU
    torch.backends.cudnn.benchmark = True
    cases.append({**_case("bf16", middle), "cudnn_benchmark": True, **_rates(state, "bf16", middle, args)})
    torch.backends.cudnn.benchmark = False
    for case in cases:
        case["share_of_dense_peak"] = _share(case, flops)
    best = max(cases, key=lambda c: c["on_device_images_per_second"])
    return {"gflop_per_image": round(flops / 1e9, 2), "cases": cases, "best": best}


def compiled(state: dict, args: argparse.Namespace) -> dict:
    """(a) with torch.compile (--compile): last, as its compilation takes a minute or more."""
    middle = args.batches[len(args.batches) // 2]
    started = time.perf_counter()
    case = {**_case("bf16", middle), **_rates(state, "bf16", middle, args, compile=True)}
    case["compile_and_time_seconds"] = round(time.perf_counter() - started, 1)
    return {**case, "share_of_dense_peak": _share(case, _flops_per_image())}


def _share(case: dict, flops: float) -> float:
    """The share of the chip's dense rate at the case's precision that its on-device images/s reach."""
    return round(case["on_device_images_per_second"] * flops / (PEAK_TFLOPS[case["precision"]] * 1e12), 4)


def _case(precision: str, batch: int) -> dict:
    return {"precision": precision, "batch_size": batch}


def _rates(state: dict, precision: str, batch: int, args: argparse.Namespace, compile: bool = False) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = precision == "fp32"  # fp32 on Hopper: TF32 (cuDNN's convs too)
    embedder = Embedder(state, Layer.POOL5, Pool.AVG, Precision(precision), batch, compile=compile)
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (batch * 2, 224, 224, 3), dtype=np.uint8)
    device = torch.from_numpy(host).to(DEVICE)
    embedder.embed(device)  # warm-up: cuDNN's algorithm choice, the allocator, compilation
    return {
        "on_device_images_per_second": _timed(
            lambda: embedder.embed(device), len(host), args.timed_batches // 2
        ),
        "from_host_images_per_second": _timed(
            lambda: embedder.embed(host), len(host), args.timed_batches // 2
        ),
    }


def _timed(run: Callable[[], object], images: int, repeats: int) -> float:
    repeats = max(1, repeats)
    _sync()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync()
    return round(images * repeats / (time.perf_counter() - started), 1)


def _flops_per_image() -> float:
    """Multiply-adds x 2 of the trunk's convolutions at 224 px, counted from the shapes they produce."""
    from raytl.vision.models import trunk

    network = trunk("vgg16", Layer.POOL5, Pool.AVG)  # on the meta device: shapes, no arithmetic
    total = []

    def count(module: torch.nn.Module, _: object, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        total.append(2 * output[0].numel() * module.in_channels // module.groups * kh * kw)

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    network(torch.zeros(1, 3, 224, 224, device="meta"))
    for hook in hooks:
        hook.remove()
    return float(sum(total))


def decode_rates(files: list[Path], state: dict, a: object) -> dict:
    """(c): CPU decoding per core and on all cores; nvJPEG decoding alone and with the model."""
    from concurrent.futures import ProcessPoolExecutor

    one = files[:256]
    started = time.perf_counter()
    decode_batch(_rows(one), TRANSFORM)
    per_core = len(one) / (time.perf_counter() - started)
    many = files[: max(len(files) // 4, 256)]
    chunks = [_rows(many[i : i + 32]) for i in range(0, len(many), 32)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(decode_batch, chunks[:32], [TRANSFORM] * 32))  # workers started and warm
        started = time.perf_counter()
        list(pool.map(decode_batch, chunks, [TRANSFORM] * len(chunks)))
        all_cores = len(many) / (time.perf_counter() - started)
    result = {
        "cpu_decode_images_per_second_one_core": round(per_core, 1),
        "cpu_decode_images_per_second_all_cores": round(all_cores, 1),
        "cores": os.cpu_count(),
    }
    fetched = [
        fetch_batch(_rows(files[i : i + 256]), TRANSFORM) for i in range(0, min(len(files), 2048), 256)
    ]
    embedder = Embedder(state, Layer.POOL5, Pool.AVG, Precision.AUTO, 256, device_decode=TRANSFORM)
    count = sum(len(b["path"]) for b in fetched)
    decoder = embedder.decoder
    assert decoder is not None
    decoder(fetched[0]["data"], fetched[0]["kind"], fetched[0]["orientation"])  # warm-up
    result["device_decode_images_per_second"] = _timed(
        lambda: [decoder(b["data"], b["kind"], b["orientation"]) for b in fetched], count, 1
    )
    embedder(dict(fetched[0]))
    result["device_decode_and_model_images_per_second"] = _timed(
        lambda: [embedder(dict(b)) for b in fetched], count, 1
    )
    if isinstance(a, dict):  # how many cores keep the GPU busy under --decode cpu
        result["cores_to_feed_the_ceiling"] = round(a["best"]["on_device_images_per_second"] / per_core, 1)
    return result


def correctness(files: list[Path], state: dict) -> dict:
    """(d): the GPU's embeddings against torchvision's CPU fp32 VGG16 on the same Pillow crops; nvJPEG's
    crops against Pillow's."""
    import torchvision

    crops = decode_batch(_rows(files), TRANSFORM)["image"]
    vgg = torchvision.models.vgg16()
    vgg.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255)
    x = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.inference_mode():
        reference = vgg.features.eval()(x).mean((2, 3)).numpy()
    result: dict = {"images": len(files)}
    # fp32 twice: as raytl runs it (cuDNN's convolutions in TF32, PyTorch's default) and strictly.
    for name, precision, tf32 in (
        ("fp32_tf32", "fp32", True),
        ("fp32_strict", "fp32", False),
        ("bf16", "bf16", True),
        ("fp16", "fp16", True),
    ):
        torch.backends.cudnn.allow_tf32 = tf32
        got = Embedder(state, Layer.POOL5, Pool.AVG, Precision(precision), 64).embed(crops)
        result[f"cosine_{name}"] = _cosine(got, reference)
    torch.backends.cudnn.allow_tf32 = True
    decoder = Embedder(state, device_decode=TRANSFORM).decoder
    assert decoder is not None
    fetched = fetch_batch(_rows(files), TRANSFORM)
    on_device, errors = decoder(fetched["data"], fetched["kind"], fetched["orientation"])
    difference = np.abs(on_device.cpu().numpy().astype(int) - crops.astype(int))
    result["device_decode_vs_pillow"] = {
        "max_grey_levels": int(difference.max()),
        "mean_grey_levels": float(difference.mean()),
        "share_over_2": float((difference > 2).mean()),
        "errors": int((errors != "").sum()),
    }
    return result


def extract_runs(files: list[Path], weights: Path, work: Path, a: object, args: argparse.Namespace) -> dict:
    """(b): `raytl extract` over every photo, --decode cpu and gpu, with nvidia-smi sampling."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    if CUDA and not NvidiaGPUAcceleratorManager.get_current_node_num_accelerators():
        raise RuntimeError("torch sees a GPU but Ray does not (its NVML query found none): Ray runs on CPU")
    runs = {}
    for decode in ("cpu", "gpu"):
        output = _fresh(work / f"embeddings-{decode}")
        command = [
            "extract",
            str(work / "photos"),
            str(output),
            "--weights",
            str(weights),
            "--decode",
            decode,
        ]
        runs[decode] = raytl(command)
    ceiling = a["best"]["on_device_images_per_second"] if isinstance(a, dict) else None
    for run in runs.values():
        run["b_over_a"] = round(run["images_per_second"] / ceiling, 3) if ceiling else None
    runs["cpu_vs_gpu_decode_cosine"] = _compare(work / "embeddings-cpu", work / "embeddings-gpu")
    return runs


def training_runs(files: list[Path], work: Path, args: argparse.Namespace) -> dict:
    """(e): a linear probe trained by a GPU worker, predictions from images on the GPU and on the CPU, and
    a short fine-tune (bf16 autocast, NCCL)."""
    manifest = _manifest(work / "subset.csv", files[: args.subset])
    few = _manifest(work / "predict.csv", files[: args.subset // 8])  # the CPU's share: VGG16 on its cores
    device = "cuda" if CUDA else "cpu"
    probe, tuned = _fresh(work / "probe"), _fresh(work / "finetune")
    result = {
        "train": raytl(
            [
                "train",
                str(work / "embeddings-gpu"),
                str(probe),
                "--device",
                device,
                *"--workers 1 --epochs 20".split(),
            ]
        )
    }
    result["train"]["model_dir"] = sorted(p.name for p in probe.iterdir())
    predictions = {}
    for where in ("cuda" if CUDA else "auto", "cpu"):  # the dry run compares auto (its CPU) with cpu
        output = _fresh(work / f"predict-{where}")
        result[f"predict_{where}"] = raytl(
            ["predict", "--manifest", str(few), str(probe), str(output), "--device", where]
        )
        labels = _read(output, ("path", "predicted_label"))
        predictions[where] = dict(zip(labels["path"], labels["predicted_label"], strict=True))
    first, second = predictions.values()
    result["predict_labels_agree"] = float(np.mean([first[k] == second[k] for k in second]))
    precision = "bf16" if CUDA else "fp32"
    result["finetune"] = raytl(
        [
            "finetune",
            "--manifest",
            str(manifest),
            str(tuned),
            "--device",
            device,
            "--weights",
            str(work / "vgg16-features.pt"),
            "--precision",
            precision,
            *"--epochs 2 --workers 1 --batch-size 64".split(),
        ]
    )
    result["finetune"]["model_dir"] = sorted(p.name for p in tuned.iterdir())
    return result


def raytl(command: list[str], timeout: float = 240) -> dict:
    """One `raytl` command in its own process (its own local Ray, as a user runs it), GPU sampled meanwhile;
    its JSON result line, wall time and nvidia-smi's utilisation. A command that hangs (e.g. a GPU that Ray
    does not see, asked for with --device cuda) is killed after `timeout` seconds and counts as failed."""
    log("raytl " + " ".join(command))
    with GpuSampler() as gpu:
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "raytl", *command], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:  # its local Ray may hold the GPU: stopped before the next step
            subprocess.run(
                [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True
            )
            raise
        wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"raytl {command[0]} exited {done.returncode}: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": round(wall, 1), "gpu_utilisation": gpu.summary()}


class GpuSampler:
    """nvidia-smi's utilisation.gpu and memory.used every 0.2 s while a command runs (None without one)."""

    def __enter__(self) -> GpuSampler:
        self.lines: list[str] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            self.process = subprocess.Popen([*query, "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait()
            self.thread.join(5)

    def summary(self) -> dict | None:
        samples = [[float(v) for v in line.split(",")] for line in self.lines if line.count(",") == 1]
        if not samples:
            return None
        busy, memory = np.array(samples).T
        active = busy[busy > 0]
        return {
            "samples": len(busy),
            "mean_percent": round(float(busy.mean()), 1),
            "mean_percent_while_busy": round(float(active.mean()), 1) if len(active) else 0.0,
            "p90_percent": float(np.percentile(busy, 90)),
            "max_memory_mib": float(memory.max()),
        }


def _compare(left: Path, right: Path) -> dict:
    a, b = _read(left, ("path", "embedding")), _read(right, ("path", "embedding"))
    other = dict(zip(b["path"], b["embedding"], strict=True))
    return {
        "rows": len(a["path"]),
        **_cosine(np.stack(a["embedding"]), np.stack([other[p] for p in a["path"]])),
    }


def _cosine(x: np.ndarray, y: np.ndarray) -> dict:
    """Row-wise cosine similarity of two (N, D) arrays: its minimum and mean."""
    cosine = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def _read(directory: Path, columns: tuple[str, ...]) -> dict:
    import pyarrow.parquet as pq

    parts = sorted(p for p in directory.glob("part-*") if p.suffix == ".parquet")
    table = pq.ParquetDataset([str(p) for p in parts]).read(columns=list(columns))
    return {c: table[c].to_pylist() for c in columns}


def _manifest(path: Path, files: list[Path]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *((str(p), p.parent.name) for p in files)])
    return path


def _rows(files: list[Path]) -> dict[str, np.ndarray]:
    return {"path": np.array([str(f) for f in files]), "label": np.array([f.parent.name for f in files])}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def _short(value: object) -> object:
    return {k: v for k, v in value.items() if k != "traceback"} if isinstance(value, dict) else value


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
