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

A big blob body can skip the HTTP stack altogether: :func:`open_body` hands it
out straight from the connection into the consumer's buffers (:class:`Body`).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio
import h11
import httpcore
import httpx

from .._threads import POLL_INTERVAL, checkpoint

__all__ = ["READ_SIZE", "Body", "big_reads", "open_body"]

#: The most one socket read of a response takes (what the kernel has buffered, up to this).
READ_SIZE: Final = 512 << 10
#: Pieces an asyncio transport reads ahead of its reader before it pauses.
_QUEUED: Final = 2

_SocketOption = Any
#: Whether a worker thread can wait for a socket (``select.poll``: not on Windows).
_POLL: Final = hasattr(select, "poll")


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


# -- bodies read past h11 -------------------------------------------------------------


def _transport_error(exc: BaseException) -> httpx.TransportError:
    """``exc`` (httpcore's, anyio's, trio's or the socket's) as the httpx error its response stream would raise."""
    if isinstance(exc, httpx.TransportError):
        return exc
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError | httpcore.TimeoutException):
        return httpx.ReadTimeout(reason)
    return httpx.ReadError(reason)


def _copy_pending(pending: collections.deque[bytes], view: memoryview | bytearray, want: int) -> int:
    """Move up to ``want`` bytes from the front of ``pending`` into ``view`` (a piece partly taken keeps its rest)."""
    done = 0
    while pending and done < want:
        piece = pending.popleft()
        n = min(len(piece), want - done)
        view[done : done + n] = memoryview(piece)[:n]
        if n < len(piece):
            pending.appendleft(piece[n:])
        done += n
    return done


