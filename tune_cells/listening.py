"""Whether a server could listen on --host/--port, asked before anything slow starts (serve,
ui, dashboard): the servers themselves would log a bind failure over several lines, late, and
MLflow's UI would even exit 0."""

from __future__ import annotations

import errno
import socket

from tune_cells.errors import UserInputError


def check_listen(host: str, port: int) -> None:
    """Exit 2 with one line where the server could not listen (a port in use, a privileged port, an
    address not on this machine); uvicorn would log it and exit 1. Probes every address the host
    resolves to, as asyncio's create_server binds them (IPv6 ones v6-only; "" is every interface)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise UserInputError(f"--host {host}: not an address of this machine") from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise UserInputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
            raise


WILDCARD_BINDS = ("0.0.0.0", "::", "")  # addresses, not names a client would send as Host


def url_host(host: str) -> str:
    """A bind address as a URL or Host header spells it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def base_url(host: str, port: int) -> str:
    """The http:// address a banner prints for --host: an IPv6 address in brackets (`http://[::1]:8080`,
    as URLs need); a bind to every interface ("", 0.0.0.0, ::) as 127.0.0.1, the address this
    machine's browser opens and the Host check answers (no client can send 0.0.0.0 as a name)."""
    return f"http://{url_host('127.0.0.1' if host in WILDCARD_BINDS else host)}:{port}"
