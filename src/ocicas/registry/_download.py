"""Blob downloads that survive a dropped connection: resumed with ``Range`` where they stopped.

:class:`ResumingRaw` is the registry's :class:`~ocicas._reader.RawBlob`. When the
body of a ``GET`` is cut (a transport error, or an end short of the size), it
asks again with ``Range: bytes=N-``, ``N`` being the bytes it already received,
and goes on: the :class:`~ocicas.BlobReader` above sees every byte once, so its
incremental hash simply continues. A registry that ignores ``Range`` (``200``,
the whole body again) has its first ``N`` bytes skipped, as containerd does; a
``206`` that starts elsewhere than ``N`` is refused. As in containerd, the
budget (:attr:`RetryPolicy.retries`) bounds consecutive failures *without
progress*: a body cut every few MiB still completes, a dead registry does not
hold the reader for ever. Waits back off (no wait after progress) and are
cancellable like any other. :meth:`ResumingRaw.readinto` (a directory put's
buffers) receives a long answer's body straight from the connection, past h11
(:func:`~ocicas.registry._net.open_body`), with the same resumes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from .._errors import BlobNotFoundError, InvalidError, OCICASError, RegistryError, RegistryUnreachableError
from .._reader import RawBlob
from .._threads import run_sync
from ._net import Body, open_body
from ._streams import release
from ._transport import RegistryClient, note_retry

__all__ = ["ResumingRaw", "note_retry"]

#: ``reopen(start)``: a new streamed answer for the bytes from ``start`` on.
Reopen = Callable[[int], Awaitable[httpx.Response]]
#: Bodies at least this long are received straight into the consumer's buffers by :meth:`ResumingRaw.readinto`,
#: past h11 (``_net.open_body``); their connection is then closed, not reused: a new one costs less than h11's
#: handling of a few MiB, on loopback; less and less next to the transfer itself on a slower network.
BYPASS_MIN = 4 << 20


def content_range_start(response: httpx.Response) -> tuple[int | None, int | None]:
    """``(first byte, total)`` of a ``206``'s ``Content-Range: bytes a-b/total`` (``None`` where not given)."""
    value = response.headers.get("content-range", "").strip()
    unit, _, rest = value.partition(" ")
    if unit.lower() != "bytes":
        return None, None
    span, _, total = rest.partition("/")
    first = span.partition("-")[0].strip()
    return (int(first) if first.isdigit() else None), (int(total) if total.strip().isdigit() else None)


