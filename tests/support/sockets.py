"""What listens on a TCP port of this machine, read from the kernel (/proc/net/tcp, tcp6)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

__all__ = ["answers", "listening_addresses"]

_LISTEN = "0A"


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_addresses(port: int) -> set[str]:
    """The local addresses that listen on ``port`` (e.g. ``{"127.0.0.1"}``; ``0.0.0.0`` is all)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == _LISTEN and int(hex_port, 16) == port:
                found.add(_address(address))
    return found


def answers(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
