"""Extraction speed side by side: the model alone, `raytl extract` end to end from S3, a hand-written loop.

    python bench/extract.py                      # 224 px, 400 photographs: (a), (b), (c) and the ratios
    python bench/extract.py --memory             # peak memory at 1,000 and 10,000 images (64 px)
    python bench/extract.py --json result.json   # the figures as JSON too

(a) ceiling: raytl's Embedder on ready uint8 tensors, at the chosen precision, in this process.
(b) `raytl extract` (extract.run) from a loopback S3 server (moto, its own process) to Parquet in it,
    timed from the call to the written summary; Ray is started first, as it is on a cluster.
(c) baseline: what a user writes by hand: a torchvision Dataset + DataLoader + fp32 VGG16 loop over
    the same JPEG files on local disk, in one process.
Peak memory is the resident set (RSS) of the driver and of all Ray worker processes, sampled every 0.25 s.
The photographs are crops of scikit-learn's two sample photographs, saved as ~500x375 JPEGs.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageEnhance

from raytl.cluster.embedder import Embedder
from raytl.config import ExtractConfig, Layer, Pool, Precision
from raytl.vision.models import resolve_precision

AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    # Random weights (no download): speed does not depend on their values.
    state = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
    workdir = Path(tempfile.mkdtemp(prefix="raytl-bench-"))
    with S3Server() as endpoint:
        result = memory_run(args, workdir) if args.memory else speed_run(args, state, workdir, endpoint)
    report(result, args.json)


def report(result: dict, json_path: str | None) -> None:
    """The figures with the machine and the command that made them: printed, and written to json_path."""
    result["machine"] = machine()
    result["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400, help="photographs for (b) and (c)")
    parser.add_argument("--ceiling-images", type=int, default=96, help="ready tensors for (a)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument("--batch-size", type=int, default=None, help="raytl's default when not given")
    parser.add_argument("--decode", default="cpu", help="raytl extract --decode (cpu or gpu)")
    parser.add_argument("--compile", action="store_true", help="raytl extract --compile")
    parser.add_argument("--memory", action="store_true", help="measure peak memory at --memory-images")
    parser.add_argument("--memory-images", default="1000,10000")
    parser.add_argument("--memory-size", type=int, default=64)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def speed_run(args: argparse.Namespace, state: dict, workdir: Path, endpoint: str) -> dict:
    """(a), (b), (c) on the same photographs, then the ratios; (b) and (c) must agree on the embeddings."""
    files = write_photos(workdir / "photos", args.images)
    upload(files, workdir / "photos", "photos")
    precision = resolve_precision(Precision(args.precision), DEVICE)
    ceiling = model_alone(state, args, precision)
    log(f"(a) model alone, {precision}: {ceiling['images_per_second']:.2f} img/s")
    torch.save(state, workdir / "weights.pt")
    raytl = raytl_extract(args, f"s3://{BUCKET}/photos", args.image_size, str(workdir / "weights.pt"))
    log(f"(b) raytl extract end to end: {raytl['images_per_second']:.2f} img/s")
    baseline = hand_written(files, state, args.image_size)
    log(f"(c) DataLoader + fp32 VGG16: {baseline['images_per_second']:.2f} img/s")
    agreement = compare(raytl.pop("output"), baseline.pop("embeddings"), files, workdir / "photos")
    return {
        "images": len(files),
        "image_size": args.image_size,
        "a_model_alone": ceiling,
        "b_raytl_extract": raytl,
        "c_dataloader_fp32": baseline,
        "b_over_a": round(raytl["images_per_second"] / ceiling["images_per_second"], 3),
        "b_over_c": round(raytl["images_per_second"] / baseline["images_per_second"], 3),
        "b_vs_c_max_abs_difference": agreement,
    }


def memory_run(args: argparse.Namespace, workdir: Path) -> dict:
    """Peak RSS of driver and workers for extracts of each size, each on a fresh Ray."""
    counts = [int(n) for n in args.memory_images.split(",")]
    files = write_photos(workdir / "photos", max(counts))
    upload(files, workdir / "photos", "photos")
    runs = []
    for count in counts:
        manifest = f"s3://{BUCKET}/manifest-{count}.csv"
        rows = "\n".join(f"photos/{f.relative_to(workdir / 'photos')},{f.parent.name}" for f in files[:count])
        upload_bytes(manifest.split("/", 3)[3], ("path,label\n" + rows + "\n").encode())
        result = raytl_extract(args, None, args.memory_size, "random", manifest=manifest)
        result.pop("output")
        log(f"{count} images: {json.dumps(result)}")
        runs.append({"images": count, **result})
    first, last = runs[0]["peak_rss_mb"], runs[-1]["peak_rss_mb"]
    return {
        "image_size": args.memory_size,
        "runs": runs,
        "peak_ratio_largest_over_smallest": {k: round(last[k] / first[k], 3) for k in first},
    }


def model_alone(state: dict, args: argparse.Namespace, precision: Precision) -> dict:
    """The ceiling: the same Embedder the actors run, fed ready uint8 tensors, after one warm-up batch."""
    batch = args.batch_size or (256 if DEVICE.type == "cuda" else 32)  # raytl's defaults
    embedder = Embedder(state, Layer.POOL5, Pool.AVG, precision, batch, threads=os.cpu_count())
    size = args.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.ceiling_images, size, size, 3), dtype=np.uint8)
    embedder.embed(images[:batch])
    started = time.perf_counter()
    embedder.embed(images)
    wall = time.perf_counter() - started
    return {"precision": str(precision), "batch_size": batch, "images_per_second": len(images) / wall}


def raytl_extract(
    args: argparse.Namespace, source: str | None, size: int, weights: str, manifest: str | None = None
) -> dict:
    """`raytl extract` through extract.run on a fresh local Ray; wall time and peak RSS while it runs."""
    import ray

    from raytl.commands import extract

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {**AWS_ENV, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False  # figures only on stdout
    output = f"s3://{BUCKET}/embeddings-{size}"
    config = ExtractConfig.create(
        source=source or "",
        manifest=manifest,
        output=output,
        weights=weights,
        image_size=size,
        precision=args.precision,
        batch_size=args.batch_size,
        decode=args.decode,
        compile=args.compile,
        overwrite=True,
    )
    with MemorySampler() as memory:
        started = time.perf_counter()
        summary = extract.run(config)
        wall = time.perf_counter() - started
    ray.shutdown()
    return {
        "images_per_second": summary["embedded"] / wall,
        "wall_seconds": round(wall, 1),
        "embedded": summary["embedded"],
        "failed": summary["failed"],
        "pipeline_images_per_second": summary["images_per_second"],  # without listing and weight checks
        "peak_rss_mb": memory.peaks(),
        "output": output,
    }


def hand_written(files: list[Path], state: dict, size: int) -> dict:
    """The baseline a user writes by hand: torchvision transforms, a DataLoader, fp32 VGG16, no_grad."""
    from torchvision import transforms

    class Photos(torch.utils.data.Dataset):
        def __init__(self, paths: list[Path]) -> None:
            self.paths = paths
            self.transform = transforms.Compose(
                [
                    transforms.Resize(round(size * 256 / 224)),
                    transforms.CenterCrop(size),
                    transforms.ToTensor(),
                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                ]
            )

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(self.paths[i]) as image:
                return self.transform(image.convert("RGB"))

    vgg = torchvision.models.vgg16()
    vgg.features.load_state_dict({k[len("features.") :]: v for k, v in state.items()})
    vgg.eval()
    out = []
    started = time.perf_counter()
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(Photos(files), batch_size=32):
            out.append(vgg.features(x).mean((2, 3)))
    wall = time.perf_counter() - started
    return {
        "images_per_second": len(files) / wall,
        "wall_seconds": round(wall, 1),
        "embeddings": torch.cat(out).numpy(),
    }


def compare(output: str, expected: np.ndarray, files: list[Path], root: Path) -> float:
    """Largest |raytl - baseline| over all images, matched by path: both compute the same embeddings."""
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    parts = [p for p in fs.ls(output.removeprefix("s3://")) if p.rsplit("/", 1)[-1].startswith("part-")]
    table = pq.ParquetDataset(parts, filesystem=fs).read()
    got = dict(
        zip(
            table["path"].to_pylist(),
            np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
            strict=True,
        )
    )
    rows = [got[f"s3://{BUCKET}/photos/{f.relative_to(root)}"] for f in files]
    return float(np.abs(np.stack(rows) - expected).max())


def write_photos(root: Path, count: int, workers: int = 1) -> list[Path]:
    """~500x375 JPEGs (a quarter of them portrait): jittered crops of scikit-learn's two photographs. Photo
    i is drawn from its own seed, so the files are the same whatever `workers` (processes) write them."""
    bounds = np.linspace(0, count, max(1, min(workers, count)) + 1).astype(int)
    ranges = [(root, int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    if len(ranges) == 1:
        files = _write_range(*ranges[0])
    else:
        with ProcessPoolExecutor(len(ranges)) as pool:
            files = [f for part in pool.map(_write_range, *zip(*ranges, strict=True)) for f in part]
    log(f"wrote {count} JPEG photographs, {sum(f.stat().st_size for f in files) / count / 1024:.0f} KiB each")
    return files


def _write_range(root: Path, start: int, stop: int) -> list[Path]:
    from sklearn.datasets import load_sample_images

    sources = load_sample_images()
    files = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        label = i % 2
        photo = Image.fromarray(sources.images[label])
        portrait = rng.random() < 0.25
        w, h = (375, 500) if portrait else (500, 375)
        scale = rng.uniform(0.5, 1.0) * min(photo.width / w, photo.height / h)
        cw, ch = int(w * scale), int(h * scale)
        left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        image = photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        path = root / sources.filenames[label].rsplit("/", 1)[-1].split(".")[0] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        files.append(path)
    return files


def upload(files: list[Path], root: Path, prefix: str) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: upload_bytes(f"{prefix}/{f.relative_to(root)}", f.read_bytes()), files))


def upload_bytes(key: str, data: bytes) -> None:
    import boto3

    client = getattr(_clients, "s3", None) or boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    _clients.s3 = client
    client.put_object(Bucket=BUCKET, Key=key, Body=io.BytesIO(data))


_clients = threading.local()


class S3Server:
    """moto's S3 server in its own process (its stored objects must not count as the driver's memory)."""

    def __enter__(self) -> str:
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
                return endpoint
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("moto's S3 server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait()


class MemorySampler:
    """Peak RSS (MiB) of this process and of all Ray worker processes (`ray::…`), sampled in a thread."""

    def __enter__(self) -> MemorySampler:
        self.peak = {"driver": 0.0, "workers": 0.0, "total": 0.0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def peaks(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.peak.items()}

    def _sample(self) -> None:
        # Light enough not to slow a 2-core run: /proc is rescanned for new workers once a second.
        pids: list[int] = []
        for tick in itertools.count():
            if self.stop.wait(0.25):
                return
            pids = _ray_workers() if tick % 4 == 0 else pids
            driver = _rss(os.getpid())
            workers = sum(_rss(pid) for pid in pids)
            for key, value in (("driver", driver), ("workers", workers), ("total", driver + workers)):
                self.peak[key] = max(self.peak[key], value)


def _ray_workers() -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "cmdline").read_bytes().startswith(b"ray::"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _rss(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
