"""`raytl serve`: a trained model as an HTTP classifier on Ray Serve (optional: `raytl[serve]`).

POST an image to the route as the request's body (JPEG, PNG, ... as `raytl predict` reads them), as a
multipart form's `file` field (`curl -F file=@cat.jpg`, what browsers and `requests` send) or as base64 in
JSON (`{"image": "..."}`; `{"images": [...]}` for a batch, answered `{"predictions": [...]}`, a failed
image's entry being `{"error": ...}`); the answer is JSON `{"label": ..., "score": ..., "scores": {class:
score, ...}}`, `score` as in predict's output (logistic regression and fine-tuned heads: the probability;
SVM: the margin), `?top_k=K` keeping the K best classes in `scores`. A FastAPI ingress: OpenAPI at
`/docs` and `/openapi.json` under the route. Each replica decodes and crops the uploads (EXIF
orientation, RGB, resize, centre crop: extract's preprocessing) and scores them in batches
(`@serve.batch`) with the model's backbone and head in fp32 (`modeling.portable`, what `raytl export`
saves). A bad upload gets a 4xx and one JSON sentence, `{"error": ...}`; the replica goes on serving.

Started by `raytl serve MODEL_DIR` (or `raytl.serve(...)`), or by Ray Serve's own tools through the
application builder `app`: `serve run raytl.commands.serve:app model_dir=s3://bucket/models/probe`,
the repository's `serve.yaml` (`serve deploy`) or `k8s/rayservice.yaml` (KubeRay).
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the route methods' signatures
# outside this module, where FastAPI could not resolve string annotations (a `Request` became a query field).
import asyncio
import base64
import binascii
import email.parser
import email.policy
import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.responses import JSONResponse

from raytl.cluster import session
from raytl.config import Device, ServeConfig
from raytl.files import storage

log = logging.getLogger(__name__)

_DEPLOYMENT = "Classifier"


api = FastAPI(
    title="raytl classifier",
    description="POST an image (the body, a multipart `file` field or base64 JSON): its label and scores.",
)


class _PrefixItself:
    """A request to the route prefix itself (`/classify`, not `/classify/`) reaches the `/` routes: Serve
    mounts the app under its prefix, and Starlette would answer it with a 307 to the slashed path (which
    curl without -L, and a POST through most clients, do not follow)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] and scope["path"] == scope.get("root_path"):
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


api.add_middleware(_PrefixItself)