class Body:
    """A response body of known length, read straight from its connection, past h11 (see :func:`open_body`).

    :meth:`readinto` fills the caller's buffer: no ``bytes`` made per socket
    read, no trip through h11's buffer and httpcore's and httpx's generators.
    The bytes that were already off the socket when the headers were parsed
    (h11's buffer, a transport's read-ahead) come first. The connection is never
    handed back: closing the response closes it (h11 never saw the body end).
    """

    def __init__(self, pending: collections.deque[bytes], remaining: int, timeout: float | None) -> None:
        self._pending = pending
        self.remaining = remaining
        self._timeout = timeout
        self._ended = False  # the peer closed
        self._error: httpx.TransportError | None = None  # raised by the next read, once what came before is out
        #: Bytes :meth:`pour_blocking` handed over, in all.
        self.poured = 0
        #: Whether :meth:`pour_blocking` stopped because nothing came for a while (see :meth:`wait_readable`).
        self.would_block = False
        self._last: float | None = None  # time.monotonic() when the pours last had data

    async def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (within the body): fewer bytes only at an end or error, ``0`` at the end.

        Raises an :class:`httpx.TransportError` when the connection failed before anything was read.
        """
        if self._error is not None:
            raise self._error
        want = min(len(view), self.remaining)
        done = _copy_pending(self._pending, view, want)
        if done < want and not self._ended:
            try:
                done += await self._fill(view[done:want])
            except BaseException:  # cancelled: what was filled is lost to the caller, so the body is too
                self._error = httpx.ReadError("a read of the body was cancelled")
                raise
        self.remaining -= done
        if not done and self._error is not None:
            raise self._error
        return done

    async def _fill(self, view: memoryview) -> int:
        """Fill ``view`` from the connection; at an end or error, stop (setting ``_ended`` or ``_error``)."""
        raise NotImplementedError

    def _fileno(self) -> int | None:
        """The connection's socket, when a worker thread may receive from it itself (:meth:`pour_blocking`)."""
        return None

    @property
    def error(self) -> httpx.TransportError | None:
        """How the connection failed, if it did."""
        return self._error

    @property
    def pourable(self) -> bool:
        """Whether :meth:`pour_blocking` can go on: a plain socket, and no end or error seen yet."""
        return not self._ended and self._error is None and _POLL and self._fileno() is not None

    def open_pour(self) -> socket.socket | None:
        """On the event loop: a duplicate of the connection's socket for :meth:`pour_blocking` (the caller
        closes it), or ``None`` if the body is not :attr:`pourable`.

        The check and the ``dup`` are one step on the loop, so the connection cannot close between them.
        """
        if self._ended or self._error is not None or not _POLL:
            return None
        fd = self._fileno()
        if fd is None:
            return None
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except BaseException:
            os.close(dup)
            raise
        try:
            # the file description is non-blocking already, but the object takes socket.getdefaulttimeout():
            # with one set, recv_into would wait in C (no poll, no checkpoint) and then raise TimeoutError
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        if self._last is None:
            self._last = time.monotonic()
        return sock

    def pour_blocking(
        self, sock: socket.socket, buffer: memoryview, sink: Callable[[memoryview], None], limit: int
    ) -> int:
        """In a worker thread: receive up to ``limit`` bytes of the body from ``sock`` (:meth:`open_pour`'s)
        into ``buffer`` and hand each filling to ``sink``, with no event loop in between; the count handed over.

        Fewer at an end or error of the connection (``_ended`` or ``_error`` set, as :meth:`readinto` does),
        when nothing came for :data:`~ocicas._threads.POLL_INTERVAL` (:attr:`would_block` set: the thread
        goes back to its pool while :meth:`wait_readable` waits on the loop), or when ``sink`` or
        :func:`~ocicas._threads.checkpoint` raise: :attr:`poured` counts what ``sink`` took in any case.
        The socket's owner (the asyncio transport, paused, or the trio socket, not waited on) is never
        used meanwhile.
        """
        self.would_block = False
        if self._ended or self._error is not None:
            return 0
        try:
            return self._pour(sock, buffer, sink, limit)
        except BaseException:  # cancelled, or the sink failed: bytes received may not have been handed over
            if self._error is None:
                self._error = httpx.ReadError("a read of the body was interrupted")
            raise

    async def wait_readable(self, sock: socket.socket) -> None:
        """On the event loop: wait until ``sock`` has data (or an end) for :meth:`pour_blocking`; once the
        read timeout has passed since data last came (in the pours or here), set ``_error`` instead."""
        timeout = self._timeout
        last = time.monotonic() if self._last is None else self._last
        left = None if timeout is None else timeout - (time.monotonic() - last)
        if left is not None and left <= 0:
            self._error = httpx.ReadTimeout(f"no data for {timeout} seconds")
            return
        with anyio.move_on_after(math.inf if left is None else left) as scope:
            await anyio.wait_readable(sock)
        if scope.cancelled_caught:
            self._error = httpx.ReadTimeout(f"no data for {timeout} seconds")

    def _pour(self, sock: socket.socket, buffer: memoryview, sink: Callable[[memoryview], None], limit: int) -> int:
        moved = 0
        limit = min(limit, self.remaining)
        pending = self._pending
        timeout = self._timeout
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        last = time.monotonic() if self._last is None else self._last
        try:
            while moved < limit:
                want = min(len(buffer), limit - moved)
                filled = _copy_pending(pending, buffer, want)
                while filled < want:
                    try:
                        n = sock.recv_into(buffer[filled:want])
                    except (BlockingIOError, InterruptedError):
                        idle = time.monotonic() - last
                        if timeout is not None and idle >= timeout:
                            self._error = httpx.ReadTimeout(f"no data for {timeout} seconds")
                            break
                        wait = POLL_INTERVAL if timeout is None else min(POLL_INTERVAL, timeout - idle)
                        if poller.poll(max(1, int(wait * 1000))):
                            checkpoint()  # raises once cancelled: what was filled is lost, so the body is too
                            continue
                        self.would_block = True  # nothing for a while: wait on the loop, not in a worker thread
                        break
                    except OSError as exc:
                        self._error = _transport_error(exc)
                        break
                    if not n:
                        self._ended = True
                        break
                    filled += n
                    last = time.monotonic()
                if filled:
                    self.remaining -= filled
                    sink(buffer[:filled])
                    moved += filled
                    self.poured += filled
                    last = time.monotonic()  # the sink's time is not time without data
                if self._ended or self._error is not None or self.would_block:
                    break
        finally:
            self._last = last
        return moved