class ResumingRaw(RawBlob):
    """A blob's bytes as a streamed HTTP answer, resumed with ``Range`` when the connection drops."""

    def __init__(
        self, response: httpx.Response, size: int, *, client: RegistryClient, what: str, reopen: Reopen
    ) -> None:
        super().__init__(size)
        self._client = client
        self._what = what  # "blob sha256:…"
        self._reopen = reopen
        self._response: httpx.Response | None = response
        self._iterator: AsyncIterator[bytes] | None = None
        self._body: Body | None = None  # the answer's body read past h11 (readinto)
        self._fresh = True  # nothing was read of the answer yet
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fetched = 0  # bytes received: handed out plus buffered
        self._skip = 0  # bytes still to drop from an answer that ignored Range
        self._failures = 0  # consecutive failures without progress
        self._closed = False
        #: Times this download resumed.
        self.retries = 0
        self._token = anyio.lowlevel.current_token()

    async def read(self, n: int) -> bytes:
        while self._buffered < n and self._fetched < self.size:
            piece = await self._next_piece()
            if not piece:
                break
            self._buffer.append(piece)
            self._buffered += len(piece)
            self._fetched += len(piece)
        buffer = self._buffer
        if self._buffered <= n:  # the usual case: all of it, joined once
            chunk = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            self._buffer, self._buffered = [], 0
            return chunk
        # the last piece overshot: only it is split, so the bytes are copied once
        last = buffer.pop()
        cut = len(last) - (self._buffered - n)
        buffer.append(last[:cut])
        chunk = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        self._buffer, self._buffered = [last[cut:]], len(last) - cut
        return chunk

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes: one piece of the answer as it came (never joined: a copy saved)."""
        buffer = self._buffer
        if buffer:
            piece = buffer.pop(0)
            self._buffered -= len(piece)
        else:
            if self._fetched >= self.size:
                return b""
            piece = await self._next_piece()
            self._fetched += len(piece)
        if len(piece) > n:  # only a piece larger than asked for is split
            buffer.insert(0, piece[n:])
            self._buffered += len(piece) - n
            piece = piece[:n]
        return piece

    def _open_fresh(self, response: httpx.Response) -> None:
        """On the first read of an answer: a long enough one is read past h11 (``_body``)."""
        if self._fresh:
            self._fresh = False
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) >= BYPASS_MIN:
                self._body = open_body(response)

    async def pour(self, buffer: memoryview, sink: Callable[[memoryview], None], limit: int) -> int | None:
        """Move up to ``limit`` next bytes into ``sink`` (fewer only at the end), resuming as :meth:`read` does.

        While the answer's body is read past h11 on a plain socket, a worker thread receives,
        and calls ``sink``, itself (:meth:`~ocicas.registry._net.Body.pour_blocking`): no
        event loop turn and no thread hop per buffer; a stall is waited out on the loop, the
        thread back in its pool. Other answers (TLS, short ones, one
        whose head must be skipped) are read with :meth:`readinto` and handed to ``sink`` in a
        worker thread. ``None``, having read nothing, if the first answer cannot be poured.
        """
        if not self._fetched and not self._buffer and self._response is not None:
            self._open_fresh(self._response)
            if self._body is None or not self._body.pourable:
                return None
        moved = 0
        # _fetched counts what is buffered too: the buffer is handed out before the end
        while moved < limit and not self._closed and (self._buffer or self._fetched < self.size):
            if self._response is None and not self._buffer:
                await self._resume()
                continue
            if self._response is not None:
                self._open_fresh(self._response)
            body = self._body
            if body is None or not body.pourable or self._skip or self._buffer:
                got = await self.readinto(buffer[: min(len(buffer), limit - moved)])  # resumes too
                if not got:
                    break
                try:
                    await run_sync(sink, buffer[:got])
                except BaseException:  # not handed over: counted as buffered, what a later read gives first
                    self._buffer.insert(0, bytes(buffer[:got]))
                    self._buffered += got
                    raise
                moved += got
                continue
            sock = body.open_pour()  # on the loop: the connection cannot close between the check and the dup
            if sock is None:
                continue  # read as above
            with sock:
                before = body.poured
                try:
                    await run_sync(body.pour_blocking, sock, buffer, sink, limit - moved)
                finally:
                    got = body.poured - before
                    self._fetched += got
                    moved += got
                if got:
                    self._failures = 0
                if body.would_block:  # a stall: waited out here, not in a worker thread of the pool
                    await body.wait_readable(sock)
                    if body.error is None:
                        continue
            if moved < limit and self._fetched < self.size:  # short: the body ended, failed, or was all sent
                await self._lost(body.error)  # None: a clean end before the size, a cut all the same
        return moved

    async def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` (fewer bytes only at the end), resuming as :meth:`read` does.

        A long enough answer not read from yet is received straight into ``buffer``
        (:func:`~ocicas.registry._net.open_body`); any other is copied in, piece by piece.
        """
        want = min(len(buffer), self.size - self._fetched + self._buffered)
        done = 0
        while done < want:
            if self._buffer:  # what read_some left over, or a piece httpx handed over (below)
                piece = self._buffer.pop(0)
                n = min(len(piece), want - done)
                buffer[done : done + n] = piece[:n]
                if n < len(piece):
                    self._buffer.insert(0, piece[n:])
                self._buffered -= n
                done += n
                continue
            if self._closed:
                break
            response = self._response
            if response is None:
                await self._resume()
                continue
            self._open_fresh(response)
            body = self._body
            if body is None:  # read through httpx, then copied in as buffered
                piece = await self._next_piece()
                if not piece:
                    break
                self._buffer.append(piece)
                self._buffered += len(piece)
                self._fetched += len(piece)
                continue
            try:
                if self._skip:  # an answer that ignored Range: its head lands in the buffer, then is overwritten
                    got = await body.readinto(buffer[done : done + min(self._skip, want - done)])
                    self._skip -= got
                else:
                    got = await body.readinto(buffer[done:want])
                    self._fetched += got
                    done += got
                    self._failures = 0 if got else self._failures
            except httpx.TransportError as exc:
                await self._lost(exc)
                continue
            if not got:  # a clean end before the size: the answer was cut all the same
                await self._lost(None)
        return done

    async def _next_piece(self) -> bytes:
        """The next piece of the body past what was received (``b""`` only once closed)."""
        while not self._closed:
            if self._response is None:
                await self._resume()
                continue
            try:
                if self._body is not None:  # read past h11 already (readinto): go on so
                    buffer = bytearray(min(self.size - self._fetched + self._skip, 1 << 20))
                    piece = bytes(memoryview(buffer)[: await self._body.readinto(memoryview(buffer))])
                else:
                    if self._iterator is None:
                        self._iterator = aiter(self._response.aiter_bytes())
                        self._fresh = False
                    piece = await anext(self._iterator, b"")
            except httpx.TransportError as exc:
                await self._lost(exc)
                continue
            if not piece:  # a clean end before the size: the answer was cut all the same
                await self._lost(None)
                continue
            if self._skip:
                dropped = min(self._skip, len(piece))
                self._skip -= dropped
                piece = piece[dropped:]
                if not piece:
                    continue
            self._failures = 0
            return piece
        return b""

    def _error(self, reason: str) -> RegistryUnreachableError:
        return RegistryUnreachableError(
            f"connection to {self._client.where} dropped while reading {self._what} at byte {self._fetched}: {reason}"
        )

    async def _lost(self, exc: httpx.TransportError | None) -> None:
        """The answer broke off: close it and wait (after a failure without progress), or give up."""
        await self._drop_response()
        reason = (str(exc) or type(exc).__name__) if exc is not None else "the answer ended early"
        policy = self._client.retry
        if self._failures >= policy.retries:
            if self._failures:
                reason += f" (gave up after {self._failures} retries without progress)"
            raise self._error(reason) from exc
        if self._failures:
            await anyio.sleep(policy.delay(self._failures - 1))
        self._failures += 1
        self.retries += 1
        note_retry(self._client)

    async def _resume(self) -> None:
        """Ask for the bytes from ``_fetched`` on; a registry that sends them all again has the head skipped."""
        start = self._fetched
        try:
            response = await self._reopen(start)
        except RegistryUnreachableError as exc:
            raise self._error(f"resuming failed: {exc}") from exc
        except RegistryError as exc:
            raise RegistryError(
                f"{self._what}: resuming at byte {start} failed: {exc}", status=exc.status, codes=exc.codes
            ) from exc
        try:
            status = response.status_code
            if status == 206:
                first, total = content_range_start(response)
                if first != start or (total is not None and total != self.size):
                    raise InvalidError(
                        f"{self._client.where} answered a request for bytes {start}- of {self._what} with "
                        f"Content-Range {response.headers.get('content-range')!r}: refusing to mix bytes"
                    )
                self._skip = 0
            elif status == 200:
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) != self.size:
                    raise InvalidError(
                        f"{self._client.where} sent {length} bytes of {self._what} when resuming, "
                        f"not its size {self.size}"
                    )
                self._skip = start  # Range ignored: the whole body again
            elif status == 404:
                raise BlobNotFoundError(f"{self._what} vanished from {self._client.where} while it was read")
            else:
                raise self._client.error(response, f"GET {response.request.url.path} (resuming at byte {start})")
        except OCICASError:
            await release(response)
            raise
        if self._closed:
            await release(response)
            return
        self._response, self._iterator = response, None

    async def _drop_response(self) -> None:
        self._body, self._fresh = None, True
        response, self._response = self._response, None
        iterator, self._iterator = self._iterator, None
        if response is not None:
            await release(response, iterator)

    async def aclose(self) -> None:
        self._closed = True
        self._buffer, self._buffered = [], 0
        await self._drop_response()

    def close_now(self) -> None:
        """From a finaliser: close the answer on its event loop, soon (closing a connection awaits)."""
        self._closed = True
        self._body = None
        response, self._response = self._response, None
        if response is None:
            return
        iterator = self._iterator

        async def close() -> None:
            try:
                await release(response, iterator)
            except Exception:
                pass

        native: Any = self._token.native_token
        try:
            if hasattr(native, "call_soon_threadsafe"):  # asyncio
                native.call_soon_threadsafe(lambda: native.create_task(close()))
            else:  # trio
                import trio.lowlevel

                native.run_sync_soon(lambda: trio.lowlevel.spawn_system_task(close))
        except RuntimeError:
            pass  # the loop has finished: the connection went with it
