"""What the pipeline itself costs per image: raytl extract against its own two stages, run alone.

    python bench/pipeline.py                       # 600 photographs (~500x375), 24 camera photos (12 MP)
    python bench/pipeline.py --images 3000 --json pipeline.json

On the same files and the same cores, in one run:
(d) the bare decoder: raytl's own Transform (Pillow decode, EXIF orientation, RGB, resize, centre crop),
    one process per core, files read from local disk, no Ray: images/s;
(m) the model alone on ready uint8 crops: raytl's Embedder in this process, torch on every core: images/s;
    c = 1 / (1/d + 1/m), the rate of the two stages one after the other on these cores;
(p) `raytl extract` end to end (Ray started first, as on a cluster), from local disk and from a loopback S3
    server (moto, its own process): images/s from the call to the written summary; p/c, p/d; the time to
    the first embedded batch (from the call); CPU-seconds per image by process kind (from /proc, sampled
    every 0.5 s: decode tasks, model actors, writer, driver, Ray's own processes, the S3 server), and the
    CPU-seconds per image spent outside decoding and the model; the same from the first batch on (the
    pipeline at work, start-up left out) and the rate then.
Then the client CPU per S3 GET of raytl's reader (boto3 from threads), s3fs's cat (raytl's reader until
2026-12-07), pyarrow's S3FileSystem and boto3, same objects.
The model is a near-free backbone: mobilenet_v3_small, random weights, 64 px crops of 64 px resizes, fp32.
Then --decode draft on the camera photos: the bare decoder's rate exact and draft, and the cosine of
VGG16 pool5 embeddings (224 px; --weights, random by default) of the two decodes. Last, the bare decoder
at 224 px (256 px resize) on the photographs, and the cores that decoding plus the pipeline's own work
would need at 10,000 images/s, per kind of photo and decoder (cores_at_10000_per_second).
The photographs are crops of scikit-learn's two sample photographs (bench/extract.py's), the camera
photos the same crops scaled up to 4032x3024 (smoother than a real camera's: draft's cosine is optimistic).
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from extract import BUCKET, S3Server, log, report, upload, write_photos
from PIL import Image

from raytl.cluster.embedder import Embedder
from raytl.config import Layer, Precision
from raytl.vision.models import load_weights
from raytl.vision.preprocess import Transform

MODEL = {"model": "mobilenet_v3_small", "image_size": 64, "resize_size": 64, "precision": "fp32"}


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="raytl-pipeline-"))
    cores = args.cores or os.cpu_count() or 1
    files = write_photos(workdir / "photos", args.images, workers=cores)
    small = Transform(MODEL["image_size"], MODEL["resize_size"])
    result: dict = {"images": len(files), "cores": cores, "model": MODEL}
    result["d"] = decoder_rate(files, small, cores)
    result["m"] = model_rate(cores, args.model_images)
    result["c"] = round(1 / (1 / result["d"] + 1 / result["m"]), 1)
    log(f"d {result['d']} images/s, m {result['m']} images/s, c {result['c']} images/s")
    with S3Server() as endpoint:
        upload(files, workdir / "photos", "photos")

        for where, source in (("local", str(workdir / "photos")), ("s3", f"s3://{BUCKET}/photos")):
            run = extract_run(source, f"{workdir}/out-{where}", len(files), endpoint, cores)
            run["p/c"], run["p/d"] = round(run["p"] / result["c"], 3), round(run["p"] / result["d"], 3)
            outside = run["cpu_seconds_per_image"]["total"] - cores / result["d"] - cores / result["m"]
            run["cpu_ms_per_image_outside_decode_and_model"] = round(1000 * outside, 2)
            result[f"p_{where}"] = run
            log(f"p ({where}) {run['p']} images/s: p/c {run['p/c']}, p/d {run['p/d']}")
        result["s3_client_cpu_ms_per_get"] = s3_clients(files[:1024], workdir / "photos", endpoint)
    if args.camera_photos:  # --camera-photos 0: no --decode draft figures
        result["draft"] = draft_run(workdir / "camera", args.camera_photos, cores, args.weights)
    result["d_224"] = decoder_rate(files, Transform(), cores)  # 256 px resize, 224 px crop: a GPU run's
    result["cores_at_10000_per_second"] = extrapolated(result, cores)
    report(result, args.json)


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--images", type=int, default=600, help="~500x375 photographs for d, p")
    parser.add_argument("--model-images", type=int, default=2048, help="ready crops for m")
    parser.add_argument("--camera-photos", type=int, default=24, help="12-MP photos for --decode draft")
    parser.add_argument("--cores", type=int, default=None, help="default: all of this machine's")
    parser.add_argument("--weights", default="random", help="VGG16 weights for draft's cosine")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


# --- d: the bare decoder, one process per core ---------------------------------------------------------


def _decode_files(paths: list[str], transform: Transform) -> int:
    for path in paths:
        transform(Path(path).read_bytes())
    return len(paths)


def decoder_rate(files: list[Path], transform: Transform, cores: int) -> float:
    chunks = [[str(f) for f in files[i::cores]] for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode_files, [c[:4] for c in chunks], [transform] * cores))  # processes started
        start = time.perf_counter()
        done = sum(pool.map(_decode_files, chunks, [transform] * cores))
        return round(done / (time.perf_counter() - start), 1)


# --- m: the model alone on ready crops ---------------------------------------------------------------


def model_rate(cores: int, count: int) -> float:
    torch.set_num_threads(cores)
    weights = load_weights("random", Layer.POOL5, model=MODEL["model"])
    embedder = Embedder(weights.state_dict, precision=Precision.FP32, batch_size=32, model=MODEL["model"])
    crops = np.random.default_rng(0).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    embedder.embed(crops[:64])  # warm
    start = time.perf_counter()
    embedder.embed(crops)
    return round(count / (time.perf_counter() - start), 1)


# --- p: raytl extract end to end, with the CPU each kind of process spends ------------------------------


def extract_run(source: str, output: str, count: int, endpoint: str, cores: int) -> dict:
    """One `raytl.extract` on a Ray of `cores` CPUs started (and warm) before the clock starts. Every worker
    runs a setup hook that records when the first batch left a model actor (a runtime_env: workers then
    start through Ray's runtime-env agent, as any job with one does)."""
    import ray
    from ray.data import DataContext

    import raytl

    first = Path(output + ".first")
    ray.init(
        num_cpus=cores,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"worker_process_setup_hook": _first_batch_hook(str(first))},
    )
    DataContext.get_current().enable_progress_bars = False
    ray.get(ray.remote(num_cpus=0)(lambda: None).remote())
    with CpuSampler(endpoint, first) as cpu:
        start = time.time()
        summary = raytl.extract(source, output, weights="random", **MODEL)
        wall = time.time() - start
    ray.shutdown()
    first_batch = float(first.read_text()) - start if first.exists() else None
    assert summary["embedded"] == count, summary
    per_image = {kind: round(seconds / count, 5) for kind, seconds in cpu.by_kind().items()}
    rest = count - 32  # roughly: the images after the first batch (a model actor's batch on CPU)
    working = {kind: round(seconds / rest, 5) for kind, seconds in cpu.after_first_batch().items()}
    return {
        "p": round(count / wall, 1),
        "wall_seconds": round(wall, 2),
        "first_batch_seconds": round(first_batch, 2) if first_batch is not None else None,
        "cpu_seconds_per_image": per_image,
        "cpu_seconds_per_image_after_the_first_batch": working,
        "p_after_the_first_batch": round(rest / (wall - first_batch), 1) if first_batch else None,
        "cpu_seconds_by_title": {t: round(c, 2) for t, c in cpu.titles.most_common(12)},
    }


