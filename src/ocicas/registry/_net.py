"""Socket reads of up to 512 KiB under httpx, instead of httpcore's 64 KiB.

httpcore reads a response 64 KiB at a time (``READ_NUM_BYTES``), and each read
climbs through five layers of async generators and, on asyncio, slices what the
transport buffered: a 1 GiB blob costs ≈16,000 such trips, most of a pull's CPU
beside hashing. Wrapping the connection pool's network backend lets each read
take what the socket has, up to :data:`READ_SIZE`; h11 takes any amount. Only
the default transport of a client this package built is wrapped, and only if
httpcore's pool is laid out as expected (otherwise nothing changes). On asyncio
the transport also reads ahead a little instead of pausing after every read
(:class:`_AsyncioStream`).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import Any, Final

import anyio
import httpcore
import httpx

__all__ = ["READ_SIZE", "big_reads"]

#: The most one socket read of a response takes (what the kernel has buffered, up to this).
READ_SIZE: Final = 512 << 10
#: Pieces an asyncio transport reads ahead of its reader before it pauses.
_QUEUED: Final = 2

_SocketOption = Any


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109  httpcore's interface
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109  httpcore's interface
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncioStream(_Stream):
    """asyncio: a transport that keeps reading while its reader keeps up.

    anyio's asyncio socket stream resumes its transport before each wait and
    pauses it after: two ``epoll_ctl`` calls per read. Here the transport reads
    on, up to :data:`READ_SIZE` a ``recv``, until :data:`_QUEUED` pieces wait
    unread; it resumes once they are all taken. anyio's ``receive`` then finds
    data waiting and pops it, as ever.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream, transport: Any, protocol: Any) -> None:
        super().__init__(inner)
        self._transport = transport
        self._protocol = protocol
        transport.max_size = READ_SIZE
        queue, received = protocol.read_queue, protocol.data_received

        def data_received(data: bytes) -> None:
            received(data)
            if len(queue) >= _QUEUED:
                transport.pause_reading()

        protocol.data_received = data_received

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109  httpcore's interface
        protocol, transport = self._protocol, self._transport
        if not protocol.read_queue and not transport.is_closing() and not protocol.is_at_eof:
            transport.resume_reading()  # and not paused again after the read
            if not protocol.read_event.is_set():
                try:
                    with anyio.fail_after(timeout):
                        await protocol.read_event.wait()
                except TimeoutError as exc:
                    raise httpcore.ReadTimeout(exc) from exc
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and (self._protocol.read_queue or self._protocol.is_at_eof):
            return True  # what the transport read while the connection was idle: the server's close, say
        return self._inner.get_extra_info(info)


def _stream(inner: httpcore.AsyncNetworkStream) -> _Stream:
    """``inner`` wrapped: as :class:`_AsyncioStream` if it is laid out as expected, else as :class:`_Stream`."""
    socket_stream = getattr(inner, "_stream", None)
    transport = getattr(socket_stream, "_transport", None)
    protocol = getattr(socket_stream, "_protocol", None)
    if (
        type(inner).__name__ == "AnyIOStream"
        and type(socket_stream).__module__ == "anyio._backends._asyncio"
        and type(socket_stream).__name__ == "SocketStream"
        and isinstance(transport, asyncio.Transport)
        and isinstance(getattr(transport, "max_size", None), int)
        and isinstance(getattr(protocol, "read_queue", None), collections.deque)
        and isinstance(getattr(protocol, "read_event", None), asyncio.Event)
        and isinstance(getattr(protocol, "is_at_eof", None), bool)
        and callable(getattr(protocol, "data_received", None))
    ):
        return _AsyncioStream(inner, transport, protocol)
    return _Stream(inner)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  httpcore's interface
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def big_reads(http: httpx.AsyncClient) -> None:
    """Make ``http``'s default transport read responses in pieces of up to :data:`READ_SIZE`."""
    pool = getattr(getattr(http, "_transport", None), "_pool", None)
    if type(pool) is httpcore.AsyncConnectionPool and isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        pool._network_backend = _Backend(pool._network_backend)
