"""MLflow's models-from-code file of the BFN pyfunc: MLflow copies it into every logged model and runs it
at load (``mlflow.pyfunc.load_model``), so the model is rebuilt from code, never unpickled. The project
imports it nowhere; the class is ``pipeline.evaluation.pyfunc.BFNSampler``."""

from mlflow.models import set_model

from pipeline.evaluation.pyfunc import BFNSampler

set_model(BFNSampler())
