"""put_blob of an anyio file over a local regular file: the kernel copies it (``_dir/clone.py``)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import ocicas
from ocicas import Digest
from ocicas._dir.clone import LOCAL_MIN, METHODS, CopyMethod, KernelCopy
from tests.blobfiles import payload, temp_files

pytestmark = pytest.mark.anyio


def _digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def _stored(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs/sha256").iterdir()}


class Copies:
    """The byte counts of every kernel copy made (whether a put took the kernel's path), and what to do after each,
    in the put's worker thread."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.after: Callable[[], object] | None = None


@pytest.fixture
def kernel_copies(monkeypatch: pytest.MonkeyPatch) -> Copies:
    copies = Copies()
    copy = KernelCopy.copy

    def counted(self: KernelCopy, offset: int, count: int) -> int:
        n = copy(self, offset, count)
        copies.counts.append(n)
        if copies.after is not None:
            copies.after()
        return n

    monkeypatch.setattr(KernelCopy, "copy", counted)
    return copies


@pytest.fixture
async def layout(tmp_path: Path) -> Path:
    await ocicas.create_layout(tmp_path / "layout")
    return tmp_path / "layout"


async def test_the_kernel_copies_an_anyio_file_from_its_position_and_leaves_it_at_the_end(
    tmp_path: Path, layout: Path, kernel_copies: Copies
) -> None:
    data = payload(2 * LOCAL_MIN + 12_345)
    (tmp_path / "source").write_bytes(data)
    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "rb") as f:
        assert await f.read(1000) == data[:1000]  # the buffered file has read ahead of its position
        assert await engine.put_blob(f) == (_digest(data[1000:]), len(data) - 1000)
        assert await f.tell() == len(data)
        assert await f.read() == b""
    assert sum(kernel_copies.counts) == len(data) - 1000
    assert _stored(layout) == {_digest(data[1000:]).encoded: data[1000:]}
    assert temp_files(layout) == []


@pytest.mark.parametrize("mode", ["rb", "r+b", "rb-unbuffered"])
async def test_every_binary_readable_mode_takes_the_kernel_path(
    tmp_path: Path, layout: Path, kernel_copies: Copies, mode: str
) -> None:
    data = payload(LOCAL_MIN)
    (tmp_path / "source").write_bytes(data)
    path = tmp_path / "source"
    opened = {
        "rb": lambda: anyio.open_file(path, "rb"),
        "r+b": lambda: anyio.open_file(path, "r+b"),
        "rb-unbuffered": lambda: anyio.open_file(path, "rb", buffering=0),
    }
    async with await ocicas.open_layout(layout) as engine, await opened[mode]() as f:
        assert await engine.put_blob(f, expected_digest=_digest(data), expected_size=len(data)) == (
            _digest(data),
            len(data),
        )
    assert sum(kernel_copies.counts) == len(data)
    assert _stored(layout) == {_digest(data).encoded: data}


@pytest.mark.parametrize(
    ("expected_size", "wrong_digest", "error"),
    [
        (LOCAL_MIN + 99, False, ocicas.SizeMismatchError),  # the file is longer
        (LOCAL_MIN + 101, False, ocicas.SizeMismatchError),  # the file is shorter
        (LOCAL_MIN + 100, True, ocicas.DigestMismatchError),
    ],
)
async def test_a_file_that_fails_its_check_stores_nothing_and_keeps_its_position(
    tmp_path: Path,
    layout: Path,
    kernel_copies: Copies,
    expected_size: int,
    wrong_digest: bool,
    error: type[Exception],
) -> None:
    data = payload(LOCAL_MIN + 100)
    (tmp_path / "source").write_bytes(data)
    expected = _digest(data[:-1] + b"!") if wrong_digest else _digest(data)
    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "rb") as f:
        with pytest.raises(error):
            await engine.put_blob(f, expected_digest=expected, expected_size=expected_size)
        assert await f.tell() == 0
    assert sum(kernel_copies.counts) == min(len(data), expected_size + 1)  # one byte more than expected, at most
    assert _stored(layout) == {}
    assert temp_files(layout) == []


async def test_what_the_kernel_cannot_copy_is_read_as_a_stream(
    tmp_path: Path, layout: Path, kernel_copies: Copies
) -> None:
    small = payload(LOCAL_MIN - 1)
    (tmp_path / "small").write_bytes(small)
    tail = payload(LOCAL_MIN + 10)
    (tmp_path / "tail").write_bytes(tail)
    piped = payload(LOCAL_MIN + 20)
    read_end, write_end = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write_end, piped), os.close(write_end)))  # type: ignore[func-returns-value]
    feeder.start()
    try:
        async with await ocicas.open_layout(layout) as engine:
            async with await anyio.open_file(tmp_path / "small", "rb") as f:
                assert await engine.put_blob(f) == (_digest(small), len(small))
            async with await anyio.open_file(tmp_path / "tail", "rb") as f:
                await f.seek(11)  # fewer than LOCAL_MIN bytes left
                assert await engine.put_blob(f) == (_digest(tail[11:]), len(tail) - 11)
            async with anyio.wrap_file(os.fdopen(read_end, "rb")) as f:
                read_end = -1
                assert await engine.put_blob(f) == (_digest(piped), len(piped))
            async with await anyio.open_file(tmp_path / "tail", "r", encoding="latin-1") as text:
                with pytest.raises(TypeError, match="text mode"):
                    await engine.put_blob(text)  # type: ignore[arg-type]
    finally:
        feeder.join()
        if read_end >= 0:
            os.close(read_end)
    assert kernel_copies.counts == []
    assert _stored(layout) == {_digest(b).encoded: b for b in (small, tail[11:], piped)}


