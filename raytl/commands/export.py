"""`raytl export`: a trained model (a probe or a fine-tuned network) as one file that classifies images with
plain PyTorch, raytl not installed.

The file is torch.export's ExportedProgram (`.pt2`), loaded with `torch.export.load(OUT).module()`.
TorchScript, the older format, is deprecated in the torch raytl locks (its own warning says to use
torch.export); a `.pt2` holds the graph and the weights in one zip, loads in Python without the model's
code, and is what `torch.onnx.export` and AOTInductor (C++ serving) take as input. Inside it, as
`raytl.json`, are the class names, what the scores mean, the preprocessing and the embeddings' metadata.
"""

from __future__ import annotations

from typing import Any

from raytl.config import ExportConfig
from raytl.errors import StorageError
from raytl.files import storage
from raytl.modeling import portable
from raytl.modeling.classifier import Model


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
    data, info = portable.export(model, config.model_dir, config.weights)
    storage.write_bytes(config.output, data)
    return {
        "model_dir": storage.redact(config.model_dir),
        "output": storage.redact(config.output),
        "bytes": len(data),  # written (torch.export.save leaves the buffer's position at 0)
        "classes": model.classes,
        "input": info["input"],
        "scores": info["scores"],
    }
