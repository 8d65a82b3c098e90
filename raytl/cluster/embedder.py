"""The model stage: an actor-pool callable that turns uint8 image batches into embeddings, the actor pool
that runs it (extract's, predict's and raytl.embed's), and raytl.embed's stages for a user's Ray Dataset."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from raytl.config import Device, Layer, Pool, Precision
from raytl.errors import ImageError
from raytl.files import writer
from raytl.files.writer import PRECISION
from raytl.vision.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16,
    from_state_dict,
    model_device,
    prefers_channels_last,
    preset,
    resolve_precision,
)
from raytl.vision.preprocess import Transform

if TYPE_CHECKING:
    from raytl.vision.jpeg import DeviceDecoder

_AUTOCAST_DTYPE = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
# Host memory one model actor reserves: VGG16 trunk, activations of a batch, Ray's buffers. Besides
# telling the scheduler, it keeps Ray from fusing the decode tasks into the model actor.
ACTOR_MEMORY = 3 * 1024**3


class Embedder:
    """Built where it runs: loads the backbone onto this actor's device; `__call__(batch) -> pyarrow.Table`.

    Runs without Ray too (pass the state_dict itself), so the GPU stage can be benchmarked on its own.
    """

    def __init__(
        self,
        state_dict: Any,
        layer: Layer = Layer.POOL5,
        pool: Pool = Pool.AVG,
        precision: Precision = Precision.AUTO,
        batch_size: int = 32,
        threads: int | None = None,
        device_decode: Transform | None = None,
        compile: bool = False,
        model: str = VGG16,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        device: Device = Device.AUTO,
    ) -> None:
        if not isinstance(state_dict, dict):  # an ObjectRef: every actor fetches the same validated tensors
            import ray

            state_dict = ray.get(state_dict)
        self.device = model_device(Device(device))  # on_actors: cpu unless Ray gave the actor a GPU
        if self.device.type == "cpu" and threads:
            # Ray sets OMP_NUM_THREADS from the actor's num_cpus; the model may use more cores than
            # the actor reserves, because decoding tasks are short and interleave.
            torch.set_num_threads(min(threads, os.cpu_count() or threads))
        self.precision = resolve_precision(Precision(precision), self.device)
        # channels_last: oneDNN / cuDNN's fast convolution layout for convnets at every precision (VGG16 in
        # fp32 on 2 AVX2 cores: 4.9 img/s against 3.2 at 224 px; results differ from NCHW by float rounding,
        # ~1e-7). Transformers run their inputs contiguous.
        network = from_state_dict(model, state_dict, layer, pool).to(self.device)
        self.channels_last = prefers_channels_last(network)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.model: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(network, dynamic=False) if compile else network
        )
        self.compiled = compile
        # --decode gpu: rows arrive as JPEG bytes (preprocess.fetch_batch) and are decoded on this device.
        self.decoder: DeviceDecoder | None = None
        if device_decode:  # --decode gpu; torchvision's decoder, imported only then
            from raytl.vision.jpeg import DeviceDecoder

            self.decoder = DeviceDecoder(device_decode, self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Rows (path, label, image or data, error) -> (path, label, embedding, error); failed rows: null."""
        if self.decoder is None:
            ok = batch["error"] == ""
            vectors = self.embed(batch["image"][ok])
        else:
            images, errors = self.decoder(batch["data"], batch["kind"], batch["orientation"])
            batch["error"] = np.where(batch["error"] == "", errors, batch["error"])
            ok = batch["error"] == ""
            vectors = self.embed(images[torch.from_numpy(ok).to(self.device)])
        dim = vectors.shape[1]
        values = np.zeros((len(ok), dim), dtype=np.float32)
        values[ok] = vectors
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(~ok))
        return pa.table(
            {
                "path": pa.array(batch["path"], pa.string()),
                "label": _labels(batch["label"]),
                "embedding": embedding,
                "error": pa.array(batch["error"], pa.string()),
                # what --precision auto became on this actor's device: the part writer records it
                PRECISION: pa.repeat(pa.scalar(str(self.precision)), len(ok)),
            }
        )

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3), in host memory or on the device -> float32 (N, D), in chunks of batch_size."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            chunks.append(self._forward(images[start : start + self.batch_size]))
        if not chunks:
            return np.zeros((0, self._dim(images)), dtype=np.float32)
        return np.concatenate(chunks)

    def _forward(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Ray hands read-only arrays; torch only reads them
                x = torch.from_numpy(images)
        else:
            x = images
        if x.device.type != self.device.type:
            x = x.pin_memory().to(self.device, non_blocking=True)
        rows = len(x)
        if self.compiled and rows < self.batch_size:
            # torch.compile(dynamic=False) compiles once per batch shape: a short batch (a block's last,
            # one without its failed rows) would compile again (a minute on a GPU). Zeros pad it.
            x = torch.cat([x, x.new_zeros((self.batch_size - rows, *x.shape[1:]))])
        # NHWC uint8 viewed as NCHW is already channels_last: no copy until the float conversion.
        x = x.permute(0, 3, 1, 2).float()
        x = x if self.channels_last else x.contiguous()
        # The same operations, in the same order, as torchvision's ConvertImageDtype + Normalize.
        x = x.div_(255).sub_(self.mean).div_(self.std)
        with self._autocast():
            y = self.model(x)
        return y[:rows].float().cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPE[self.precision])

    def _dim(self, images: np.ndarray | torch.Tensor) -> int:
        probe = np.zeros((1, *tuple(images.shape[1:])), dtype=np.uint8)
        return self._forward(probe).shape[1]


