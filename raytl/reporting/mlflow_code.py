"""The code of the MLflow model that train and finetune log ("models from code": MLflow copies this file into
the model and runs it when the model is loaded, so the model holds no pickle; reporting/mlflow_model.py)."""

from mlflow.models import set_model

from raytl.reporting.mlflow_model import ImageClassifier

set_model(ImageClassifier())
