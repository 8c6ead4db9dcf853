"""Fork server for ``tests/test_crash.py``: writers that are SIGKILLed at random moments.

Run as ``python crash_worker.py LAYOUT JOURNAL``. It imports ocicas once, then
serves commands read from stdin, one per line, answering each with one line:

``live BACKEND``
    fork a *holder*: an engine that starts a ``put_blob`` whose source stalls
    forever once a partial temporary file is on disk, so another process has live
    temporary files in the layout. Answer: ``live PID TEMPDIR TEMPFILE SIZE``.
``trial N BACKEND SEED DELAY_US``
    fork a *writer* that puts images and tags them in a loop (journalling every
    reference change before and after it), wait until it signals that its engine
    is open, sleep ``DELAY_US`` microseconds and SIGKILL it. Answer:
    ``killed N PID ACTUAL_DELAY_US SIGNAL`` (``SIGNAL`` is 9 unless the writer died
    on its own, which the test treats as a failure).
``stop``
    SIGKILL the holder and exit. Answer: ``stopped``.

The journal gets one line per reference change: ``add? NAME DIGEST`` before and
``add NAME DIGEST`` after a put, ``del? NAME -`` and ``del NAME -`` around a
delete, each batch in one ``write``. A change whose ``?`` line is not followed by
its ack may or may not have happened; an acked one must have.
"""

from __future__ import annotations

import os
import random
import select
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence

import anyio

import ocicas
from ocicas import Descriptor, Engine

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
#: A layer many images share, so puts of present content (freshening) happen too.
SHARED_LAYER = random.Random(0).randbytes(300_000)
#: Chance that a layer is a large, multi-chunk one (1 to 2.5 MiB).
LARGE_LAYER_CHANCE = 0.1
READY_TIMEOUT = 30.0


def _journal(fd: int, lines: Sequence[tuple[str, str, str]]) -> None:
    os.write(fd, "".join(f"{kind} {name} {digest}\n" for kind, name, digest in lines).encode())


async def _put(engine: Engine, data: bytes, media_type: str) -> Descriptor:
    digest, size = await engine.put_blob(data)
    return Descriptor(media_type=media_type, digest=digest, size=size)


async def _put_image(engine: Engine, rng: random.Random) -> Descriptor:
    layers = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.3:
            data = SHARED_LAYER
        elif roll < 0.3 + LARGE_LAYER_CHANCE:
            data = rng.randbytes(rng.randint(1 << 20, 5 << 19))
        else:
            data = rng.randbytes(rng.randint(0, 30_000))
        layers.append(await _put(engine, data, LAYER))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config_digest, config_size = await engine.put_blob_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
        "layers": [layer.to_dict() for layer in layers],
    }
    digest, size = await engine.put_blob_json(manifest)
    return Descriptor(media_type=MANIFEST, digest=digest, size=size)


async def _write_forever(layout: str, seed: int, journal: int, ready: int) -> None:
    rng = random.Random(seed)
    counter = 0
    async with await ocicas.open_layout(layout) as engine:
        os.write(ready, b"r")
        os.close(ready)
        while True:
            manifest = await _put_image(engine, rng)
            roll = rng.random()
            if roll < 0.55:
                name = f"s{seed}-{counter}"
                counter += 1
                _journal(journal, [("add?", name, manifest.digest)])
                await engine.put_reference(name, manifest)
                _journal(journal, [("add", name, manifest.digest)])
            elif roll < 0.8:
                names = [f"s{seed}-{counter + i}" for i in range(rng.randint(1, 4))]
                counter += len(names)
                existing = await engine.list_references()
                victims = rng.sample(existing, min(len(existing), rng.randint(0, 2)))
                changes: dict[str, Descriptor | None] = {name: manifest for name in names}
                changes.update(dict.fromkeys(victims))
                _journal(journal, [("add?", n, manifest.digest) for n in names] + [("del?", v, "-") for v in victims])
                await engine.update_references(changes)
                _journal(journal, [("add", n, manifest.digest) for n in names] + [("del", v, "-") for v in victims])
            elif roll < 0.97:
                existing = await engine.list_references()
                if existing:
                    victim = rng.choice(existing)
                    _journal(journal, [("del?", victim, "-")])
                    await engine.delete_reference(victim)
                    _journal(journal, [("del", victim, "-")])
            else:
                await ocicas.gc(engine, grace_period=0)


async def _hold(layout: str, ready: int) -> None:
    """Keep a put_blob in flight forever, with a partial temporary file on disk."""

    def partial_temp_file() -> tuple[str, str, int] | None:
        for entry in os.scandir(layout):
            if entry.name.startswith(".ocicas-") and entry.is_dir(follow_symlinks=False):
                for inner in os.scandir(entry.path):
                    size = inner.stat(follow_symlinks=False).st_size
                    if size:
                        return entry.name, inner.name, size
        return None

    async def stalling_source() -> AsyncIterator[bytes]:
        for _ in range(64):  # until the engine has written part of it to a temporary file
            yield bytes(1 << 20)
            await anyio.sleep(0.01)
            found = partial_temp_file()
            if found is not None:
                while True:  # put_blob writes in a pipeline: report the size once the queued batches landed
                    await anyio.sleep(0.05)
                    settled = partial_temp_file()
                    if settled == found:
                        break
                    found = settled
                assert found is not None
                os.write(ready, " ".join(map(str, found)).encode())
                os.close(ready)
                await anyio.sleep_forever()
        raise RuntimeError("put_blob wrote no temporary file after 64 MiB")

    async with await ocicas.open_layout(layout) as engine:
        await engine.put_blob(stalling_source())


def _fork(layout: str, journal: int, backend: str, seed: int | None) -> tuple[int, int]:
    """Fork a writer (or, without ``seed``, the holder); return its pid and the read end of its readiness pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_end)
            if seed is None:
                anyio.run(_hold, layout, write_end, backend=backend)
            else:
                anyio.run(_write_forever, layout, seed, journal, write_end, backend=backend)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _await_ready(read_end: int) -> bytes:
    readable, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
    message = os.read(read_end, 4096) if readable else b""
    os.close(read_end)
    return message


def _kill(pid: int) -> int:
    """SIGKILL and reap a child of ours; return the signal that ended it (0 if it exited)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _reply(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _warm_up() -> None:
    """Import and initialise each backend here, once, rather than in every forked child (saves ~100 ms each)."""
    for backend in ("asyncio", "trio"):
        anyio.run(anyio.sleep, 0, backend=backend)  # no worker threads: this process forks


def main(layout: str, journal_path: str) -> None:
    _warm_up()
    journal = os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # inherited by the writers
    holder = None
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "live":
            holder, read_end = _fork(layout, journal, command[1], None)
            _reply(f"live {holder} {_await_ready(read_end).decode()}")
        elif command[0] == "trial":
            number, backend, seed, delay_us = command[1], command[2], command[3], int(command[4])
            pid, read_end = _fork(layout, journal, backend, int(seed))
            ready = _await_ready(read_end)
            start = time.monotonic()
            if ready:
                time.sleep(delay_us / 1e6)
            actual = int((time.monotonic() - start) * 1e6)
            _reply(f"killed {number} {pid} {actual if ready else -1} {_kill(pid)}")
        elif command[0] == "stop":
            if holder is not None:
                _kill(holder)
            _reply("stopped")
            return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
