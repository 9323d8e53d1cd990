"""A TCP proxy on 127.0.0.1 that a test can cut: a replica's (or anyone's) line to a server.

``cut()`` closes every connection through it and refuses new ones until ``restore()``, the way a
network partition or a firewall change looks to the client (TLS passes through untouched).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Self

import yaml

from prefect_gpu_sandbox.processes import free_port

__all__ = ["Proxy", "kubeconfig_through"]


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        self.restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        self._listener = listener
        self._start(self._accept, listener)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            live = [*self._sockets, *([listener] if listener else [])]
            self._sockets.clear()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            self._start(self._pump, client, server)
            self._start(self._pump, server, client)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


def kubeconfig_through(kubeconfig: Path, proxy: Proxy, path: Path) -> Path:
    """A copy of ``kubeconfig`` that reaches its API server through ``proxy``."""
    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
