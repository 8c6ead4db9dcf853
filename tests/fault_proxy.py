"""A loopback HTTP/1.1 proxy that breaks things on purpose, in front of a real registry.

:class:`FaultProxy` relays requests (keep-alive, ``Content-Length``, chunked and
until-close bodies) from ``127.0.0.1:<port>`` to an upstream server, and applies
the faults its :class:`Faults` asks for, to the requests they match:

- ``cut_after``: cut response bodies longer than that after as many bytes (the
  connection is closed there; ``cuts`` limits how many are cut, both ways);
- ``cut_request_after``: cut request bodies (uploads) after as many bytes: the
  upstream gets them and then the end of its input, and once it has answered (or
  closed: it is done with the request) both connections are reset;
- ``reset``: reset the next *n* matching connections instead of forwarding;
- ``fail``: answer the next matching requests with these statuses (``503``, ``500``)
  and ``Retry-After: 0``, without forwarding;
- ``stall``: hold the next *n* matching answers for ``stall_seconds`` after their head;
- ``strip_range``: forward without the ``Range`` header (a registry that ignores it).

It stands in for a network element, so it must cost little CPU next to the client
and the registry it sits between: each connection is served by a thread of its
own on blocking sockets with large buffers, and bodies of known length move from
socket to socket through a pipe with ``os.splice`` (the bytes never enter Python);
other bodies go through one reused buffer (``recv_into``/``sendall``), with the
GIL released in the system calls.

:func:`running_proxy` runs one in threads of its own (tests, on any backend);
``python tests/fault_proxy.py UPSTREAM --cut-after N`` runs one as a process
(benchmarks) and prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

_PIECE = 1 << 20
_HEAD_PIECE = 64 << 10
_MAX_HEAD = 64 << 10
#: ``os.splice`` is Linux only; elsewhere every body goes through the buffer.
_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = 1031
#: Socket buffers as large as the system allows (it caps them): fewer, larger moves per body (~20% less CPU).
_SOCKET_BUFFER = 4 << 20
#: How long a cut request's upstream has to notice the cut and answer (it always does at once).
_CUT_ANSWER_SECONDS = 10.0


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


class _Closed(Exception):
    """The peer ended its side of the connection (or sent a head too long)."""


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


def _abort(sock: socket.socket) -> None:
    """Make the coming close a reset (RST), not an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Source:
    """A blocking socket read from, with what was read past the last head or line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def read_until(self, delimiter: bytes, limit: int) -> bytes:
        """The bytes before ``delimiter`` (consumed too); :class:`_Closed` at the end or past ``limit``."""
        start = 0
        while (at := self.buffer.find(delimiter, start)) < 0:
            if len(self.buffer) > limit:
                raise _Closed
            start = max(0, len(self.buffer) - len(delimiter) + 1)
            data = self.sock.recv(_HEAD_PIECE)
            if not data:
                raise _Closed
            self.buffer += data
        line = bytes(self.buffer[:at])
        del self.buffer[: at + len(delimiter)]
        return line


class _Relay:
    """The bytes of a connection's bodies on their way: one buffer, and a pipe for ``os.splice``."""

    def __init__(self) -> None:
        self.buffer: bytearray | None = None
        self.pipe: tuple[int, int] | None = None
        self.pipe_size = 0

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def body(
        self,
        source: _Source,
        headers: list[tuple[str, str]],
        target: socket.socket | None,
        cut: int | None,
        *,
        until_close: bool = False,
    ) -> bool:
        """Relay a body framed by ``headers`` (to nowhere if no ``target``); ``False`` if cut after ``cut`` bytes."""
        body = _Body(self, source, target, cut)
        if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
            while True:
                line = source.read_until(b"\r\n", 1024)
                size = int(line.split(b";")[0], 16)
                if not body.send(line + b"\r\n"):
                    return False
                if size == 0:
                    trailer = b""
                    while (field := source.read_until(b"\r\n", 8192)) != b"":
                        trailer += field + b"\r\n"
                    return body.send(trailer + b"\r\n")
                if not body.move(size + 2):
                    return False
        length = _header(headers, "content-length")
        if length is not None:
            return body.move(int(length))
        if until_close:
            return body.move(None)
        return True


