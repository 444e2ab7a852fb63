"""The preflight of a remote or database MLflow store: refused before Ray starts, not after.

A server must answer `/health` and be MLflow (a REST call returns MLflow's JSON); a database must
have its driver installed; a file store is refused (the model registry needs a database). (A
sqlite file is the preflight's own check: it is a path in a folder.) Credentials in the URI are sent as HTTP basic auth, as MLflow's
client sends them, and never shown: every message names the URI without its password.

The commands that open an existing store also check an existing sqlite file (`check_sqlite_store`)
before MLflow opens it: MLflow would add its tables to any other database, and an empty file.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import ssl
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from tune_cells.errors import UserInputError
from tune_cells.redact import without_credentials

TIMEOUT_S = 10
# An MLflow REST call any tracking server answers with JSON, and a plain web server does not.
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
_PROBE_KEYS = {"experiments", "next_page_token"}
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores besides sqlite
# The pip package that provides a database driver module SQLAlchemy asks for.
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                    "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql"}


def check_store(uri: str, given_as: str = "--tracking-uri") -> None:
    """Nothing is created here. `given_as` names where the URI came from (a flag or a variable)."""
    shown = without_credentials(uri)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme.split("+")[0] in DATABASE_SCHEMES:
        check_database_driver(uri, given_as)
    elif scheme == "file" or (scheme == "" and not uri.startswith("databricks")):
        raise UserInputError(f"{given_as} {shown}: a file store has no model registry, which promotion needs; "
                             "use a database (sqlite:////abs/path/mlflow.db) or a tracking server")
    elif scheme not in tracking_schemes():
        raise UserInputError(f"{given_as} {shown}: MLflow has no tracking store for '{scheme}:' URIs; use a database "
                             "(sqlite:////abs/path/mlflow.db, postgresql://...) or a tracking server (http(s)://...)")


def tracking_schemes() -> set[str]:
    """The URI schemes MLflow opens a tracking store for, a plugin's included (it registers its own)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):  # a private registry: should MLflow move it, its built-in schemes
        return {"", "file", "sqlite", "http", "https", "databricks", "databricks-uc", "uc", *DATABASE_SCHEMES}


def sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:/// URI (None for another scheme)."""
    return Path(uri[len("sqlite:///"):]) if urlparse(uri).scheme == "sqlite" else None


def local_artifact_path(uri: str) -> Path | None:
    """The folder of a local (file: or plain path) artifact location (None for a remote one)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None


# Tables every MLflow sqlite store has (alembic_version: MLflow's schema migrations).
MLFLOW_TABLES = ("experiments", "alembic_version")


def check_sqlite_store(path: Path) -> list[str]:
    """An existing file is an MLflow sqlite store, read without writing: MLflow would otherwise create
    its tables in a user's other database or an empty file, and a damaged file or a folder fails
    deep inside SQLAlchemy (a folder after minutes of retries). Returns the artifact locations of its
    tune-cells experiments, read in the same pass (none where the file is locked)."""
    def refuse(why: str) -> None:
        raise UserInputError(f"{path} is not an MLflow store ({why}): give the store a search wrote "
                             "(--workdir or --tracking-uri)")

    if path.is_dir():
        refuse("a folder")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: MLflow store cannot be read (permission denied)")
    if path.stat().st_size == 0:
        refuse("an empty file")
    try:
        with closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [name for name in MLFLOW_TABLES if name not in tables]
            locations = [] if missing else [row[0] for row in connection.execute(
                "SELECT artifact_location FROM experiments WHERE name LIKE 'tune-cells-%'")]
    except sqlite3.OperationalError:  # locked or mid-rollback: no proof of a wrong file (MLflow waits or says)
        return []
    except sqlite3.DatabaseError:  # "file is not a database"
        refuse("not an SQLite file: damaged, or another kind of file")
    if missing:
        refuse(f"an SQLite database without MLflow's {' and '.join(missing)} table{'s' if len(missing) > 1 else ''}")
    return locations



def check_experiment_active(uri: str, name: str) -> None:
    """The experiment a search logs to is not deleted (the MLflow UI's delete only marks it: its name
    stays taken, and a run cannot start in it). Read without writing; an absent store or experiment
    passes (the search makes them)."""
    path = sqlite_path(uri)
    try:
        if path is not None:
            if not path.is_file():
                return
            with closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as connection:
                found = connection.execute("SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?",
                                           (name,)).fetchone()
        elif uri.startswith(("http://", "https://")):  # a server's REST API reads without writing
            from mlflow.tracking import MlflowClient

            experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
            found = experiment and (experiment.experiment_id, experiment.lifecycle_stage)
        else:  # a database: MLflow's store would create its tables in an empty one; Tracker refuses it later
            return
    except Exception:  # a locked or foreign store is not this check's to judge: MLflow says so later
        return
    if found and found[1] == "deleted":
        raise UserInputError(deleted_experiment(uri, name, found[0]))


def deleted_experiment(uri: str, name: str, experiment_id, otherwise: str = " or give another --experiment") -> str:
    """`otherwise`: what else the command's user can do (evaluate has no --experiment to give)."""
    return (f"experiment {name} is deleted in {without_credentials(uri)} (the MLflow UI's delete keeps it, hidden): "
            f"restore it (MLFLOW_TRACKING_URI='{without_credentials(uri)}' mlflow experiments restore -x "
            f"{experiment_id}){otherwise}")


