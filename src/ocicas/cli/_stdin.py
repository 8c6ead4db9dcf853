"""Reading stdin without blocking the event loop, and without blocking an exit.

A blocking read of a pipe cannot be cancelled. It runs in a daemon thread of its
own (not in anyio's worker threads, which an exiting interpreter waits for), on
the raw file descriptor (a buffered reader's lock would deadlock interpreter
shutdown), and hands chunks over through a memory stream with a plain callback
on the event loop (no coroutine that a loop shutting down would leave unawaited),
at most two chunks ahead of the reader. When the reader goes away, the thread
ends at its next hand-over, or with the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

__all__ = ["stdin_chunks"]

#: Chunks read ahead of the consumer.
_AHEAD = 2


def _read_up_to(fd: int, size: int) -> bytes:
    """Read until ``size`` bytes or end of file (a pipe hands out at most its buffer per read)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.read(fd, size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def stdin_chunks(chunk_size: int, fd: int = 0) -> AsyncIterator[bytes]:
    """Yield stdin in chunks of up to ``chunk_size`` bytes until end of file."""
    send, receive = anyio.create_memory_object_stream[bytes | OSError](_AHEAD)
    slots = threading.Semaphore(_AHEAD)  # so send_nowait always has room
    token = anyio.lowlevel.current_token()

    def pump() -> None:
        try:
            while True:
                slots.acquire()
                try:
                    item: bytes | OSError = _read_up_to(fd, chunk_size)
                except OSError as exc:
                    item = exc
                anyio.from_thread.run_sync(send.send_nowait, item, token=token)
                if not item or isinstance(item, OSError):
                    return
        except BaseException:
            return  # the reader closed its end, or the event loop is gone

    thread = threading.Thread(target=pump, name="ocicas stdin reader", daemon=True)
    await anyio.to_thread.run_sync(thread.start)
    with send, receive:
        async for item in receive:
            slots.release()
            if isinstance(item, OSError):
                raise item
            if not item:
                return
            yield item
