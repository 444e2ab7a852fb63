"""What a search exposes beyond its own process: the sockets a local Ray listens on."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path

import pytest

from conftest import short_tmpdir

pytestmark = pytest.mark.slow

# --- reading /proc (Linux) ------------------------------------------------------------------


def descendants(root: int) -> set[int]:
    """`root` and every process below it (Ray's GCS, raylet, agents and workers descend from the driver)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp* prints each 32-bit word of the address in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"


def listening_sockets(pids: set[int]) -> list[tuple[int, str, str]]:
    """(pid, process name, local address) of every listening TCP socket the processes hold."""
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                by_inode[fields[9]] = _address(fields[1])
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in by_inode:
                found.append((pid, name, by_inode[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rpartition(":")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1]: an IPv6 socket bound to 127.0.0.1
    return (mapped or ip).is_loopback


# --- Ray ------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")
def test_a_local_search_ray_listens_on_loopback_only_with_token_auth(monkeypatch):
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from tune_cells import ray_backend

    monkeypatch.setenv("TUNE_CELLS_RAY_TMPDIR", short_tmpdir("tcr"))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's own default for a new local cluster
    ray_backend.shutdown()
    cluster_setting = ray_constants.ENABLE_RAY_CLUSTER
    ray_backend.init(num_cpus=1, object_store_bytes=100 << 20)  # as a local search starts it
    try:
        assert ray_constants.ENABLE_RAY_CLUSTER == cluster_setting  # changed only while the node started
        worker = ray.get(ray.remote(lambda: os.getpid()).remote())  # a lambda travels by value
        time.sleep(1)
        listeners = listening_sockets(descendants(os.getpid()))
        names = {name for _, name, _ in listeners}
        assert {"gcs_server", "raylet"} <= names and worker in {pid for pid, _, _ in listeners}, listeners
        exposed = [(name, address) for _, name, address in listeners if not is_loopback(address)]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        ray_backend.shutdown()
