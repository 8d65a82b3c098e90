"""`raytl serve` throughput and latency: the same uploads sent at once to a replica that batches them
(--max-batch-size) and to one that scores them one at a time (--max-batch-size 1).

    python bench/serve.py                        # 224 px, 96 uploads, 16 at a time, batches of 16 vs 1
    python bench/serve.py --image-size 64 --requests 400 --concurrency 32

The model: a probe (scikit-learn backend) on `raytl extract` embeddings of generated JPEGs (~500x375),
VGG16 pool5 with seeded random weights (the speed is the same as with ImageNet's). One replica, on this
machine's CPU or GPU, on a local Ray. Printed per configuration: uploads/s, and the latency of an upload
(median and 95th percentile) as a client sees it, over loopback HTTP.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

import raytl


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (375 // 25, 500 // 25, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(workdir: str, image_size: int) -> str:
    for label in ("a", "b"):
        os.makedirs(os.path.join(workdir, "images", label), exist_ok=True)
        for i in range(12):
            seed = i if label == "a" else 1000 + i
            with open(os.path.join(workdir, "images", label, f"{i}.jpg"), "wb") as f:
                f.write(_jpeg(seed))
    embeddings, model = os.path.join(workdir, "emb"), os.path.join(workdir, "model")
    raytl.extract(os.path.join(workdir, "images"), embeddings, weights="random", image_size=image_size)
    raytl.train(embeddings, model, backend="sklearn")
    return model


def _send(url: str, data: bytes) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - started


def _measure(model: str, uploads: list[bytes], batch: int, concurrency: int) -> dict:
    from ray import serve

    summary = raytl.serve(model, port=_free_port(), max_batch_size=batch, name=f"bench-{batch}")
    _send(summary["url"], uploads[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(lambda data: _send(summary["url"], data), uploads))
    wall = time.perf_counter() - started
    serve.shutdown()
    return {
        "max_batch_size": batch,
        "uploads_per_s": round(len(uploads) / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "device": summary["device"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = _model(workdir, args.image_size)
        uploads = [_jpeg(5000 + i) for i in range(args.requests)]
        for batch in (args.batch, 1):
            print(
                json.dumps(
                    {"image_size": args.image_size, **_measure(model, uploads, batch, args.concurrency)}
                )
            )


if __name__ == "__main__":
    main()