class _Body:
    """One body: counts what was relayed, and stops at the cut (having sent exactly ``cut`` bytes)."""

    def __init__(self, relay: _Relay, source: _Source, target: socket.socket | None, cut: int | None) -> None:
        self.relay, self.source, self.target, self.cut = relay, source, target, cut
        self.sent = 0

    def send(self, data: bytes | memoryview) -> bool:
        """Send ``data`` or as much of it as the cut leaves; ``False`` if it was cut."""
        whole = self.cut is None or self.sent + len(data) <= self.cut
        if not whole:
            assert self.cut is not None
            data = data[: self.cut - self.sent]
        self.sent += len(data)
        if self.target is not None and data:
            self.target.sendall(data)
        return whole

    def move(self, length: int | None) -> bool:
        """Relay ``length`` bytes from the source (all until it closes if ``None``); ``False`` if cut."""
        source = self.source
        if source.buffer:
            data = bytes(source.buffer if length is None else source.buffer[:length])
            del source.buffer[: len(data)]
            if length is not None:
                length -= len(data)
            if not self.send(data):
                return False
        if length is not None and self.target is not None and _SPLICE:
            return self._splice(length)
        if self.relay.buffer is None:
            self.relay.buffer = bytearray(_PIECE)
        view = memoryview(self.relay.buffer)
        while length is None or length > 0:
            got = source.sock.recv_into(view, _PIECE if length is None else min(length, _PIECE))
            if not got:
                if length is None:
                    return True
                raise _Closed
            if length is not None:
                length -= got
            if not self.send(view[:got]):
                return False
        return True

    def _splice(self, length: int) -> bool:
        """:meth:`move` of a known length, from socket to socket through a pipe."""
        relay, target = self.relay, self.target
        assert target is not None
        if relay.pipe is None:
            relay.pipe = os.pipe()
            try:
                relay.pipe_size = fcntl.fcntl(relay.pipe[1], _F_SETPIPE_SZ, _PIECE)
            except OSError:
                relay.pipe_size = 64 << 10
        read_end, write_end = relay.pipe
        allowed = length if self.cut is None else min(length, self.cut - self.sent)
        source, sink = self.source.sock.fileno(), target.fileno()
        left = allowed
        while left:
            got = os.splice(source, write_end, min(left, relay.pipe_size), flags=os.SPLICE_F_MOVE)
            if not got:
                raise _Closed
            left -= got
            while got:
                got -= os.splice(read_end, sink, got, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE * (left > 0))
        self.sent += allowed
        return allowed == length


