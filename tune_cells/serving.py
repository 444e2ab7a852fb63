"""`tune-cells serve`: MLflow's scoring app (/ping, /health, /version, /invocations) for one
registered model, in one uvicorn process (predictions run in its threads).

The model is rebuilt from its checkpoint (JSON spec and state_dict) by the project's own loader;
no file of the artifact store is executed, and a model whose stored code file is not this
package's is refused. Around MLflow's app: a Host-header check (a web page cannot reach a
loopback server by DNS rebinding), a request-size limit read before any parsing, and error
answers cut to one line, never with a stack trace.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.tracking import MODEL_CODE_FILE, Tracker
from tune_cells.tracking_registry import load_registered_predictor

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 << 20  # a request body, e.g. MAX_ROWS_PER_REQUEST base64 images of ~0.7 MB each
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # addresses, not names a client would send as Host


def load_served_model(tracker: Tracker, model_uri: str, path_root: Path | None):
    """The registered model as an MLflow PyFuncModel for the scoring app (`serving=True`: rows
    capped, `path` rows only under `path_root`, off when it is None)."""
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel

    from tune_cells.kinds import get_kind
    from tune_cells.pyfunc import TuneCellsModel

    with tempfile.TemporaryDirectory(prefix="tune-cells-serve-") as folder:
        model_dir = tracker.download_model(model_uri, Path(folder))
        check_model_code(model_dir, model_uri)
        predictor = load_registered_predictor(model_dir, model_uri)
    spec = predictor.spec
    python_model = TuneCellsModel(predictor, serving=True, path_root=path_root)
    # The signature MLflow enforces on requests, as log_model stored it: the kind's, from the spec.
    metadata = Model(signature=get_kind(spec.kind).signature(spec.classes))
    return PyFuncModel(model_meta=metadata, model_impl=_PyfuncInterface(python_model))


def check_model_code(model_dir: Path, model_uri: str) -> None:
    """Refuse a model whose stored models-from-code file is not this package's: someone changed
    the artifact store, or a different tune-cells logged it (MLflow would run that file)."""
    stored = model_dir / MODEL_CODE_FILE.name
    if not stored.is_file() or stored.read_bytes() != MODEL_CODE_FILE.read_bytes():
        raise UserInputError(f"{model_uri}: its stored {MODEL_CODE_FILE.name} is missing or differs from this "
                             "tune-cells' own (changed in the artifact store?); not serving it")


class _PyfuncInterface:
    """What PyFuncModel calls on a model: `predict(data, params)` (MLflow's loader wraps a
    PythonModel the same way)."""

    def __init__(self, python_model):
        self.python_model = python_model

    def predict(self, data, params=None):
        return self.python_model.predict(None, data, params)


def answered_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Host headers the server answers: loopback names, the bind address, and `extra`."""
    host = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
    named = [] if bind_host in WILDCARD_BINDS else [host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *named, *extra]))


def build_app(model, hosts: list[str]):
    """MLflow's scoring app for `model`, behind the Host check, the size limit and one-line errors."""
    from mlflow.pyfunc import scoring_server
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = scoring_server.init(model)
    return TrustedHostMiddleware(RequestSizeLimit(OneLineErrors(app), MAX_REQUEST_BYTES), allowed_hosts=hosts)


def run_server(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, workers=1, server_header=False, timeout_graceful_shutdown=10)


class RequestSizeLimit:
    """ASGI middleware: a body over `max_bytes` (declared, or counted while it arrives) gets 413
    before anything parses it; a body within it is passed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        message = f"request body over {self.max_bytes >> 20} MiB: send fewer or smaller images per request"
        await _send_json(send, 413, {"error_code": "BAD_REQUEST", "message": message})


class OneLineErrors:
    """ASGI middleware: a JSON error answer keeps its status and error code and gets a one-line
    message; a stack trace goes to the server log, never to the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, chunks = None, []

        async def send_one_line(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = one_line_error(b"".join(chunks))
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            await send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_one_line)


def one_line_error(body: bytes) -> bytes:
    """An MLflow error body with a one-line message and no stack trace (that goes to the server
    log); other bodies unchanged.

    MLflow's scoring server prefixes a prediction error with the request's whole input
    ("Failed to predict data '<frame>'. \\nError: <message>"): only the message is kept.
    """
    try:
        error = json.loads(body)
    except ValueError:
        return body
    if not isinstance(error, dict) or "message" not in error:
        return body
    if error.get("stack_trace"):  # an exception MLflow did not expect, in parsing or predicting
        log.error("request failed: %s\n%s", error["message"], error["stack_trace"])
    message = str(error["message"]).rpartition("\nError: ")[2].strip()
    message = message.splitlines()[0].strip() if message else "bad request"
    return json.dumps({"error_code": error.get("error_code", "BAD_REQUEST"), "message": message}).encode()


async def _send_json(send, status: int, document: dict) -> None:
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
