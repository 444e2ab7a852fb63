"""`tune-cells serve`: MLflow's scoring app (/ping, /health, /version, /invocations) for one
registered model, in one uvicorn process (predictions run in its threads).

The model is rebuilt from its checkpoint (JSON spec and state_dict) by the project's own loader;
no file of the artifact store is executed, and a model whose stored code file is not this
package's is refused. Around MLflow's app: a Host-header check (a web page cannot reach a
loopback server by DNS rebinding), a Content-Type check, a request-size limit read before any
parsing, and every error answer as JSON {"error_code", "message"} with a one-line message, never
a stack trace.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextvars import ContextVar
from http import HTTPStatus
from pathlib import Path

from tune_cells.errors import UserInputError
from tune_cells.listening import WILDCARD_BINDS, allowed_host_keys, header_host, host_key
from tune_cells.tracking import MODEL_CODE_FILE, Tracker
from tune_cells.tracking_registry import load_registered_predictor

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 << 20  # a request body, e.g. MAX_ROWS_PER_REQUEST base64 images of ~0.7 MB each
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Error codes of MLflow's scoring server by HTTP status, for error answers that came without one.
ERROR_CODES = {404: "ENDPOINT_NOT_FOUND", 504: "DEADLINE_EXCEEDED"}
MAX_EXCEPTION_TEXT = 200  # characters of a parser's exception message quoted to the client

# Per request: whether the model's predict was reached. An exception escaping MLflow's app before
# that came from reading the body (the client's fault, 400); after it, from the server (500).
_REQUEST_STAGE: ContextVar[dict] = ContextVar("tune_cells_request_stage")


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
        stage = _REQUEST_STAGE.get(None)
        if stage is not None:
            stage["predicting"] = True
        return self.python_model.predict(None, data, params)


def answered_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Host headers the server answers, as host_key spells them: loopback names, the bind address,
    and `extra` (--allowed-host; exit 2 for one that is no host name or address)."""
    named = [] if bind_host in WILDCARD_BINDS else [host_key(bind_host) or bind_host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *named, *allowed_host_keys(extra)]))


def build_app(model, hosts: list[str]):
    """MLflow's scoring app for `model`, behind the Host check, the Content-Type check and the size
    limit, all inside OneLineErrors (so their refusals are JSON too)."""
    from mlflow.pyfunc import scoring_server

    app = RequireContentType(RequestSizeLimit(scoring_server.init(model), MAX_REQUEST_BYTES))
    return OneLineErrors(HostCheck(app, hosts))


def run_server(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, workers=1, server_header=False, timeout_graceful_shutdown=10)


class HostCheck:
    """ASGI middleware: 400 for a Host header not naming one of `hosts` (DNS rebinding). Not
    starlette's TrustedHostMiddleware: it compares names as typed ([0:0::1] is not [::1], a FQDN's
    trailing dot counts); this is the rule the dashboard applies too (listening.header_host)."""

    def __init__(self, app, hosts: list[str]):
        self.app = app
        self.hosts = set(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if header_host(header) not in self.hosts:
                body = b"Invalid host header"
                await send({"type": "http.response.start", "status": 400, "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
        return await self.app(scope, receive, send)


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


class RequireContentType:
    """ASGI middleware: a POST to /invocations without a Content-Type gets 415 (MLflow's parser
    would fail on the missing header with an internal error)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/invocations":
            if not dict(scope.get("headers", [])).get(b"content-type", b"").strip():
                message = "no Content-Type header: send application/json, text/csv or application/vnd.apache.parquet"
                return await _send_json(send, 415, {"error_code": "BAD_REQUEST", "message": message})
        await self.app(scope, receive, send)


class OneLineErrors:
    """ASGI middleware: every error answer is JSON {"error_code", "message"} with a one-line
    message (MLflow's own keep their status and code; plain-text ones, e.g. the Host check's or
    the timeout's, are wrapped). An exception escaping the app is answered here: 400 when it came
    from reading the body (a JSON nested too deeply, a too long integer), else 500; its stack
    trace goes to the server log, never to the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, chunks, started = None, [], False
        stage = {"predicting": False}
        token = _REQUEST_STAGE.set(stage)  # the app's tasks and threads copy this context: the same dict

        async def hold_errors(message):
            nonlocal held, started
            if message["type"] == "http.response.start":
                if message["status"] >= 400:  # held until the app is done: it may still raise
                    held = message
                    return
                started = True
            if held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                return
            await send(message)

        try:
            await self.app(scope, receive, hold_errors)
        except Exception as exc:
            if started:  # an answer is under way: nothing left to mend
                raise
            status, message = escaped_error(exc, scope, stage["predicting"])
            return await _send_json(send, status, {"error_code": error_code(status), "message": message})
        finally:
            _REQUEST_STAGE.reset(token)
        if held is not None:
            body = one_line_error(held["status"], b"".join(chunks))
            kept = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
            headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def escaped_error(exc: Exception, scope, predicting: bool) -> tuple[int, str]:
    """Status and one-line message for an exception MLflow's app did not answer (it was logged
    nowhere yet: logged here)."""
    if scope["path"] == "/invocations" and not predicting:
        text = str(exc).splitlines()[0].partition("; ")[0][:MAX_EXCEPTION_TEXT] if str(exc).strip() else ""
        log.warning("request body not readable: %s: %s", type(exc).__name__, text)
        return 400, f"the request body could not be read ({type(exc).__name__}{': ' + text if text else ''})"
    log.error("request failed", exc_info=exc)
    return 500, f"internal server error ({type(exc).__name__}); the server log has the details"


def error_code(status: int) -> str:
    return ERROR_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


def one_line_error(status: int, body: bytes) -> bytes:
    """An error answer's body as JSON {"error_code", "message"}, the message one line and without
    a stack trace (that goes to the server log).

    MLflow's scoring server prefixes a prediction error with the request's whole input
    ("Failed to predict data '<frame>'. \\nError: <message>"): only the message is kept. FastAPI's
    own errors ({"detail": ...}) and plain text (the Host check, MLflow's 415 and 504) become the
    message, with the error code of the status.
    """
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    code = error_code(status)
    if isinstance(error, dict) and "message" in error:
        if error.get("stack_trace"):  # an exception MLflow did not expect, in parsing or predicting
            log.error("request failed: %s\n%s", error["message"], error["stack_trace"])
        message = str(error["message"]).rpartition("\nError: ")[2]
        code = str(error.get("error_code") or code)
    elif isinstance(error, dict) and isinstance(error.get("detail"), str):
        message = error["detail"]
    else:
        message = body.decode(errors="replace")
    message = message.strip().splitlines()[0].strip() if message.strip() else ""
    return json.dumps({"error_code": code, "message": message or _phrase(status)}).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


async def _send_json(send, status: int, document: dict) -> None:
    body = json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
