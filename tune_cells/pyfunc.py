"""The MLflow pyfunc flavour of a tune-cells model (logged as models-from-code: nothing pickled).

Every failure inside `predict` is an MlflowException with a one-line message naming the row and
the reason, never a stack trace: MLflow's scoring server answers INVALID_PARAMETER_VALUE with 400.

Serving (a network client sends the rows) differs from Python use: at most MAX_ROWS_PER_REQUEST
rows and MAX_PIXELS_PER_REQUEST pixels (read from every row's header before any is decoded),
`path` rows only under the root the server was given (tune_cells.path_access), off without one,
and no row is decoded after the server's request timeout (its client got 504: the work would be
lost, and would hold a core and delay Ctrl-C). `tune-cells serve` builds this model with `serving=True`;
a process MLflow marks as its scoring server (`mlflow models serve`) counts as serving too.

No `from __future__ import annotations` here: MLflow reads `predict`'s type hints at class creation.
"""

import logging
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from tune_cells.data.images import DECODE_ERRORS, MAX_IMAGE_PIXELS, ImageRefused, open_image
from tune_cells.kinds import load_predictor
from tune_cells.model_io import base64_image_file
from tune_cells.path_access import PathRefused, open_under_root

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("path", "image")  # a file path on the server, or base64-encoded PNG/JPEG/TIFF/BMP bytes
MAX_ROWS_PER_REQUEST = 64  # a served request; Python callers may pass any number
# All the images of a served request, from their headers: 64 of 10 MP (lung fields are 1.4 MP), or
# 16 of the largest one decoded (MAX_IMAGE_PIXELS); more would take minutes of one core to decode.
MAX_PIXELS_PER_REQUEST = 16 * MAX_IMAGE_PIXELS
# Decoded pixels predicted at once: all of a classifier's small images, one large segmentation image.
DECODED_BYTES_PER_BATCH = 64 << 20
MLFLOW_SERVING_FLAG = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set by MLflow's scoring server in its process


class TuneCellsModel(mlflow.pyfunc.PythonModel):
    def __init__(self, classifier=None, serving: bool = False, path_root: Path | None = None):
        # `classifier`: an ImageClassifier, or an ImageSegmenter (pixel counts per target) for segmentation.
        self.classifier = classifier
        self.serving = serving
        self.path_root = path_root  # resolved (tune_cells.path_access.allowed_root); None: no confinement

    def load_context(self, context):
        self.classifier = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = next((c for c in INPUT_COLUMNS if c in frame.columns and frame[c].notna().any()), None)
        if column is None:
            raise _bad_input(f"input needs a column named one of {', '.join(INPUT_COLUMNS)}")
        serving = self.serving or os.environ.get(MLFLOW_SERVING_FLAG, "").lower() == "true"
        if serving and len(frame) > MAX_ROWS_PER_REQUEST:
            raise _bad_input(f"{len(frame)} rows: at most {MAX_ROWS_PER_REQUEST} per request")
        if serving and column == "path" and self.path_root is None:
            raise _bad_input("the path column is off on this server: send the image column (base64 image bytes)")
        deadline = time.monotonic() + MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() if serving else None
        with ExitStack() as files:
            if serving:  # every row's header read first: a request over the pixel budget decodes nothing
                values, decode = self._open_within_budget(frame[column], column, files), self.classifier.decode_file
            else:
                values, decode = list(frame[column]), lambda value: self._decode_value(column, value)
            tables, batch, batch_bytes = [], [], 0
            for row, value in enumerate(values):
                _check_deadline(deadline, row, len(values))
                with _row_errors(row, column):
                    batch.append(decode(value))
                batch_bytes += batch[-1].nbytes
                if batch_bytes >= DECODED_BYTES_PER_BATCH:
                    tables.append(self._predict_batch(batch))
                    batch, batch_bytes = [], 0
        if batch or not tables:
            _check_deadline(deadline, len(values), len(values))
            tables.append(self._predict_batch(batch))
        return tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=True)

    def _decode_value(self, column: str, value):
        if column == "image":
            return self.classifier.decode_base64(value)
        if self.path_root is not None:
            with open_under_root(value, self.path_root) as file:
                return self.classifier.decode_file(file)
        return self.classifier.decode_path(value)

    def _open_within_budget(self, values, column: str, files: ExitStack) -> list:
        """Each row's image bytes as an open file (closed by `files`) whose header was read: its
        format and size checked, and all sizes together within MAX_PIXELS_PER_REQUEST."""
        opened, total = [], 0
        for row, value in enumerate(values):
            with _row_errors(row, column):
                file = base64_image_file(value) if column == "image" else open_under_root(value, self.path_root)
                opened.append(files.enter_context(file))
                with open_image(file) as image:  # the header only; a file object stays open
                    total += image.width * image.height
                file.seek(0)
            if total > MAX_PIXELS_PER_REQUEST:
                raise _bad_input(f"row {row} ({column}): the request's images pass {MAX_PIXELS_PER_REQUEST / 1e6:.0f} "
                                 "megapixels in all, the limit per request: send fewer per request")
        return opened

    def _predict_batch(self, images: list) -> pd.DataFrame:
        try:
            return self.classifier.predict_table(images)
        except Exception as exc:  # decoded images that the network fails on: the server's fault, not the row's
            log.exception("prediction of %d decoded images failed", len(images))
            raise MlflowException(f"prediction failed ({type(exc).__name__}); the server log has the details",
                                  error_code=INTERNAL_ERROR) from None


@contextmanager
def _row_errors(row: int, column: str):
    """Any failure to open or decode a row as one line naming the row (a 400)."""
    try:
        yield
    except (PathRefused, ImageRefused) as exc:
        raise _bad_input(f"row {row} ({column}): {exc}") from None
    except DECODE_ERRORS as exc:  # Pillow raises all of these
        raise _bad_input(f"row {row} ({column}): not a decodable image ({type(exc).__name__})") from None
    except Exception as exc:  # anything else (MemoryError...) is still this row's, and one line
        raise _bad_input(f"row {row} ({column}): cannot be decoded ({type(exc).__name__})") from None


def _check_deadline(deadline: float | None, decoded: int, rows: int) -> None:
    """Stop a served request that ran past the server's timeout: its client already got 504."""
    if deadline is not None and time.monotonic() > deadline:
        timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        message = (f"stopped after decoding {decoded} of {rows} rows: the request ran past the server's "
                   f"{timeout}-second timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)")
        log.warning("%s", message)
        raise MlflowException(message, error_code=DEADLINE_EXCEEDED)


def _bad_input(message: str) -> MlflowException:
    """MLflow's scoring server answers an INVALID_PARAMETER_VALUE with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