async def test_a_cancelled_kernel_copy_leaves_nothing_and_the_file_usable(
    tmp_path: Path, layout: Path, kernel_copies: Copies
) -> None:
    data = payload(40 << 20)  # three copy steps of 16 MiB
    (tmp_path / "source").write_bytes(data)

    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "rb") as f:
        with anyio.CancelScope() as scope:

            def cancel_after_the_first_step() -> None:  # from the put's worker thread
                if sum(kernel_copies.counts) >= 16 << 20:
                    anyio.from_thread.run_sync(scope.cancel)

            kernel_copies.after = cancel_after_the_first_step
            await engine.put_blob(f)
        assert scope.cancelled_caught
        kernel_copies.after = None
        assert 16 << 20 <= sum(kernel_copies.counts) < len(data)
        assert _stored(layout) == {}
        assert temp_files(layout) == []
        assert await f.tell() == 0
        assert await engine.put_blob(f) == (_digest(data), len(data))  # the caller's descriptor is untouched
    assert _stored(layout) == {_digest(data).encoded: data}


async def test_readers_of_something_else_than_a_plain_file_are_read_as_streams(
    tmp_path: Path, layout: Path, kernel_copies: Copies
) -> None:
    data = payload(LOCAL_MIN + 30)
    member = payload(LOCAL_MIN + 40)[::-1]
    with tarfile.open(tmp_path / "archive.tar", "w") as tar:
        (tmp_path / "member").write_bytes(member)
        tar.add(tmp_path / "member", arcname="member")
    async with await ocicas.open_layout(layout) as engine:
        async with anyio.wrap_file(io.BufferedReader(io.BytesIO(data))) as f:
            assert await engine.put_blob(f) == (_digest(data), len(data))
        with tarfile.open(tmp_path / "archive.tar") as tar:
            extracted = tar.extractfile("member")  # a window on the archive's file, with the archive's fileno()
            assert extracted is not None
            async with anyio.wrap_file(extracted) as f:
                assert await engine.put_blob(f) == (_digest(member), len(member))
    assert kernel_copies.counts == []
    assert _stored(layout) == {_digest(data).encoded: data, _digest(member).encoded: member}


async def test_bytes_written_to_a_files_buffer_are_stored(tmp_path: Path, layout: Path, kernel_copies: Copies) -> None:
    data = payload(LOCAL_MIN + 50)
    (tmp_path / "source").write_bytes(data)
    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "r+b") as f:
        await f.read(100)
        await f.write(b"X" * 10)  # in the buffer only
        await f.seek(0)
        expected = data[:100] + b"X" * 10 + data[110:]
        assert await engine.put_blob(f) == (_digest(expected), len(expected))
    assert sum(kernel_copies.counts) == len(expected)
    assert _stored(layout) == {_digest(expected).encoded: expected}


async def test_a_file_closed_by_its_owner_during_the_put_is_still_stored(
    tmp_path: Path, layout: Path, kernel_copies: Copies
) -> None:
    data = payload(40 << 20)
    (tmp_path / "source").write_bytes(data)
    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "rb") as f:
        kernel_copies.after = f.wrapped.close  # the owner closes its file: the put copies from its own descriptor
        assert await engine.put_blob(f) == (_digest(data), len(data))
        assert f.wrapped.closed
        assert sum(kernel_copies.counts) == len(data)
    assert _stored(layout) == {_digest(data).encoded: data}
    assert temp_files(layout) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_kernel_copy_reads_its_source_from_its_base(tmp_path: Path, method: CopyMethod) -> None:
    data = payload(3 << 20)
    (tmp_path / "a").write_bytes(data)
    source = os.open(tmp_path / "a", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    base, end = 12_345, (2 << 20) + 7
    try:
        copier = KernelCopy(source, target, (method,), base=base)
        position = 0
        while position < end:
            position += copier.copy(position, end - position)
        assert copier.method == method
        assert copier.copy(len(data) - base, 1 << 20) == 0  # the source's end, seen from the base
    finally:
        os.close(source)
        os.close(target)
    assert (tmp_path / "b").read_bytes() == data[base : base + end]


async def test_a_binary_source_with_a_text_attribute_named_wrapped_is_accepted(engine: ocicas.Engine) -> None:
    class Encoding:
        """Reads a text stream, encoded: its ``wrapped`` is text, its ``read`` returns bytes."""

        def __init__(self, text: str) -> None:
            self.wrapped = io.StringIO(text)

        async def read(self, size: int = -1, /) -> bytes:
            return self.wrapped.read(size).encode()

    assert await engine.put_blob(Encoding("héllo")) == (_digest("héllo".encode()), 6)
