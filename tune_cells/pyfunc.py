"""The MLflow pyfunc flavour of a tune-cells model (logged as models-from-code: nothing pickled).

No `from __future__ import annotations` here: MLflow reads `predict`'s type hints at class creation.
"""

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tune_cells.kinds import load_predictor

INPUT_COLUMNS = ("path", "image")  # a local file path, or base64-encoded PNG/JPEG/TIFF bytes


class TuneCellsModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        # `classifier`: an ImageClassifier, or an ImageSegmenter (pixel counts per target) for segmentation.
        self.classifier = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = next((c for c in INPUT_COLUMNS if c in frame.columns and frame[c].notna().any()), None)
        if column is None:
            raise _bad_input(f"input needs a column named one of {', '.join(INPUT_COLUMNS)}")
        decode = self.classifier.decode_path if column == "path" else self.classifier.decode_base64
        images = []
        for row, value in enumerate(frame[column]):
            try:
                images.append(decode(value))
            except (OSError, ValueError, TypeError, SyntaxError) as exc:  # PIL raises all of these
                raise _bad_input(f"row {row} ({column}): not a decodable image ({type(exc).__name__})") from None
        return self.classifier.predict_table(images)


def _bad_input(message: str) -> MlflowException:
    """MLflow's scoring server answers an INVALID_PARAMETER_VALUE with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
