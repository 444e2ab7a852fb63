"""A tracking server that stops answering mid-command. MLflow retries each request for minutes
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, its backoff) and then raises; a search makes a request per
epoch and per trial event, and its clean-up makes more, so without this a server that went down
cost minutes of retries per epoch (`http(s)://` and other remote stores: `is_local_store`). After
the first request MLflow gave up on, every call raises TrackingLost at once and the command ends in
one line, resumable as after a kill."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from tune_cells.errors import TrackingLost
from tune_cells.redact import without_credentials

# What MLflow's REST layer says when the server never answered (not an error the server returned)
UNREACHABLE = ("Max retries exceeded", "timeout exception", "Connection aborted", "Connection refused")


def is_unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MlflowException) and text.startswith("API request to") and any(
        sign in text for sign in UNREACHABLE)


class LostServerGuard:
    """An MlflowClient (`client`) for a tracking server at `uri` whose calls raise TrackingLost
    once MLflow has given up on one request."""

    def __init__(self, client, uri: str):
        self._client, self._uri, self._lost = client, without_credentials(uri), ""

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self._lost:
                raise TrackingLost(self._lost)
            try:
                return attribute(*args, **kwargs)
            except MlflowException as exc:
                if not is_unreachable(exc):
                    raise
                text = str(exc)
                reason = ("connection refused" if "Connection refused" in text else "timed out" if "timeout" in text
                          else "no answer after MLflow's retries")
                self._lost = (f"the tracking server at {self._uri} stopped answering ({reason}); nothing more "
                              "was recorded and nothing was promoted by this command: once the server answers "
                              "again, run the command again (a search: the same command with --resume)")
                raise TrackingLost(self._lost) from exc

        return call
