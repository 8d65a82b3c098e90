"""The MLflow model that `train` and `finetune` log in their run (and register with --mlflow-register):
MLflow's pyfunc flavour over the program that `raytl export` writes.

Why pyfunc over the exported program rather than MLflow's pytorch flavour: the pytorch flavour pickles the
torch module (raytl's classes, bound to the torch that saved them) and is called with tensors; the exported
program is graph and weights in one file that plain torch loads (a probe's backbone weights included, which
its MODEL_DIR only names), and the pyfunc around it takes what a registry's users send: image files. Its
predict prepares them as `raytl predict` does (raytl's Predictor), so the model's requirements name raytl.

    model = mlflow.pyfunc.load_model("models:/NAME/1")   # or runs:/RUN_ID/model
    model.predict(pandas.DataFrame({"image": [open("cat.jpg", "rb").read()]}))   # -> label, score
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema

from raytl.modeling.predictor import Predictor
from raytl.version import VERSION

TORCH = ("torch", "torchvision")  # pinned in the model's requirements, as installed here
# The model is code, not a pickle: MLflow copies this file into it and runs it on loading (set_model).
CODE = os.path.join(os.path.dirname(__file__), "mlflow_code.py")
NAME = "model"
_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # runs:/RUN_ID/model
PROGRAM = "program"  # the artifact: the exported program (.pt2)
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),  # an encoded image file (JPEG, PNG, WebP, ...)
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score")]),
)


class ImageClassifier(PythonModel):
    """Image files in (a DataFrame's `image` column), one label and score each out (`raytl predict`'s
    `predicted_label` and `score`: a probability, or an SVM's margin)."""

    predictor: Predictor

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.from_program(context.artifacts[PROGRAM])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        answers = self.predictor.predict(list(model_input["image"]))
        return pd.DataFrame(
            {"label": [a["label"] for a in answers], "score": [float(a["score"]) for a in answers]}
        )


def log(uri: str | None, run_id: str, program: bytes, register: str | None) -> None:
    """The program as run `run_id`'s MLflow model `model` (signature, an input example, pinned
    requirements); registered as a new version of `register` when given."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.pt2")
        with open(path, "wb") as f:
            f.write(program)
        # The run made active for log_model alone (MLflow puts a logged model in the active run's experiment,
        # not in its source run's); ended as it was found, finished (`Tracker.finish` closes it so too).
        with _use_tracking_uri(uri or mlflow.get_tracking_uri()), _no_progress_bars():
            mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
            try:
                mlflow.pyfunc.log_model(
                    name=NAME, python_model=CODE, artifacts={PROGRAM: path}, signature=SIGNATURE,
                    input_example=pd.DataFrame({"image": [_example_image()]}),
                    pip_requirements=[f"raytl=={VERSION}", *(f"{p}=={version(p)}" for p in TORCH)],
                    registered_model_name=register,
                )  # fmt: skip
            finally:
                mlflow.end_run()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for each artifact it reads back (unless told not to)."""
    saved = os.environ.get(_BARS)
    os.environ[_BARS] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_BARS, None)
        else:
            os.environ[_BARS] = saved


def _example_image() -> bytes:
    """A small PNG, the model's input example (MLflow runs the model on it when logging)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
