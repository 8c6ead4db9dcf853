"""A loopback HTTP/1.1 proxy that breaks things on purpose, in front of a real registry.

:class:`FaultProxy` relays requests (keep-alive, ``Content-Length`` and chunked
bodies) from ``127.0.0.1:<port>`` to an upstream server, and applies the faults
its :class:`Faults` asks for, to the requests they match:

- ``cut_after``: cut response bodies longer than that after as many bytes (the
  connection is closed there; ``cuts`` limits how many are cut, both ways);
- ``cut_request_after``: cut request bodies (uploads) after as many bytes (a reset);
- ``reset``: reset the next *n* matching connections instead of forwarding;
- ``fail``: answer the next matching requests with these statuses (``503``, ``500``)
  and ``Retry-After: 0``, without forwarding;
- ``stall``: hold the next *n* matching answers for ``stall_seconds`` after their head;
- ``strip_range``: forward without the ``Range`` header (a registry that ignores it).

:func:`running_proxy` runs one on an event loop of its own in a thread (tests, on
any backend); ``python tests/fault_proxy.py UPSTREAM --cut-after N`` runs one as a
process (benchmarks) and prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator

import anyio
import anyio.abc
import anyio.from_thread
from anyio.streams.buffered import BufferedByteReceiveStream

_PIECE = 256 << 10
_MAX_HEAD = 64 << 10


@dataclasses.dataclass
class Faults:
    """What to break, and what was broken (``log``: ``(method, path, fault)`` per request)."""

    #: Only requests whose method is in here and whose path matches this pattern are touched.
    methods: frozenset[str] = frozenset({"GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"})
    path: str = r"/blobs/|/manifests/"
    cut_after: int | None = None
    cuts: int | None = None
    cut_request_after: int | None = None
    reset: int = 0
    fail: list[int] = dataclasses.field(default_factory=list)
    retry_after: str = "0"
    stall: int = 0
    stall_seconds: float = 0.0
    strip_range: bool = False
    log: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def take_cut(self, cut: int | None, length: str | None) -> int | None:
        """``cut`` if one more cut may be made, counted now: answers served at once never cut more than asked.

        A body whose ``Content-Length`` says it ends before ``cut`` takes no cut (another answer may).
        """
        if cut is None or self.cuts == 0 or (length is not None and length.isdigit() and int(length) <= cut):
            return None
        if self.cuts is not None:
            self.cuts -= 1
        return cut

    def give_back(self, cut: int | None) -> None:
        """An answer taken to be cut ended before ``cut`` bytes: the cut was not made."""
        if cut is not None and self.cuts is not None:
            self.cuts += 1

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and re.search(self.path, path) is not None

    def made(self, fault: str) -> list[tuple[str, str, str]]:
        """The requests that met ``fault`` (``"cut"``, ``"reset"``, ``"503"``, ...)."""
        return [entry for entry in self.log if entry[2] == fault]


class _Reset(Exception):
    """Reset the client connection now."""


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _head_bytes(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _abort(stream: anyio.abc.SocketStream) -> None:
    """Make the coming close a reset (RST), not an orderly end."""
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """See the module documentation."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        host, _, port = upstream.partition("://")[2].rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.faults = faults or Faults()
        self.url = ""
        #: Client connections being served (a stalled one lives on after its client gave up).
        self.connections = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.url = f"http://127.0.0.1:{port}"
        task_status.started(self.url)
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            await self._serve_connection(client)
        finally:
            self.connections -= 1

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Block until every connection has ended (called from the test's thread, off its event loop)."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.connections, f"{self.connections} proxy connections still open"

    async def _serve_connection(self, client: anyio.abc.SocketStream) -> None:
        upstream: anyio.abc.SocketStream | None = None
        up_reader: BufferedByteReceiveStream | None = None
        reader = BufferedByteReceiveStream(client)
        try:
            while True:
                try:
                    head = await reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
                except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                first, headers = _parse_head(head)
                method, path = first.split(" ")[:2]
                faults = self.faults
                fault = ""
                if faults.matches(method, path):
                    if faults.fail:
                        fault = str(faults.fail.pop(0))
                    elif faults.reset:
                        faults.reset -= 1
                        fault = "reset"
                    elif faults.stall:
                        faults.stall -= 1
                        fault = "stall"
                    if faults.strip_range and _header(headers, "range") is not None:
                        headers = [(k, v) for k, v in headers if k.lower() != "range"]
                        fault = fault or "range stripped"
                if fault == "reset":
                    faults.log.append((method, path, fault))
                    raise _Reset
                if fault.isdigit():
                    faults.log.append((method, path, fault))
                    await self._relay_body(reader, headers, None, None)  # read and drop the request body
                    body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}'
                    answer = [
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))),
                        ("Retry-After", faults.retry_after),
                    ]
                    await client.send(_head_bytes(f"HTTP/1.1 {fault} Injected", answer) + body)
                    continue
                if upstream is None:
                    upstream = await anyio.connect_tcp(*self.upstream)
                    up_reader = BufferedByteReceiveStream(upstream)
                assert up_reader is not None
                await upstream.send(_head_bytes(first, headers))
                cut = faults.take_cut(
                    faults.cut_request_after if faults.matches(method, path) else None,
                    _header(headers, "content-length"),
                )
                if not await self._relay_body(reader, headers, upstream, cut):
                    faults.log.append((method, path, "request cut"))
                    _abort(upstream)
                    await upstream.aclose()
                    raise _Reset
                faults.give_back(cut)
                response_head = await up_reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
                status_line, response_headers = _parse_head(response_head)
                status = int(status_line.split(" ")[1])
                await client.send(response_head + b"\r\n\r\n")
                if fault == "stall":
                    faults.log.append((method, path, fault))
                    await anyio.sleep(faults.stall_seconds)
                if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                    faults.log.append((method, path, fault or str(status)))
                    continue
                cut = faults.take_cut(
                    faults.cut_after if faults.matches(method, path) else None,
                    _header(response_headers, "content-length"),
                )
                complete = await self._relay_body(up_reader, response_headers, client, cut, until_close=True)
                if not complete:  # an orderly close in mid-body: the client sees exactly ``cut`` bytes
                    faults.log.append((method, path, "cut"))
                    return
                faults.give_back(cut)
                faults.log.append((method, path, fault or str(status)))
                if _header(response_headers, "connection") == "close" or (
                    _header(response_headers, "content-length") is None
                    and _header(response_headers, "transfer-encoding") is None
                ):
                    return
        except _Reset:
            _abort(client)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                if upstream is not None:
                    await upstream.aclose()
                await client.aclose()

    async def _relay_body(
        self,
        source: BufferedByteReceiveStream,
        headers: list[tuple[str, str]],
        target: anyio.abc.SocketStream | None,
        cut: int | None,
        *,
        until_close: bool = False,
    ) -> bool:
        """Relay a body framed by ``headers``; ``False`` if it was cut after ``cut`` bytes (when longer)."""
        sent = 0

        async def out(data: bytes) -> bool:
            nonlocal sent
            if cut is not None and sent + len(data) > cut:
                data = data[: cut - sent]
                if data and target is not None:
                    await target.send(data)
                return False
            sent += len(data)
            if target is not None and data:
                await target.send(data)
            return True

        length = _header(headers, "content-length")
        chunked = "chunked" in (_header(headers, "transfer-encoding") or "").lower()
        if chunked:
            while True:
                line = await source.receive_until(b"\r\n", 1024)
                size = int(line.split(b";")[0], 16)
                if not await out(line + b"\r\n"):
                    return False
                data = await source.receive_exactly(size + 2) if size else b""
                if size == 0:
                    trailer = b""
                    while (field := await source.receive_until(b"\r\n", 8192)) != b"":
                        trailer += field + b"\r\n"
                    return await out(trailer + b"\r\n")
                if not await out(data):
                    return False
        if length is not None:
            remaining = int(length)
            while remaining:
                data = await source.receive(min(remaining, _PIECE))
                remaining -= len(data)
                if not await out(data):
                    return False
            return True
        if until_close:
            while True:
                try:
                    data = await source.receive(_PIECE)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return True
                if not await out(data):
                    return False
        return True


@contextlib.contextmanager
def running_proxy(upstream: str, faults: Faults | None = None) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream``, on an event loop in a thread of its own."""
    proxy = FaultProxy(upstream, faults)
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        future, _ = portal.start_task(proxy.serve)
        try:
            yield proxy
        finally:
            future.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fault-injecting HTTP/1.1 proxy on 127.0.0.1")
    parser.add_argument("upstream", help="http://127.0.0.1:PORT")
    parser.add_argument("--cut-after", type=int, default=None, help="cut response bodies after this many bytes")
    parser.add_argument("--strip-range", action="store_true")
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream, Faults(cut_after=args.cut_after, strip_range=args.strip_range))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            url = await tg.start(proxy.serve)
            print(url, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(run)
    sys.exit(0)


if __name__ == "__main__":
    main()