def _labels(labels: np.ndarray) -> pa.Array:
    # The pipeline carries "no label" as "" (Ray turns None in object columns into NaN).
    return pa.array([None if v is None or v == "" or v != v else str(v) for v in labels], pa.string())


@dataclass(frozen=True)
class Resources:
    """What the model stage may use, read from the cluster once at start-up."""

    gpus: int  # up now
    cpus: int
    use_gpu: bool  # --device: cuda asks for GPUs even when none is up (an autoscaler adds GPU nodes)

    @classmethod
    def of_cluster(cls, device: Device = Device.AUTO) -> Resources:
        import ray

        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0))
        use_gpu = device == Device.CUDA or (device == Device.AUTO and gpus > 0)
        return cls(gpus=gpus, cpus=max(1, int(total.get("CPU", 1))), use_gpu=use_gpu)


def actor_pool(num_actors: int | tuple[int, int] | None, resources: Resources) -> Any:
    """--num-actors as Ray Data's pool: N actors, or MIN-MAX growing while there is work and room. By
    default one actor per GPU up at start, growing with the GPUs an autoscaler adds; one on CPU clusters
    (its torch uses the node's cores)."""
    import ray.data

    if isinstance(num_actors, tuple):
        return ray.data.ActorPoolStrategy(min_size=num_actors[0], max_size=num_actors[1])
    if num_actors:
        return ray.data.ActorPoolStrategy(size=num_actors)
    if resources.use_gpu:
        return ray.data.ActorPoolStrategy(min_size=max(1, resources.gpus), max_size=None)
    return ray.data.ActorPoolStrategy(size=1)


# A model actor that dies before it is ready (its node lost while it starts, as a spot GPU node can be)
# counts as an actor that died during initialisation, and Ray Data's default allowance for those is none:
# the whole run fails. The weights are checked on the driver before any actor starts, so an actor's
# __init__ does not fail for them, and replacing a few costs nothing.
_ACTOR_INIT_DEATHS = 3


