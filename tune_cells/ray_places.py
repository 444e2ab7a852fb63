"""Where a search's Ray runs and keeps its results (--address, --storage), checked by the preflight:
Ray itself retries a cluster that does not answer for minutes, and fails on a storage it cannot
write only after the search has opened its MLflow store beside it."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tune_cells.errors import UserInputError

CONNECT_TIMEOUT_S = 5.0  # a head across a slow network answers in well under this
USAGE = ("give auto, local, HOST:PORT (the head's GCS port, 6379 unless changed) or ray://HOST:PORT (its Ray "
         "Client port)")


def check_ray_address(address: str | None) -> None:
    """Exit 2 naming `address` unless a Ray cluster may answer there: `auto` must find one (RAY_ADDRESS,
    else the latest `ray start` on this machine), HOST:PORT and ray://HOST:PORT must take a TCP
    connection. None and `local` start a new local Ray: nothing to reach."""
    if not address or address == "local":
        return
    named = address
    if address == "auto":
        address = _auto_address()
        if address is None or address == "local":
            return
        named = f"auto (found {address})"
    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise UserInputError(f"--address {named}: an HTTP address (Ray's dashboard?); {USAGE}")
    if scheme not in ("", "ray"):
        return  # another Ray client module's address, which that module reaches
    host, _, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address: [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"--address {named}: {USAGE}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.gaierror:
        raise UserInputError(f"--address {named}: unknown host {host}") from None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise UserInputError(f"--address {named}: no Ray cluster answers at {host}:{port} ({why})") from None
    if scheme == "ray" and importlib.util.find_spec("grpc") is None:  # Ray Client's transport, an extra
        raise UserInputError(f"--address {named}: a ray:// address needs Ray Client: pip install 'ray[client]' "
                             "(grpcio is not installed)")


def _auto_address() -> str | None:
    """The address `ray.init(address="auto")` would join, by Ray's own lookup; None where this Ray
    no longer has that (private) lookup: then Ray's own error, late, as before."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return None
    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise UserInputError("--address auto: no running Ray cluster found (start one with `ray start --head`, "
                             "or set RAY_ADDRESS)") from None


def check_storage(storage: str | None) -> None:
    """A local --storage (a path or file:// URI) must be a folder that exists or can be made, and
    be writable: Ray would fail only after the store has opened. A remote URI is Ray's to reach."""
    path = local_storage(storage)
    if path is None:
        return
    probe = path
    while not os.path.lexists(probe):  # (Path.exists raises where a parent cannot be entered)
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--storage {storage}: cannot be created or written ({probe} is not a writable folder)")


def local_storage(storage: str | None) -> Path | None:
    """--storage as an absolute local path (Ray's file system layer takes no relative one); None
    when not given or a remote URI (s3://, gs://)."""
    if not storage or ("://" in storage and not storage.startswith("file://")):
        return None
    return Path(urlparse(storage).path if "://" in storage else storage).expanduser().absolute()


def storage_for_ray(storage: str) -> str:
    """--storage as Ray takes it: a URI as given, a path made absolute (its file layer refuses relative ones)."""
    return storage if "://" in storage else str(local_storage(storage))
