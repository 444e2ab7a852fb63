"""Models-from-code entry point: MLflow runs this file to build the pyfunc when loading a model.

Only `tune_cells.tracking.log_model` refers to it; nothing imports it as a module.
"""

from mlflow.models import set_model

from tune_cells.pyfunc import TuneCellsModel

set_model(TuneCellsModel())
