"""The MLflow pyfunc flavour of a tune-cells model (logged as models-from-code: nothing pickled).

No `from __future__ import annotations` here: MLflow reads `predict`'s type hints at class creation.
"""

import mlflow.pyfunc
import pandas as pd

from tune_cells.model_io import ImageClassifier

INPUT_COLUMNS = ("path", "image")  # a local file path, or base64-encoded PNG/JPEG/TIFF bytes


class TuneCellsModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.classifier = ImageClassifier.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = next((c for c in INPUT_COLUMNS if c in frame.columns and frame[c].notna().any()), None)
        if column is None:
            raise ValueError(f"input needs a column named one of {', '.join(INPUT_COLUMNS)}")
        decode = self.classifier.decode_path if column == "path" else self.classifier.decode_base64
        return self.classifier.predict_table([decode(value) for value in frame[column]])