class _StreamBody(Body):
    """Any network stream (TLS, say): its pieces copied into the caller's buffer."""

    def __init__(
        self,
        pending: collections.deque[bytes],
        remaining: int,
        timeout: float | None,
        stream: httpcore.AsyncNetworkStream,
    ) -> None:
        super().__init__(pending, remaining, timeout)
        self._stream = stream

    async def _fill(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            try:
                piece = await self._stream.read(READ_SIZE, self._timeout)
            except (OSError, httpcore.NetworkError, httpcore.TimeoutException) as exc:
                self._error = _transport_error(exc)
                break
            if not piece:
                self._ended = True
                break
            n = min(len(piece), len(view) - done)
            view[done : done + n] = memoryview(piece)[:n]
            done += n  # anything past the body is dropped: the connection is not used again
        return done


class _Receiver(asyncio.BufferedProtocol):
    """The protocol of an asyncio transport whose body is read into the caller's buffer (``recv_into``)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._clock = asyncio.get_running_loop().time
        self.view: memoryview | None = None
        self.filled = 0
        self.last = 0.0  # the loop's time when bytes last came
        self.waiter: asyncio.Future[bool] | None = None
        self.ended = False
        self.error: BaseException | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.view is None:  # reading is paused whenever there is no buffer: never happens
            raise RuntimeError("no buffer to receive into")
        return self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.last = self._clock()
        assert self.view is not None
        if self.filled >= len(self.view):
            self._wake()

    def _wake(self) -> None:
        self._transport.pause_reading()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()


class _AsyncioBody(Body):
    """asyncio: the transport receives into the caller's buffer (a :class:`asyncio.BufferedProtocol` of ours)."""

    def __init__(
        self,
        pending: collections.deque[bytes],
        remaining: int,
        timeout: float | None,
        transport: asyncio.Transport,
    ) -> None:
        super().__init__(pending, remaining, timeout)
        self._transport = transport
        self._receiver = _Receiver(transport)
        transport.pause_reading()
        transport.set_protocol(self._receiver)

    def _fileno(self) -> int | None:
        if self._receiver.ended or self._transport.is_closing():
            return None
        sock = self._transport.get_extra_info("socket")
        fileno = getattr(sock, "fileno", None)
        return fileno() if callable(fileno) and getattr(sock, "type", None) == socket.SOCK_STREAM else None

    async def _fill(self, view: memoryview) -> int:
        receiver, transport = self._receiver, self._transport
        if receiver.ended or transport.is_closing():
            self._ended = True
            return 0
        loop = asyncio.get_running_loop()
        receiver.view, receiver.filled = view, 0
        receiver.waiter = waiter = loop.create_future()
        timeout = self._timeout
        timer: asyncio.TimerHandle | None = None
        started = loop.time()

        def expire() -> None:  # a timer, cheaper than a cancel scope per buffer; pushed back while data comes
            nonlocal timer
            if waiter.done():
                return
            assert timeout is not None
            idle = loop.time() - max(receiver.last, started)
            if idle < timeout:
                timer = loop.call_later(timeout - idle, expire)
            else:
                waiter.set_result(False)

        if timeout is not None:
            timer = loop.call_later(timeout, expire)
        transport.resume_reading()
        try:
            if not await waiter:
                self._error = httpx.ReadTimeout(f"no data for {timeout} seconds")
        finally:
            if timer is not None:
                timer.cancel()
            transport.pause_reading()
            receiver.view = receiver.waiter = None  # the buffer is the caller's again: never written after
        if receiver.ended:
            self._ended = True
            if receiver.error is not None and self._error is None:
                self._error = _transport_error(receiver.error)
        return receiver.filled


class _TrioBody(Body):
    """trio: ``recv_into`` the caller's buffer, from the socket itself."""

    def __init__(self, pending: collections.deque[bytes], remaining: int, timeout: float | None, sock: Any) -> None:
        super().__init__(pending, remaining, timeout)
        self._sock = sock

    def _fileno(self) -> int | None:
        fileno = getattr(self._sock, "fileno", None)
        return fileno() if callable(fileno) and getattr(self._sock, "type", None) == socket.SOCK_STREAM else None

    async def _fill(self, view: memoryview) -> int:
        done = 0
        timeout = self._timeout
        try:
            with anyio.CancelScope() as scope:  # a deadline reset while data comes: a read timeout, not a fill's
                while done < len(view):
                    if timeout is not None:
                        scope.deadline = anyio.current_time() + timeout
                    n = await self._sock.recv_into(view[done:])
                    if not n:
                        self._ended = True
                        break
                    done += n
        except OSError as exc:
            self._error = _transport_error(exc)
        if scope.cancelled_caught:
            self._error = httpx.ReadTimeout(f"no data for {timeout} seconds")
        return done


def _dig(obj: Any, *path: tuple[str, str]) -> Any:
    """Follow ``(type name, attribute)`` steps through private layers; ``None`` where one is not as expected."""
    for type_name, attribute in path:
        if type(obj).__name__ != type_name:
            return None
        obj = getattr(obj, attribute, None)
    return obj


def open_body(response: httpx.Response) -> Body | None:
    """Read ``response``'s body past h11, straight from its connection; ``None`` if that cannot be done safely.

    Only an unread, identity-encoded HTTP/1.1 body of known length, on a
    connection of a pool :func:`big_reads` set up, is taken: httpcore's and h11's
    private layout is checked first (h11 must be at the very start of that body).
    The response must then only be closed, which closes its connection.
    """
    length = response.headers.get("content-length", "")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    network = response.extensions.get("network_stream")
    if not length.isdigit() or encoding != "identity" or response.is_stream_consumed or response.is_closed:
        return None
    if not isinstance(network, _Stream):
        return None
    stream: _Stream = network
    connection = _dig(
        response.stream,
        ("BoundAsyncStream", "_stream"),
        ("AsyncResponseStream", "_httpcore_stream"),
        ("PoolByteStream", "_stream"),
        ("HTTP11ConnectionByteStream", "_connection"),
    )
    if type(connection).__name__ != "AsyncHTTP11Connection" or getattr(connection, "_network_stream", 0) is not stream:
        return None
    state = getattr(connection, "_h11_state", None)
    reader = getattr(state, "_reader", None)
    if (
        not isinstance(state, h11.Connection)
        or state.their_state is not h11.SEND_BODY
        or type(reader).__name__ != "ContentLengthReader"
        or getattr(reader, "_remaining", None) != int(length)
    ):
        return None
    buffered, closed = state.trailing_data
    remaining = int(length)
    if len(buffered) > remaining:
        return None
    pending = collections.deque([buffered] if buffered else [])
    timeout = response.request.extensions.get("timeout", {}).get("read")
    if isinstance(stream, _AsyncioStream):
        protocol, transport = stream._protocol, stream._transport
        pending.extend(protocol.read_queue)
        protocol.read_queue.clear()
        protocol.read_event.clear()
        body: Body = _AsyncioBody(pending, remaining, timeout, transport)
        if closed or protocol.is_at_eof or protocol.exception is not None or transport.is_closing():
            body._ended = True
        return body
    inner: Any = stream._inner
    sock = _dig(inner, ("TrioStream", "_stream"), ("SocketStream", "socket"))
    trio_socket = sock is not None and type(inner._stream).__module__.startswith("trio")
    if trio_socket and callable(getattr(sock, "recv_into", None)):
        return _TrioBody(pending, remaining, timeout, sock)
    return _StreamBody(pending, remaining, timeout, stream)
