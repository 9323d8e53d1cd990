"""Forward TCP ports of this machine's 127.0.0.1 to the same ports inside a network namespace.

``python -m prefect_gpu_sandbox.relay NETNS_PATH PORT...`` binds each port on the loopback it
starts in, then moves into the namespace before any thread exists, so every connection it opens
from then on is made inside it. Clients (kubectl, helm, the tests' Python clients) then reach the
node's API server and Prefect server at the same ``127.0.0.1:PORT`` inside the namespace and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from prefect_gpu_sandbox.namespaces import enter_network

__all__ = ["main"]

_CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass a half-close on: the other side may still answer
    except (ConnectionError, OSError):
        writer.close()


async def _forward(
    port: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pipe(client_reader, server_writer), _pipe(server_reader, client_writer)
        )
    finally:
        for writer in (client_writer, server_writer):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _serve(listeners: Sequence[socket.socket]) -> None:
    servers = []
    for listener in listeners:
        port = listener.getsockname()[1]

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int = port
        ) -> None:
            await _forward(port, reader, writer)

        servers.append(await asyncio.start_server(handle, sock=listener))
    await asyncio.gather(*(server.serve_forever() for server in servers))


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    listener.setblocking(False)
    return listener


def main(argv: Sequence[str] | None = None) -> int:
    netns, *ports = list(sys.argv[1:] if argv is None else argv)
    listeners = [_listen(int(port)) for port in ports]  # on this machine's loopback
    enter_network(Path(netns))  # from here on, every socket is made inside the namespace
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
