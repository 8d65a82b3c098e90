"""`raytl export`: a trained model (a probe or a fine-tuned network) as one file that classifies images with
plain PyTorch, raytl not installed.

The file is torch.export's ExportedProgram (`.pt2`), loaded with `torch.export.load(OUT).module()`.
TorchScript, the older format, is deprecated in the torch raytl locks (its own warning says to use
torch.export); a `.pt2` holds the graph and the weights in one zip, loads in Python without the model's
code, and is what `torch.onnx.export` and AOTInductor (C++ serving) take as input. Inside it, as
`raytl.json`, are the class names, what the scores mean, the preprocessing and the embeddings' metadata.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from raytl.config import ExportConfig
from raytl.errors import StorageError
from raytl.files import storage
from raytl.modeling import portable
from raytl.modeling.classifier import Model
from raytl.version import VERSION

INFO_FILE = "raytl.json"  # the extra file inside OUT


def run(config: ExportConfig) -> dict[str, Any]:
    """Export MODEL_DIR's model to OUT; returns the summary."""
    model = Model.load(config.model_dir)
    portable.check_linear(model, config.model_dir, "export")
    fs, path = storage.filesystem(config.output)
    if not config.overwrite and fs.exists(path):
        raise StorageError(
            f"OUT {storage.redact(config.output)} exists; pass --overwrite to replace it or choose another "
            "OUT."
        )
    network = portable.build(model, config.model_dir, config.weights)
    size = network.image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes={"images": {0: batch}})
    info = describe(model, config.model_dir)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={INFO_FILE: json.dumps(info, indent=2)})
    data = buffer.getvalue()
    storage.write_bytes(config.output, data)
    return {
        "model_dir": storage.redact(config.model_dir),
        "output": storage.redact(config.output),
        "bytes": len(data),  # written (torch.export.save leaves the buffer's position at 0)
        "classes": model.classes,
        "input": info["input"],
        "scores": info["scores"],
    }


def describe(model: Model, model_dir: str) -> dict[str, Any]:
    """OUT's raytl.json: what goes in, what comes out, and how the images must be prepared."""
    backbone = model.backbone
    size, resize, interpolation = backbone.image_size, backbone.resize, backbone.interpolation
    return {
        "format": "raytl-export/1",
        "raytl": VERSION,
        "torch": torch.__version__,
        "input": f"uint8 RGB crops, shape (N, {size}, {size}, 3), prepared as `preprocessing` says",
        "scores": "SVM margins" if model.info.svm else "softmax probabilities",
        "classes": model.classes,
        "preprocessing": {
            "steps": [
                "EXIF orientation applied, converted to RGB",
                f"shorter side resized to {resize} px ({interpolation}, antialiased)",
                f"centre crop of {size} x {size} px",
            ],
            "resize": resize,
            "crop": size,
            "interpolation": interpolation,
            # inside the program: pixels / 255, then these per channel
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        },
        "precision": "fp32",
        "model": {k: v for k, v in model.info.to_json(model.classes).items() if k != "backbone"},
        "backbone": model.info.recorded_backbone,  # as recorded (checked into `model.backbone`)
        "model_dir": storage.redact(model_dir),
    }