_POST = "POST an image's bytes (JPEG, PNG, ...) as the request body."
_JSON = 'a JSON upload is {"image": BASE64} or {"images": [BASE64, ...]}'


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 (a bad query parameter) as one sentence, like every other refusal here."""
    where = ".".join(str(part) for part in exc.errors()[0]["loc"][1:]) or "the request"
    value = request.query_params.get(where)
    return JSONResponse({"error": f"{where} must be a positive integer, not {value!r}."}, status_code=422)


def json_images(body: bytes) -> tuple[list[bytes], bool]:
    """A JSON upload -> (the images' bytes, whether it was a batch); ValueError names what is wrong."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"the upload is not JSON: {_JSON}") from None
    if not isinstance(value, dict) or ("image" in value) == ("images" in value):
        raise ValueError(_JSON)
    batch = "images" in value
    encoded = value["images"] if batch else [value["image"]]
    if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
        raise ValueError(_JSON)
    try:
        return [base64.b64decode(e, validate=True) for e in encoded], batch
    except (binascii.Error, ValueError):
        raise ValueError("an image in the JSON upload is not valid base64") from None


def form_file(body: bytes, content_type: str) -> bytes:
    """A multipart/form-data upload's `file` field (else its only field) -> its bytes (parsed by the
    standard library's MIME parser from the body already read within --max-upload-mb)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    parts = list(message.iter_parts()) if message.is_multipart() else []
    named = {p.get_param("name", header="content-disposition"): p for p in parts}
    part = named.get("file") or (parts[0] if len(parts) == 1 else None)
    if part is None:
        raise ValueError("a multipart upload needs the image in a field named `file`")
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


async def read_upload(request: Any, max_bytes: int) -> bytes | None:
    """A request's body, read chunk by chunk until it passes max_bytes (None then, the rest unread): a
    chunked upload declares no length, and reading it whole first would let one request fill the replica."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@serve.ingress(api)
class Classifier:
    """A replica: the model on this replica's device, batched scoring, one JSON answer per upload."""

    def __init__(self, config: ServeConfig, device: Device = Device.AUTO) -> None:
        from raytl.modeling.predictor import Predictor

        self.predictor = Predictor.load(config, device)  # application: cpu unless Ray gave the replica a GPU
        self.transform = self.predictor.transform  # the crop as the model's embeddings were made
        self.max_bytes = int(config.max_upload_mb * 1024**2)
        self.max_upload_mb = config.max_upload_mb
        # Ray's stubs type a @serve.batch method as a plain coroutine function, without its setters.
        self.scores.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self.scores.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)  # type: ignore[attr-defined]

    @api.post("/", summary="Classify an image")
    async def classify(
        self, request: Request, top_k: int | None = Query(None, ge=1, description="keep the K best scores")
    ) -> JSONResponse:
        status, answer = await self.answer(request, top_k)
        return JSONResponse(answer, status_code=status)

    @api.api_route("/", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def not_a_post(self) -> JSONResponse:
        return JSONResponse({"error": _POST}, status_code=405)

    async def answer(self, request: Any, top_k: int | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return 413, {"error": self._too_large(int(declared))}
        body = await read_upload(request, self.max_bytes)
        if body is None:  # chunked (no Content-Length) and past the limit: the rest is never read
            return 413, {"error": self._too_large(self.max_bytes + 1, over=True)}
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if kind == "application/json":
                images, batch = json_images(body)
            elif kind == "multipart/form-data":
                images, batch = [form_file(body, request.headers["content-type"])], False
            else:
                images, batch = [body], False
        except ValueError as exc:
            return 400, {"error": f"{exc}."}
        answers = await asyncio.gather(*(self.one(data, top_k) for data in images))
        if batch:
            return 200, {"predictions": [answer for _, answer in answers]}
        return answers[0]

    async def one(self, data: bytes, top_k: int | None) -> tuple[int, dict[str, Any]]:
        """(status, answer) for one image's bytes."""
        from raytl.errors import ImageError

        if not data:
            return 400, {"error": "the upload is empty: POST the image's bytes as the request body."}
        try:
            crop = await asyncio.to_thread(self.transform, data)
        except ImageError as exc:
            return 415, {"error": f"the upload is not a usable image: {exc}."}
        except Exception as exc:  # a decoder bug on a hostile upload must not take the replica down
            return 415, {"error": f"the upload could not be decoded: {type(exc).__name__}: {exc}."}
        return 200, self.predictor.answer(await self.scores(crop), top_k)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def scores(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """A batch of uint8 crops -> their class scores (off the event loop, which keeps taking uploads)."""
        return list(await asyncio.to_thread(self._forward, np.stack(crops)))

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        return self.predictor.scores(crops)

    def _too_large(self, size: int, over: bool = False) -> str:
        size_text = f"over {size - 1:,}" if over else f"{size:,}"
        return f"the upload is {size_text} bytes, more than --max-upload-mb {self.max_upload_mb:g} allows."


def application(config: ServeConfig, use_gpu: bool) -> Any:
    """The Serve application: the Classifier deployment with its replicas and resources, bound to config."""
    replicas: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": config.replicas[0], "max_replicas": config.replicas[1]}}
        if isinstance(config.replicas, tuple)
        else {"num_replicas": config.replicas}
    )
    deployment = serve.deployment(
        name=_DEPLOYMENT,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1},
        # Enough requests in flight per replica to fill its batches.
        max_ongoing_requests=max(2 * config.max_batch_size, 8),
        **replicas,
    )(Classifier)
    return deployment.bind(config, Device.CUDA if use_gpu else Device.CPU)


def app(args: dict[str, str]) -> Any:
    """Application builder for Ray Serve's CLI and config files: `serve run raytl.commands.serve:app
    model_dir=URI [replicas=2 max_batch_size=32 ...]` (ServeConfig's fields; host and port are Serve's)."""
    config = ServeConfig.create(**args)
    return application(config, _uses_gpu(config.device))


def run(config: ServeConfig) -> dict[str, Any]:
    """Check MODEL_DIR, start Serve's HTTP proxy at host:port and deploy the classifier (returns once it
    is ready; it serves until `ray.serve.delete(name)` or the end of the Ray cluster); returns its URL."""
    from raytl.modeling import portable
    from raytl.modeling.classifier import Model

    portable.check_linear(Model.load(config.model_dir), config.model_dir, "serve")  # before Ray starts
    session.init_ray()
    use_gpu = _uses_gpu(config.device)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(config, use_gpu), name=config.name, route_prefix=config.route_prefix)
    url = f"http://{config.host}:{config.port}{config.route_prefix}"
    log.info("serving %s at %s", storage.redact(config.model_dir), url)
    return {
        "url": url,
        "name": config.name,
        "model_dir": storage.redact(config.model_dir),
        "device": "cuda" if use_gpu else "cpu",
        **{k: v for k, v in asdict(config).items() if k in ("replicas", "max_batch_size")},
    }


def _uses_gpu(device: Device) -> bool:
    import ray

    if device == Device.CUDA:
        return True
    return device == Device.AUTO and ray.cluster_resources().get("GPU", 0) >= 1
