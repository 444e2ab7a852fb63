"""Whether a server could listen on --host/--port, asked before anything slow starts (serve,
ui, dashboard): the servers themselves would log a bind failure over several lines, late, and
MLflow's UI would even exit 0."""

from __future__ import annotations

import errno
import ipaddress
import re
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


_DNS_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", re.IGNORECASE)
_HOST_HEADER = re.compile(r"(\[[^]]*\]|[^][:]*)(?::[0-9]*)?")  # a name or [IPv6 address], then an optional port


def host_key(name: str) -> str | None:
    """A host name or address as the Host check compares them, None for neither: a name in lower
    case without the trailing dot of a fully qualified name (both mean the same host to DNS), an
    IPv6 address in brackets in its shortest spelling (`::1`, `[::1]`, `[0:0::1]`)."""
    try:
        if name.startswith("[") and name.endswith("]"):
            return url_host(ipaddress.IPv6Address(name[1:-1]).compressed)
        return url_host(ipaddress.ip_address(name).compressed)
    except ValueError:
        return name.lower().removesuffix(".") if _DNS_NAME.fullmatch(name) else None


def header_host(header: str) -> str | None:
    """The host a Host header names, as host_key spells it (`[::1]:8080` → `[::1]`, `MyHost.:80` → `myhost`)."""
    parsed = _HOST_HEADER.fullmatch(header.strip())
    return host_key(parsed[1]) if parsed else None


def allowed_host_keys(names: tuple[str, ...]) -> list[str]:
    """--allowed-host values as host_key spells them; exit 2 for one that no Host header could
    match (a port, a path, a space, a URL): it would be refused silently on every request."""
    keys = []
    for name in names:
        key = host_key(name)
        if key is None:
            raise UserInputError(f"--allowed-host {name!r}: not a host name or IP address (give it without "
                                 "scheme, port or path, e.g. cells.lab or ::1)")
        keys.append(key)
    return keys