def artifact_folders_elsewhere(locations: list[str], root: Path) -> list[Path]:
    """Those of the artifact `locations` that are local folders existing outside `root`: a working
    folder copied from elsewhere keeps the original's absolute paths. (A moved one's are gone:
    `tracking_registry.require_local_artifacts` refuses it where artifacts are read.)"""
    folders = [folder for folder in map(local_artifact_path, locations) if folder is not None]
    return [folder for folder in folders if folder.exists() and not folder.resolve().is_relative_to(root.resolve())]


def check_server(uri: str) -> None:
    """`/health` answers, and an MLflow REST call returns MLflow's JSON (a proxy or another web
    server on that port answers /health too, and the search would fail only after Ray started)."""
    base, headers = split_credentials(uri)
    shown = without_credentials(uri)
    try:
        _get(f"{base}/health", headers)
    except urllib.error.HTTPError as exc:
        _refuse_http_error(shown, "/health", exc)
    except Exception as exc:
        raise UserInputError(f"tracking server {shown} does not answer ({getattr(exc, 'reason', exc)})") from None
    try:
        answer = json.loads(_get(f"{base}{MLFLOW_PROBE}", headers))
    except urllib.error.HTTPError as exc:
        _refuse_http_error(shown, MLFLOW_PROBE, exc)
    except (ValueError, UnicodeDecodeError):
        answer = None
    except Exception as exc:
        raise UserInputError(f"tracking server {shown} does not answer ({getattr(exc, 'reason', exc)})") from None
    if not isinstance(answer, dict) or set(answer) - _PROBE_KEYS:
        raise UserInputError(f"tracking server {shown} answers /health but is not an MLflow server "
                             f"(GET {MLFLOW_PROBE.split('?')[0]} did not return MLflow's JSON)")


def _refuse_http_error(shown: str, path: str, exc: urllib.error.HTTPError) -> None:
    if exc.code in (401, 403):
        raise UserInputError(f"tracking server {shown} refused the credentials (HTTP {exc.code}): give them in the "
                             "URI or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD") from None
    raise UserInputError(f"tracking server {shown} answers /health but is not an MLflow server "
                         f"(GET {path.split('?')[0]}: HTTP {exc.code})") from None


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without user and password, the Authorization header MLflow's client would send).

    urllib takes no credentials from a URL (it reads `user:password@host` as a host and a port),
    so they travel as basic auth; without them, MLflow's own variables are used."""
    parsed = urlparse(uri)
    host = parsed.netloc.rpartition("@")[2]
    base = parsed._replace(netloc=host).geturl().rstrip("/")
    user, password = unquote(parsed.username or ""), unquote(parsed.password or "")
    if not parsed.username:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user or password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return base, {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return base, {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return base, {}


def _get(url: str, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=_tls_context(url)) as response:
        return response.read()


def _tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS settings MLflow's client honours (a private CA, or no verification at all)."""
    if not url.startswith("https:"):
        return None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # the user asked MLflow for exactly this
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def check_database_driver(uri: str, given_as: str) -> None:
    """SQLAlchemy knows the dialect and its driver imports (MLflow needs it only when it first
    opens the store, which is after Ray started)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = without_credentials(uri)
    try:
        dialect = make_url(uri).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise UserInputError(f"{given_as} {shown}: not a database URI SQLAlchemy can open") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name or str(exc)
        package = _DRIVER_PACKAGES.get(module, module)
        raise UserInputError(f"{given_as} {shown}: its database driver is not installed (no module {module!r}; "
                             f"pip install '{package}')") from None
