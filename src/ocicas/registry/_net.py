"""Socket reads of up to 256 KiB under httpx, instead of httpcore's 64 KiB.

httpcore reads a response 64 KiB at a time (``READ_NUM_BYTES``), and each read
climbs through five layers of async generators and, on asyncio, slices what the
transport buffered: a 1 GiB blob costs ≈16,000 such trips, most of a pull's CPU
beside hashing. Wrapping the connection pool's network backend lets each read
take what the socket has, up to :data:`READ_SIZE`; h11 takes any amount. Only
the default transport of a client this package built is wrapped, and only if
httpcore's pool is laid out as expected (otherwise nothing changes).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, Final

import httpcore
import httpx

__all__ = ["READ_SIZE", "big_reads"]

#: The most one socket read of a response takes (what the kernel has buffered, up to this).
READ_SIZE: Final = 256 << 10

_SocketOption = Any


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[_SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def big_reads(http: httpx.AsyncClient) -> None:
    """Make ``http``'s default transport read responses in pieces of up to :data:`READ_SIZE`."""
    pool = getattr(getattr(http, "_transport", None), "_pool", None)
    if type(pool) is httpcore.AsyncConnectionPool and isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        pool._network_backend = _Backend(pool._network_backend)