def _first_batch_hook(path: str):  # noqa: ANN202 (a closure pickled into Ray's workers)
    """A worker setup hook: once raytl.cluster.embedder is imported (by a model actor, never before: the
    hook must not add torch's import to every worker), Embedder.__call__ notes the time of its first
    batch in `path`."""

    def hook() -> None:
        import importlib.abc
        import importlib.util

        class Patch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, import_path, target=None):  # noqa: ANN001, ANN202
                if name != "raytl.cluster.embedder":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                run_module = spec.loader.exec_module

                def exec_module(module) -> None:  # noqa: ANN001
                    run_module(module)
                    call = module.Embedder.__call__

                    def timed(self, batch):  # noqa: ANN001, ANN202
                        out = call(self, batch)
                        if not os.path.exists(path):
                            Path(path).write_text(repr(time.time()))
                        return out

                    module.Embedder.__call__ = timed

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, Patch())

    return hook


KINDS = (
    ("decode tasks", ("decode_batch", "fetch_batch", "read_shards")),
    ("model actors", ("Embedder",)),
    ("writer", ("write_part", "Write")),
    ("listing", ("ReadRange", "FromArrow", "Repartition", "from_arrow")),
)


class CpuSampler:
    """CPU-seconds of every process on the machine while the block runs, by kind: its Ray task or actor
    (the process title Ray sets while it runs one), this driver, Ray's own processes, the S3 server."""

    def __init__(self, endpoint: str, first: Path) -> None:
        self.port = endpoint.rsplit(":", 1)[1]
        self.first = first  # once it exists (the first batch embedded), the CPU so far is noted apart
        self.at_first: collections.Counter[str] | None = None
        self.seconds: collections.Counter[str] = collections.Counter()
        self.titles: collections.Counter[str] = collections.Counter()  # the same CPU by process title
        self.last: dict[int, float] = {}
        self.stop = threading.Event()

    def __enter__(self) -> CpuSampler:
        self._sample(count=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample(count=True)

    def by_kind(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        return {**dict(self.seconds.most_common()), "total": total}

    def after_first_batch(self) -> dict[str, float]:
        """CPU-seconds by kind from the first embedded batch on: the pipeline at work, without start-up."""
        later = self.seconds - (self.at_first or collections.Counter())
        return {**dict(later.most_common()), "total": sum(later.values())}

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample(count=True)
            if self.at_first is None and self.first.exists():
                self.at_first = collections.Counter(self.seconds)

    def _sample(self, count: bool) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                title = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            cpu = (int(stat[11]) + int(stat[12])) / tick
            if count:
                kind = self._kind(pid, title)
                if kind:
                    self.seconds[kind] += cpu - self.last.get(pid, 0.0)
                    self.titles[title.split(" ")[0][:60]] += cpu - self.last.get(pid, 0.0)
            self.last[pid] = cpu

    def _kind(self, pid: int, title: str) -> str | None:
        if pid == os.getpid():
            return "driver"
        if "moto.server" in title and self.port in title:
            return "S3 server"
        if title.startswith("ray::"):
            for kind, names in KINDS:
                if any(name in title for name in names):
                    return kind
            return "ray: idle workers and own actors"
        if "/ray/" in title or "raylet" in title or "gcs_server" in title:
            return "ray: raylet, GCS, agents"
        return None


def s3_clients(files: list[Path], root: Path, endpoint: str) -> dict:
    """Client CPU (this process's) per GET of the same objects, 128 at a time: raytl's fetch_many, s3fs's cat
    (on aiobotocore), pyarrow's C++ S3FileSystem (a HEAD and a GET an object) and boto3 (32 threads each)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import pyarrow.fs

    from raytl.files import storage

    keys = [f"{BUCKET}/photos/{f.relative_to(root)}" for f in files]
    arrow = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="bench", secret_key="bench", region="us-east-1"
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    threads = ThreadPoolExecutor(32)

    def arrow_get(key: str) -> bytes:
        with arrow.open_input_file(key) as f:
            return f.read()

    def boto_get(key: str) -> bytes:
        bucket, name = key.split("/", 1)
        return client.get_object(Bucket=bucket, Key=name)["Body"].read()

    readers = {
        "raytl": lambda batch: storage.fetch_many(["s3://" + k for k in batch]),
        "s3fs": lambda batch: list(fs.cat(["s3://" + k for k in batch]).values()),
        "pyarrow": lambda batch: list(threads.map(arrow_get, batch)),
        "boto3": lambda batch: list(threads.map(boto_get, batch)),
    }
    out = {}
    for name, read in readers.items():
        read(keys[:8])  # connections and clients made
        cpu = time.process_time()
        for start in range(0, len(keys), 128):
            read(keys[start : start + 128])
        out[name] = round(1000 * (time.process_time() - cpu) / len(keys), 2)
    log(f"S3 client CPU per GET (ms): {out}")
    return out


def extrapolated(result: dict, cores: int) -> dict:
    """Cores that decoding and the pipeline's own work need to feed 10,000 images/s (at 224 px): the bare
    decoder's CPU per image, plus what p spent per image, once at work (after its first batch), outside
    decoding and the model (measured at 64 px: 224 px crops move 12x the bytes through Ray's object
    store, so this is a floor)."""
    spent = result["p_local"]["cpu_seconds_per_image_after_the_first_batch"]
    own = spent["total"] - spent.get("decode tasks", 0) - spent.get("model actors", 0)
    decode = {"500x375, --decode cpu": cores / result["d_224"]}
    if "draft" in result:
        decode["12 MP, --decode cpu"] = cores / result["draft"]["exact_images_per_second"]
        decode["12 MP, --decode draft"] = cores / result["draft"]["draft_images_per_second"]
    return {
        "pipeline_cpu_ms_per_image": round(1000 * own, 2),
        **{name: round(10_000 * (seconds + own)) for name, seconds in decode.items()},
    }


# --- --decode draft on camera photos ---------------------------------------------------------------------


def camera_photos(root: Path, count: int) -> list[Path]:
    from sklearn.datasets import load_sample_images

    sources = load_sample_images().images
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        rng = np.random.default_rng(i)
        photo = Image.fromarray(sources[i % 2])
        w, h = int(photo.width * rng.uniform(0.6, 0.9)), int(photo.height * rng.uniform(0.6, 0.9))
        left, top = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
        size = (3024, 4032) if i % 4 == 3 else (4032, 3024)
        image = photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
        path = root / f"{i:04d}.jpg"
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        path.write_bytes(out.getvalue())
        files.append(path)
    return files


def draft_run(root: Path, count: int, cores: int, weights: str) -> dict:
    files = camera_photos(root, count)
    exact_rate = decoder_rate(files, Transform(), cores)
    draft_rate = decoder_rate(files, Transform(draft=True), cores)
    state = load_weights(weights, Layer.POOL5).state_dict
    embedder = Embedder(state, precision=Precision.FP32, batch_size=8)
    data = [f.read_bytes() for f in files]
    exact = embedder.embed(np.stack([Transform()(d) for d in data]))
    draft = embedder.embed(np.stack([Transform(draft=True)(d) for d in data]))
    cosine = (exact * draft).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(draft, axis=1)
    log(f"draft {draft_rate} vs exact {exact_rate} images/s on 12-MP photos; cosine min {cosine.min():.4f}")
    return {
        "photos": count,
        "size": "4032x3024",
        "exact_images_per_second": exact_rate,
        "draft_images_per_second": draft_rate,
        "speedup": round(draft_rate / exact_rate, 2),
        "weights": weights,
        "cosine_min": round(float(cosine.min()), 4),
        "cosine_mean": round(float(cosine.mean()), 4),
    }


if __name__ == "__main__":
    main()