def on_actors(
    rows: Any,
    embedder: type[Embedder],
    weights_ref: Any,
    options: Any,
    resources: Resources,
    device_decode: Transform | None = None,
    **extra: Any,
) -> Any:
    """rows.map_batches(embedder) on the model actor pool (`actor_pool`). `options`: pipeline.Stages or
    an EmbedConfig (model, layer, pool, precision, batch_size, num_actors, compile); `extra`: more of the
    embedder's constructor arguments."""
    # The run executes with the context its first Dataset copied (and every Dataset made from it shares):
    # setting DataContext.get_current() now would not reach it.
    context = rows.context
    if 0 <= context.max_consecutive_actor_init_deaths < _ACTOR_INIT_DEATHS:  # -1 is no limit
        context.max_consecutive_actor_init_deaths = _ACTOR_INIT_DEATHS
    pool = actor_pool(options.num_actors, resources)
    gpu = resources.use_gpu
    batch_size = options.batch_size or (256 if gpu else 32)
    return rows.map_batches(
        embedder,
        fn_constructor_kwargs={
            "state_dict": weights_ref,
            "layer": options.layer,
            "pool": options.pool,
            "precision": options.precision,
            "batch_size": batch_size,
            # On CPU-only clusters each actor's torch uses its share of the cores.
            "threads": None if gpu else max(1, resources.cpus // pool.min_size),
            "device_decode": device_decode,
            "compile": options.compile,
            "model": options.model,
            "mean": preset(options.model).mean,
            "std": preset(options.model).std,
            "device": Device.CUDA if gpu else Device.CPU,  # as num_gpus says
            **extra,
        },
        compute=pool,
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=1 if gpu else 0,
        num_cpus=1,
        memory=ACTOR_MEMORY,
    )


# raytl.embed: a user's Ray Dataset in, the same rows with `embedding` (and `error`) out.
IMAGE, ERROR = "__raytl_image", "error"


def crops(batch: dict[str, np.ndarray], column: str, transform: Transform) -> dict[str, np.ndarray]:
    """CPU tasks: the image column's cells -> uint8 crops (extract's preprocessing); a cell that is not a
    usable image gets its reason in `error` (and a black crop, which is never embedded)."""
    values = batch.pop(column)
    size = transform.image_size
    images = np.zeros((len(values), size, size, 3), dtype=np.uint8)
    errors = [""] * len(values)
    for i, value in enumerate(values):
        try:
            images[i] = transform.of_value(value)
        except ImageError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # a decoder bug on a hostile cell must not end the run
            errors[i] = f"cannot decode: {type(exc).__name__}: {exc}"
    return {**batch, IMAGE: images, ERROR: np.array(errors, dtype=object)}


class DatasetEmbedder(Embedder):
    """The model actor for raytl.embed: every column but the images kept, `embedding` (extract's
    fixed_size_list<float32>[D], NaN for a row whose image could not be used, whose `error` says why)
    added, and extract's `raytl` schema metadata, with the precision this actor ran at."""

    def __init__(self, *args: Any, metadata: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metadata = writer.schema_metadata(writer.ran_at(metadata, self.precision))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:  # type: ignore[override]
        from ray.data.block import BlockAccessor

        images = batch.pop(IMAGE)
        ok = batch[ERROR] == ""
        vectors = self.embed(images[ok])
        dim = vectors.shape[1]
        values = np.full((len(ok), dim), np.nan, dtype=np.float32)
        values[ok] = vectors
        table = BlockAccessor.batch_to_arrow_block(batch)  # the dataset's columns, as Ray Data makes them
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        return table.append_column("embedding", embedding).replace_schema_metadata(self.metadata)


def embed_dataset(dataset: Any, config: Any) -> Any:
    """raytl.embed: `dataset` (any Ray Dataset with an image column) -> a lazy Dataset of its rows with
    `embedding` and `error`; the weights are loaded (and checked) here, once, and shared with the actors."""
    import ray

    from raytl.vision.models import embedding_dim, load_weights, resolved

    config = resolved(config)
    weights = load_weights(config.weights, config.layer, config.seed, config.model)
    found = preset(config.model, config.weights)
    transform = Transform(config.image_size, config.resize, config.max_pixels, found.interpolation)
    rows = dataset.map_batches(
        crops,
        fn_kwargs={"column": config.column, "transform": transform},
        batch_size=32,
        batch_format="numpy",
        num_cpus=1,
    )
    from raytl.cluster.pipeline import Stages, embeddings_metadata

    dim = embedding_dim(config.layer, config.pool, config.image_size, config.model)
    metadata = embeddings_metadata(Stages.of(config, decode_batch=32), weights.id, dim)
    resources = Resources.of_cluster(config.device)
    return on_actors(rows, DatasetEmbedder, ray.put(weights.state_dict), config, resources, metadata=metadata)