class FaultProxy:
    """See the module documentation."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        host, _, port = upstream.partition("://")[2].rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.faults = faults or Faults()
        self.url = ""
        #: Client connections being served (a stalled one lives on after its client gave up).
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def listen(self) -> str:
        """Open the listening socket on a free port of 127.0.0.1; the proxy's URL."""
        listener = socket.create_server(("127.0.0.1", 0))
        self._listener, self._wake = listener, socket.socketpair()
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return self.url

    def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Accept connections, each served in a thread of its own, until :meth:`close` (listening first if need be)."""
        if self._listener is None:
            self.listen()
        assert self._listener is not None
        assert self._wake is not None
        if on_ready is not None:
            on_ready(self.url)
        listener, wake = self._listener, self._wake[0]
        poll = select.poll()
        poll.register(listener, select.POLLIN)
        poll.register(wake, select.POLLIN)
        try:
            while not self._closing.is_set():
                if listener.fileno() not in {fd for fd, _ in poll.poll()}:
                    continue
                with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                    client, _ = listener.accept()
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see _connect_upstream
                    thread = threading.Thread(target=self._connection, args=(client,), name="fault-proxy", daemon=True)
                    with self._lock:
                        if self._closing.is_set():
                            client.close()
                            break
                        self.connections += 1
                        self._sockets.add(client)
                        self._threads = {t for t in self._threads if t.is_alive()} | {thread}
                    thread.start()
        finally:
            listener.close()
            for end in self._wake:
                end.close()

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting, end every connection (stalled ones too) and wait for their threads."""
        with self._lock:
            self._closing.set()
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    self._wake[1].send(b"x")
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Block until every connection has ended (called from the test's thread, off its event loop)."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.connections, f"{self.connections} proxy connections still open"
        with self._lock:
            threads = list(self._threads)
        for thread in threads:  # each ends right after it counted itself out
            thread.join(max(0.0, deadline - time.monotonic()))

    def _connect_upstream(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)  # before connecting: window scale
            # a head and its body go out in separate sends: with Nagle's algorithm, a short body waits for the
            # peer's delayed ACK of the head (≈40 ms a small answer, a manifest's say); proxies set TCP_NODELAY
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(self.upstream)
        except OSError:
            sock.close()
            raise
        with self._lock:
            if self._closing.is_set():
                sock.close()
                raise _Closed
            self._sockets.add(sock)
        return sock

    def _close(self, sock: socket.socket, *, reset: bool = False) -> None:
        with self._lock:  # under the lock: :meth:`close` never shuts down a descriptor number reused since
            self._sockets.discard(sock)
            if reset:
                _abort(sock)
            sock.close()

    def _cut_upstream(self, sock: socket.socket) -> None:
        """End a request cut short: the upstream is done with it (it answered, or closed) before the client knows."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            poll.poll(_CUT_ANSWER_SECONDS * 1000)
        self._close(sock, reset=True)

    def _connection(self, client: socket.socket) -> None:
        relay = _Relay()
        upstream: list[socket.socket] = []
        reset = False
        try:
            self._serve_connection(_Source(client), upstream, relay)
        except _Reset:
            reset = True
        except (_Closed, OSError, ValueError, IndexError):  # IndexError, ValueError: a malformed head
            pass
        finally:
            relay.close()
            for sock in upstream:
                self._close(sock)
            self._close(client, reset=reset)
            with self._lock:
                self.connections -= 1

    def _serve_connection(self, reader: _Source, upstream: list[socket.socket], relay: _Relay) -> None:
        client = reader.sock
        up_reader: _Source | None = None
        while True:
            try:
                head = reader.read_until(b"\r\n\r\n", _MAX_HEAD)
            except (_Closed, OSError):
                return
            first, headers = _parse_head(head)
            method, path = first.split(" ")[:2]
            faults = self.faults
            fault = ""
            with self._lock:
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
            if fault.isdigit():
                relay.body(reader, headers, None, None)  # read and drop the request body
                body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}'
                answer = [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Retry-After", faults.retry_after),
                ]
                client.sendall(_head_bytes(f"HTTP/1.1 {fault} Injected", answer) + body)
                continue
            if up_reader is None:
                upstream.append(self._connect_upstream())
                up_reader = _Source(upstream[0])
            up_reader.sock.sendall(_head_bytes(first, headers))
            with self._lock:
                cut = faults.take_cut(
                    faults.cut_request_after if faults.matches(method, path) else None,
                    _header(headers, "content-length"),
                )
            if not relay.body(reader, headers, up_reader.sock, cut):
                with self._lock:
                    faults.log.append((method, path, "request cut"))
                self._cut_upstream(upstream.pop())
                raise _Reset
            with self._lock:
                faults.give_back(cut)
            response_head = up_reader.read_until(b"\r\n\r\n", _MAX_HEAD)
            status_line, response_headers = _parse_head(response_head)
            status = int(status_line.split(" ")[1])
            client.sendall(response_head + b"\r\n\r\n")
            if fault == "stall":
                with self._lock:
                    faults.log.append((method, path, fault))
                if self._closing.wait(faults.stall_seconds):
                    return
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                with self._lock:
                    faults.log.append((method, path, fault or str(status)))
                continue
            with self._lock:
                cut = faults.take_cut(
                    faults.cut_after if faults.matches(method, path) else None,
                    _header(response_headers, "content-length"),
                )
            complete = relay.body(up_reader, response_headers, client, cut, until_close=True)
            with self._lock:
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


@contextlib.contextmanager
def running_proxy(upstream: str, faults: Faults | None = None) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream``, served by threads of its own; all ended on exit."""
    proxy = FaultProxy(upstream, faults)
    proxy.listen()
    server = threading.Thread(target=proxy.serve, name="fault-proxy-server", daemon=True)
    server.start()
    try:
        yield proxy
    finally:
        proxy.close()
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fault-injecting HTTP/1.1 proxy on 127.0.0.1")
    parser.add_argument("upstream", help="http://127.0.0.1:PORT")
    parser.add_argument("--cut-after", type=int, default=None, help="cut response bodies after this many bytes")
    parser.add_argument("--strip-range", action="store_true")
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream, Faults(cut_after=args.cut_after, strip_range=args.strip_range))
    with contextlib.suppress(KeyboardInterrupt):
        proxy.serve(lambda url: print(url, flush=True))
    sys.exit(0)


if __name__ == "__main__":
    main()
