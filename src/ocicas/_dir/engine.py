"""The directory engine: an OCI image layout on a local filesystem.

On disk (image-spec image-layout 1.0/1.1)::

    oci-layout            {"imageLayoutVersion":"1.0.0"}
    index.json            image index; references are entries annotated
                          org.opencontainers.image.ref.name
    blobs/<alg>/<hex>     content, named by its digest
    .ocicas-<random>/     this engine's temporary files, flock-held while it lives

This module composes the parts: :mod:`.put` (the put pipeline), :mod:`.index`
(``index.json``) and :mod:`.fs` (file-system primitives). Every write goes to a
temporary file inside the layout (same filesystem), is fsynced, renamed into
place and its directory fsynced. Blob paths are only ever built from validated
digests and opened relative to directory descriptors with ``O_NOFOLLOW``, so a
symlink cannot lead outside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import os
import secrets
import stat
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import ClassVar, Final, TypeVar

import anyio

from .._checks import check_bool, check_path
from .._descriptor import Descriptor
from .._digest import _ENCODED, SUPPORTED_ALGORITHMS, Digest, Verifier
from .._engine import GC_SCAN_BATCH, BlobInfo, Engine
from .._errors import (
    BlobNotFoundError,
    InvalidError,
    LayoutExistsError,
    LayoutNotFoundError,
    ReferenceNotFoundError,
)
from .._graph import is_node, sorted_in_pieces
from .._layout_format import BrokenRoot, IndexDocument, layout_file, parse_layout_file
from .._reader import BlobReader, RawBlob
from .._source import BlobSource
from .._tagging import check_closure, complete_at_hand, strong_children
from .._tasks import task_group
from .._threads import POLL_INTERVAL, QuickLimiter, checkpoint, metadata_hops, run_sync, shared, wait_for
from .clone import clone_blob, put_local_file
from .fs import (
    DIR_FLAGS,
    READ_FLAGS,
    blobs_held,
    made_dirs,
    open_blob,
    open_dir,
    open_regular,
    read_open,
    read_small,
    remove_temp_dir,
    try_flock,
    unlink_unused,
    write_all,
    write_file,
)
from .index import IndexStore
from .put import LentRaw, PendingBlob

__all__ = ["TEMP_PREFIX", "DirEngine", "create_layout", "open_layout"]

_S = TypeVar("_S", bound=str)

#: Prefix of this library's temporary directories inside a layout.
TEMP_PREFIX: Final = ".ocicas-"
_LAYOUT_FILE_LIMIT: Final = 64 << 10
#: Lease files, in an engine's temporary directory: one digest a line.
_LEASE_PREFIX: Final = "lease-"
_LEASE_LIMIT: Final = 64 << 20
#: Attempts at creating the temporary directory when another engine's gc() removes it under us.
_TEMP_ATTEMPTS: Final = 8
#: A tag's content check reads this many bytes of nodes, and stats their leaves, in one thread hop (``_closure_heads``).
_LOOK_BUDGET: Final = 16 << 20
#: The largest node it reads so.
_LOOK_NODE: Final = 1 << 20
#: Blobs stat-ed or touched per lock hold and between cancellation checks.
_BATCH: Final = 256
#: Blobs a collector deletes per exclusive hold of the lock (a round), in up to ``_SWEEP_THREADS`` threads at
#: once, each given a contiguous slice (directory order) of at least ``_SWEEP_SLICE`` blobs.
_ROUND: Final = 1024
#: Measured: 8 threads took gc to 0.59 of umoci's time, not 0.68, but event-loop lag during a gc to p99 7.8 ms,
#: not 5.8-6.6: more threads take more turns on the GIL with the loop.
_SWEEP_THREADS: Final = 4
#: A sweep that held the lock this long (seconds) leaves it free between two rounds for longer than a waiting
#: writer's poll interval: ``flock`` does not queue, and a writer would otherwise seldom hit the gap.
_SWEEP_FAIRNESS: Final = 0.5
_SWEEP_SLICE: Final = 32
#: A walk's fast path reads up to this many bytes of nodes in one thread hop (``_read_nodes``), each under 1 MiB.
_NODES_BUDGET: Final = 8 << 20
_NODE_LIMIT: Final = 1 << 20
#: Errors of a blob file that vanished or was swapped for a symlink or special file.
_VANISHED: Final = frozenset({errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.ESPIPE, errno.EISDIR})


async def create_layout(path: str | os.PathLike[str]) -> None:
    """Create a new, empty OCI image layout at ``path``.

    Parent directories are created as needed; :class:`~ocicas.LayoutExistsError`
    (a ``FileExistsError``) if ``path`` already exists.
    """
    await run_sync(_create_layout, check_path(path))


def _create_layout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise LayoutExistsError(f"cannot create layout: {str(path)!r} already exists") from None
    fd = os.open(path, DIR_FLAGS)
    try:
        os.mkdir("blobs", dir_fd=fd)
        blobs = os.open("blobs", DIR_FLAGS, dir_fd=fd)
        try:
            os.mkdir("sha256", dir_fd=blobs)
            os.fsync(blobs)
        finally:
            os.close(blobs)
        write_file(fd, "index.json", IndexDocument.empty().serialize())
        write_file(fd, "oci-layout", layout_file())  # last: its presence marks a complete layout
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_layout(path: str | os.PathLike[str], *, direct_writes: bool = False) -> DirEngine:
    """Open the OCI image layout at ``path`` as an :class:`Engine`.

    With ``direct_writes``, puts of 4 MiB or more write past the page cache
    (``O_DIRECT``, where the file system takes it): no copy into fresh kernel memory
    and no blob pages crowding the cache, but the first read of such a blob comes
    from the disk (see ``docs/guide/embedding.md``).

    Raises :class:`~ocicas.LayoutNotFoundError` if ``path`` does not exist and
    :class:`~ocicas.InvalidError` if it is not a valid layout (no or a wrong
    ``oci-layout``, an unreadable ``index.json``, no ``blobs`` directory), or if
    ``path`` is empty.
    """
    path, direct = check_path(path), check_bool(direct_writes, "direct_writes")
    engine = await run_sync(DirEngine._open, path)
    engine._direct_writes = direct
    return engine


def _readable_node(descriptor: Descriptor) -> bool:
    """Whether a tag's one look reads ``descriptor``: a stored node, not too large."""
    return descriptor.data is None and is_node(descriptor) and descriptor.size < _LOOK_NODE


def _open_flocked(root: int, operation: int) -> tuple[int, bool]:
    """Open ``blobs/`` and try its ``flock``: the open descriptor, and whether it is locked (one hop)."""
    blobs = open_dir("blobs", root, "blobs")
    try:
        return blobs, try_flock(blobs, operation)
    except BaseException:
        os.close(blobs)
        raise


def _regular_stat(alg: int, name: str) -> os.stat_result | None:
    """The ``lstat`` of a blob path, or ``None`` if nothing or no regular file is there.

    The stat comes first, so a device or FIFO at a blob path is never opened.
    """
    try:
        st = os.stat(name, dir_fd=alg, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _head(alg: int, name: str, n: int) -> bytes | None:
    """The first ``n`` bytes of a blob file (unverified, for sniffing), or ``None`` if it went meanwhile."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=alg)
    except OSError as exc:
        if exc.errno in _VANISHED:
            return None  # gone, or swapped for something else meanwhile
        raise
    try:
        return os.pread(fd, n, 0)
    except OSError as exc:
        if exc.errno not in _VANISHED:
            raise
        return b""
    finally:
        os.close(fd)


class _Scan:
    """A layout's blob listing, read a batch at a time (each in a worker thread): ``close()`` it."""

    def __init__(self, engine: DirEngine, wanted: Callable[[str], bool]) -> None:
        self._engine = engine
        self._wanted = wanted
        self._algorithms = sorted(SUPPORTED_ALGORITHMS)
        self._open: tuple[str, int, os._ScandirIterator[str]] | None = None

    def next_batch(self) -> tuple[list[str], bool]:
        """The digests ``wanted`` accepts among the next ``GC_SCAN_BATCH`` entries, and whether more may follow."""
        out: list[str] = []
        budget = GC_SCAN_BATCH
        while budget:
            if self._open is None:
                if not self._algorithms:
                    return out, False
                algorithm = self._algorithms.pop(0)
                try:
                    alg = self._engine._alg_dir(algorithm)
                except FileNotFoundError:
                    continue
                try:
                    self._open = (algorithm, alg, os.scandir(alg))
                except BaseException:
                    os.close(alg)
                    raise
            algorithm, _, entries = self._open
            match = _ENCODED[algorithm].fullmatch
            prefix = f"{algorithm}:"
            wanted = self._wanted
            found = list(itertools.islice(entries, budget))
            budget -= len(found)
            out += [
                digest
                for entry in shared(found)
                if match(entry.name) and entry.is_file(follow_symlinks=False) and wanted(digest := prefix + entry.name)
            ]
            if budget:  # this directory is done
                self.close()
        return out, bool(self._open or self._algorithms)

    def close(self) -> None:
        if self._open is not None:
            _, alg, entries = self._open
            self._open = None
            try:
                entries.close()
            finally:
                os.close(alg)


class _AlgDirs:
    """Algorithm directories of a layout, each opened once for a worker thread's pass over blobs; ``close()`` them."""

    def __init__(self, engine: DirEngine) -> None:
        self._engine = engine
        self._dirs: dict[str, int | None] = {}

    def get(self, digest: Digest) -> int | None:
        """The open directory of ``digest``'s algorithm, or ``None`` if it cannot be opened."""
        algorithm = digest.algorithm
        if algorithm not in self._dirs:
            try:
                self._dirs[algorithm] = self._engine._alg_dir(algorithm)
            except OSError:
                self._dirs[algorithm] = None
        return self._dirs[algorithm]

    def read_node(self, node: Descriptor) -> bytes | None:
        """A small node's bytes, read whole and verified, in few system calls; ``None`` if anything is odd
        (the usual read then reports it, exactly)."""
        alg = self.get(node.digest)
        if alg is None:
            return None
        name = node.digest.encoded
        try:
            st = _regular_stat(alg, name)  # the type first: a device or FIFO at a blob path is never opened
            if st is None or st.st_size != node.size:
                return None
            fd = os.open(name, READ_FLAGS, dir_fd=alg)
            try:
                data = os.read(fd, node.size + 1)  # whole: a regular file reads short only at its end
            finally:
                os.close(fd)
            verifier = Verifier(node.digest, node.size)
            verifier.update(data)
            verifier.verify()
        except Exception:
            return None
        return data

    def close(self) -> None:
        for opened in self._dirs.values():
            if opened is not None:
                os.close(opened)
        self._dirs.clear()


def _read_leases(temp: int) -> set[Digest]:
    """The digests of the live leases in the temporary directory open as ``temp``."""
    out: set[Digest] = set()
    with os.scandir(temp) as entries:
        names = [e.name for e in entries if e.name.startswith(_LEASE_PREFIX)]
    for name in names:
        try:
            fd = open_regular(name, temp, f"lease {name}")
        except (FileNotFoundError, InvalidError):
            continue
        try:
            if try_flock(fd, fcntl.LOCK_EX):
                continue  # nobody holds it: the lease ended, or its process died
            for line in read_open(fd, _LEASE_LIMIT, f"lease {name}")[1].decode("ascii", "replace").split():
                try:
                    out.add(Digest(line))
                except InvalidError:
                    continue  # a line cut short: the put it records did not finish
        finally:
            os.close(fd)
    return out


class _FileRaw(RawBlob):
    """A blob file open for reading."""

    blocking: ClassVar[bool] = True

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(size)
        self._fd = fd
        self._lock = threading.Lock()  # close_now may come from a finaliser in another thread

    def read_blocking(self, n: int) -> bytes:
        return os.read(self._fd, n)

    def fileno(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    def close_now(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # never blocks on a regular file opened for reading


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove_suspect_dir(blobs: int, algorithm: str, what: str) -> None:
    """Remove ``blobs/<algorithm>``, suspect, to make it anew; refuse if blobs rely on it already."""
    try:
        os.rmdir(algorithm, dir_fd=blobs)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise OSError(
            exc.errno,
            f"{what} may not survive a crash (an fsync of blobs/ failed after this process made it) and another "
            "process has put blobs into it, so it cannot be made anew: no blob was stored",
        ) from exc


class DirEngine(Engine):
    """An :class:`Engine` over an OCI image layout directory. Open one with :func:`open_layout`."""

    def __init__(self, path: Path, root_fd: int) -> None:
        self.path = path
        self._root = root_fd
        self._temp_fd: int | None = None
        self._temp_name: str | None = None
        self._temp_lock = threading.Lock()
        # blobs/<algorithm> -> the (device, inode) of the directory whose entry an fsync of blobs/ covered
        self._covered: dict[str, tuple[int, int]] = {}
        self._direct_writes = False  # large puts write with O_DIRECT (open_layout's direct_writes)
        self._index = IndexStore(root_fd, repr(str(path)), self._temp_dir)
        self._leases: dict[str, int] = {}  # live leases: their files, open and flock-held
        self._shared_flock: int | None = None  # blobs/, flock-held shared for the shared holders in this process
        self._shared_holders = 0
        self._flocking: anyio.Event | None = None  # while the first shared holder takes the flock

    @classmethod
    def _open(cls, path: Path) -> DirEngine:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LayoutNotFoundError(f"no layout at {str(path)!r}: path does not exist") from None
        except NotADirectoryError:
            raise InvalidError(f"not a layout: {str(path)!r} is not a directory") from None
        try:
            try:
                parse_layout_file(read_small(fd, "oci-layout", _LAYOUT_FILE_LIMIT, "oci-layout")[1])
            except FileNotFoundError:
                raise InvalidError(f"not a layout: {str(path)!r} has no oci-layout file") from None
            try:
                os.close(open_dir("blobs", fd, "blobs"))
            except FileNotFoundError:
                raise InvalidError(f"not a layout: {str(path)!r} has no blobs directory") from None
            engine = cls(path, fd)
            try:
                engine._index.load()
            except BaseException:
                engine._index.release()
                raise
            return engine
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        return f"<DirEngine {str(self.path)!r}{' closed' if self.closed else ''}>"

    # -- helpers (worker threads) -------------------------------------------------------

    def _alg_dir(self, algorithm: str, *, create: bool = False) -> int:
        """``blobs/<algorithm>``, open. With ``create`` (a put, about to rename its blob in): made if absent, and
        its own entry known durable (:meth:`_durable_alg_dir`)."""
        blobs = open_dir("blobs", self._root, "blobs")
        try:
            try:
                alg: int | None = open_dir(algorithm, blobs, f"blobs/{algorithm}")
            except FileNotFoundError:
                if not create:
                    raise
                alg = None
            if create:
                return self._durable_alg_dir(blobs, algorithm, alg)
            assert alg is not None  # not found raised above
            return alg
        finally:
            os.close(blobs)

    def _durable_alg_dir(self, blobs: int, algorithm: str, alg: int | None) -> int:
        """``blobs/<algorithm>`` (``alg``, or made if ``None``) once an fsync of ``blobs/`` covers its entry.

        A blob renamed into a directory whose own entry is lost in a crash is lost
        with it, however well its rename was synced. So until one succeeds, each
        engine's puts into a directory it has not covered yet wait for an fsync of
        ``blobs/`` begun after they found or made it, one at a time in the process
        (:class:`~.fs.MadeDirs`). If that fsync fails, the put raises an ``OSError``
        before its blob is renamed in. A directory made here whose fsync failed stays
        suspect (a later fsync cannot tell whether the failed writeback was lost): the
        next put removes it, while still empty, and makes it anew; one that another
        process has put blobs into meanwhile is left as it is, and puts into it fail.
        One made by another process is trusted to the first fsync that succeeds.
        """
        what = f"blobs/{algorithm}"
        state = made_dirs(blobs)
        try:
            if alg is not None and algorithm not in state.suspect and self._covered.get(algorithm) == _identity(alg):
                return alg
            wait_for(lambda: state.lock.acquire(blocking=False))
            try:
                if alg is not None:  # reopened: the holder before may have made it anew
                    os.close(alg)
                    alg = None
                with contextlib.suppress(FileNotFoundError):
                    alg = open_dir(algorithm, blobs, what)
                if alg is not None and algorithm not in state.suspect:
                    if self._covered.get(algorithm) == _identity(alg):  # another put of this engine just did
                        return alg
                else:
                    if alg is not None:
                        os.close(alg)
                        alg = None
                        _remove_suspect_dir(blobs, algorithm, what)
                    with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                        os.mkdir(algorithm, 0o755, dir_fd=blobs)
                    state.suspect.add(algorithm)
                    made_dirs.keep(state, True)
                    alg = open_dir(algorithm, blobs, what)
                try:
                    os.fsync(blobs)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"syncing blobs/, which holds {what}, failed ({exc.strerror}): no blob was stored"
                    ) from exc
                state.suspect.discard(algorithm)
                made_dirs.keep(state, bool(state.suspect))
                self._covered[algorithm] = _identity(alg)
                return alg
            finally:
                state.lock.release()
        except BaseException:
            if alg is not None:
                os.close(alg)
            raise

    def _temp_dir(self) -> int:
        """This engine's flock-held temporary directory, created on first use."""
        with self._temp_lock:
            if self._temp_fd is not None:
                return self._temp_fd
            for _ in range(_TEMP_ATTEMPTS):
                name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                os.mkdir(name, 0o700, dir_fd=self._root)
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=self._root)
                except FileNotFoundError:  # another engine's gc() took it for stale before we opened it: try again
                    continue
                except BaseException:  # EMFILE, say: leave no directory behind for each failed attempt
                    with contextlib.suppress(OSError):
                        os.rmdir(name, dir_fd=self._root)
                    raise
                try:
                    locked = try_flock(fd, fcntl.LOCK_EX)
                    st = os.fstat(fd)
                    try:
                        still_ours = os.stat(name, dir_fd=self._root, follow_symlinks=False).st_ino == st.st_ino
                    except FileNotFoundError:
                        still_ours = False
                except BaseException:
                    os.close(fd)
                    raise
                # another engine's gc() may have locked or removed it between mkdir and flock: try again
                if locked and still_ours and st.st_nlink > 0:
                    self._temp_fd, self._temp_name = fd, name
                    return fd
                os.close(fd)
            raise OSError(errno.EAGAIN, f"could not create a temporary directory in {str(self.path)!r}")

    def _by_algorithm(self, digests: Sequence[_S]) -> Iterator[tuple[int, int, list[_S]]]:
        """Group digests by algorithm, yielding each group with its open directory and where file names start."""
        groups: dict[str, list[_S]] = {}
        for digest in digests:
            algorithm = digest[: digest.find(":")]
            group = groups.get(algorithm)
            if group is None:
                group = groups[algorithm] = []
            group.append(digest)
        for algorithm, group in groups.items():
            try:
                alg = self._alg_dir(algorithm)
            except FileNotFoundError:
                continue
            try:
                yield alg, len(algorithm) + 1, group  # a file name is made when used: names of 200,000 blobs weigh
            finally:
                os.close(alg)

    # -- blobs --------------------------------------------------------------------------

    async def _put_blob(self, source: BlobSource, verifier: Verifier) -> tuple[Digest, int]:
        # with direct writes, no kernel copy: it would write through the page cache
        kernel_copies = not self._direct_writes
        if isinstance(source, BlobReader) and source.vouches_for(verifier.digest, verifier.size):
            if kernel_copies:
                async with source._borrow_file() as fd:
                    if fd is not None:  # an unread reader of a local file (copy from a layout): the kernel copies it
                        return await clone_blob(self, fd, source.size, verifier, source.on_read)
            if verifier.size == source.size:  # a registry's or memory's bytes: hashed in the thread that writes them
                async with source._borrow_raw() as raw:
                    if raw is not None:
                        return await PendingBlob(self, verifier, lent=True, size=source.size).put(
                            LentRaw(raw, source.on_read)
                        )
            # a verifying reader of other bytes: its word is taken, the bytes only counted
            return await PendingBlob(self, verifier, vouched=True, size=source.size).put(source)
        if kernel_copies:
            stored = await put_local_file(self, source, verifier)  # an anyio file over a local file
            if stored is not None:
                return stored
        return await PendingBlob(self, verifier).put(source)

    def _open_file(self, digest: Digest) -> _FileRaw:
        try:
            alg = self._alg_dir(digest.algorithm)
            try:
                fd = open_regular(digest.encoded, alg, f"blob {digest}")
            finally:
                os.close(alg)
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} not found") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidError(f"blob {digest} is a symlink; refusing to follow it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InvalidError(f"blob {digest} is not a regular file")
        return _FileRaw(fd, st.st_size)

    async def _open_blob(self, digest: Digest) -> RawBlob:
        return await run_sync(self._open_file, digest)

    async def _closure_heads(
        self, roots: list[Descriptor]
    ) -> tuple[dict[Digest, tuple[Descriptor, list[Descriptor]]], dict[Digest, BlobInfo]]:
        return await run_sync(self._look_at_closure, roots) if any(map(_readable_node, roots)) else ({}, {})

    def _look_at_closure(
        self, roots: list[Descriptor]
    ) -> tuple[dict[Digest, tuple[Descriptor, list[Descriptor]]], dict[Digest, BlobInfo]]:
        """Read, verify and parse the nodes reached from ``roots`` (within a budget), stat their leaves: in one go.

        Only the happy path, in few system calls (each may wait for the GIL under load): a
        directory opened once per algorithm, one ``read`` per node. Anything odd is left out,
        for the usual walk to report.
        """
        heads: dict[Digest, tuple[Descriptor, list[Descriptor]]] = {}
        leaves: dict[Digest, None] = {}
        queue = [d for d in roots if _readable_node(d)]
        tried: set[Digest] = set()  # the first descriptor of a digest decides, as in a walk
        budget = _LOOK_BUDGET
        dirs = _AlgDirs(self)
        try:
            for node in shared(queue):  # grows as nodes are read: breadth first, as a walk goes
                if node.digest in tried:
                    continue
                tried.add(node.digest)
                if len(tried) % 64 == 0:
                    checkpoint()
                if node.size > budget or (data := dirs.read_node(node)) is None:
                    continue
                try:
                    found = strong_children(node, data)
                except Exception:  # the usual read reports it, exactly
                    continue
                heads[node.digest] = (node, found)
                budget -= node.size
                for child in found:
                    if _readable_node(child):
                        queue.append(child)
                    elif child.data is None and not is_node(child):
                        leaves[child.digest] = None
            stats: dict[Digest, BlobInfo] = {}
            for digest in leaves:
                alg = dirs.get(digest)
                if alg is None:
                    continue
                try:
                    st = _regular_stat(alg, digest.encoded)
                except OSError:
                    continue  # the usual stat reports it
                if st is not None:
                    stats[digest] = BlobInfo(st.st_size, st.st_mtime_ns / 1e9)
        finally:
            dirs.close()
        return heads, stats

    async def _check_and_update_references(
        self, changes: dict[str, Descriptor | None], replace: bool, targets: list[tuple[str, Descriptor]]
    ) -> None:
        roots = [d for _, d in targets]
        if not roots or any(map(_readable_node, roots)):
            # the common tag in one thread hop: the look at its content, then the group commit
            check = (lambda: complete_at_hand(roots, *self._look_at_closure(roots))) if roots else None
            if await self._index.update(changes, replace, check):
                return
        # the look could not tell (missing or large content, a bare blob): the walk decides, and names the fault
        await check_closure(self, targets)
        await self._index.update(changes, replace)

    async def _stat_blob(self, digest: Digest) -> int:
        def size() -> int:
            try:
                alg = self._alg_dir(digest.algorithm)
                try:
                    st = os.stat(digest.encoded, dir_fd=alg, follow_symlinks=False)
                finally:
                    os.close(alg)
            except FileNotFoundError:
                raise BlobNotFoundError(f"blob {digest} not found") from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidError(f"blob {digest} is not a regular file")
            return st.st_size

        return await run_sync(size)

    async def _delete_blob(self, digest: Digest) -> None:
        def delete() -> None:
            try:
                alg = self._alg_dir(digest.algorithm)
                try:
                    os.unlink(digest.encoded, dir_fd=alg)
                finally:
                    os.close(alg)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise InvalidError(f"blob path of {digest} is a directory; not removing it") from None

        await run_sync(delete)

    def _regular_files(self, digests: list[_S]) -> Iterator[tuple[int, str, _S, os.stat_result]]:
        """Each of ``digests`` whose blob path holds a regular file: its algorithm directory, file name and
        ``lstat``. Blocking, with a cancellation checkpoint every ``_BATCH`` blobs."""
        for alg, cut, group in self._by_algorithm(digests):
            for n, digest in enumerate(group):
                if not n % _BATCH:
                    checkpoint()
                name = digest[cut:]
                st = _regular_stat(alg, name)
                if st is not None:
                    yield alg, name, digest, st

    async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
        def stats(digests: list[Digest]) -> dict[Digest, BlobInfo]:
            out = {}
            for alg, name, digest, st in self._regular_files(digests):
                prefix = _head(alg, name, head) if head and st.st_size else b""
                if prefix is not None:
                    out[digest] = BlobInfo(st.st_size, st.st_mtime_ns / 1e9, prefix)
            return out

        return await run_sync(stats, digests)

    async def _touch_blobs(self, digests: list[Digest]) -> dict[Digest, BlobInfo]:
        def touch() -> dict[Digest, BlobInfo]:
            out = {}
            for alg, cut, group in self._by_algorithm(digests):
                for start in range(0, len(group), _BATCH):
                    checkpoint()
                    with blobs_held(alg):  # no collector unlinks them meanwhile
                        for digest in group[start : start + _BATCH]:
                            try:
                                held = open_blob(alg, digest[cut:], f"blob {digest}")
                            except InvalidError:
                                continue
                            if held is None:
                                continue
                            try:
                                st = os.fstat(held)
                                os.utime(held)
                            finally:
                                os.close(held)
                            out[digest] = BlobInfo(st.st_size, time.time())
            return out

        return await run_sync(touch)

    def _gc_lock(self) -> AbstractAsyncContextManager[None]:
        """The collector's lock, exclusive, in this process and in others (``flock`` on ``blobs/``)."""
        return self._blobs_flock(fcntl.LOCK_EX, super()._gc_lock())

    def _gc_shared(self) -> AbstractAsyncContextManager[None]:
        """The collector's lock, shared, in this process and in others (``flock`` on ``blobs/``)."""
        return self._blobs_shared(super()._gc_shared())

    @asynccontextmanager
    async def _blobs_shared(self, local: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        # one shared flock for all this process's shared holders, taken by the first and dropped by the
        # last: under load (taggers, leased puts) most holders join it without a thread hop. Another
        # process's collector still waits until no holder here is left, as it would for one flock each;
        # a collector here waits for the local lock, which this one is held inside
        async with local:
            await self._join_shared_flock()
            try:
                yield
            finally:
                self._shared_holders -= 1
                if self._shared_holders == 0 and self._shared_flock is not None:
                    fd, self._shared_flock = self._shared_flock, None
                    os.close(fd)  # releases the flock

    async def _join_shared_flock(self) -> None:
        while not self._shared_holders:
            if self._flocking is None:  # the first holder takes the flock; the others wait for it together
                self._flocking = ended = anyio.Event()
                try:
                    self._shared_flock = await self._take_blobs_flock(fcntl.LOCK_SH)
                finally:
                    self._flocking = None
                    ended.set()
                self._shared_holders = 1
                return
            await self._flocking.wait()
        self._shared_holders += 1  # held: join it without a wait

    @asynccontextmanager
    async def _blobs_flock(self, operation: int, local: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        async with local:
            blobs = await self._take_blobs_flock(operation)
            try:
                yield
            finally:
                os.close(blobs)

    async def _take_blobs_flock(self, operation: int) -> int:
        """``blobs/``, open and ``flock``-ed with ``operation``, waiting (cancellably) for other processes."""
        with metadata_hops():  # a tag's first hop: never queued behind blob I/O
            blobs, locked = await run_sync(_open_flocked, self._root, operation)
            try:
                delay = 0.001
                while not locked:
                    await anyio.sleep(delay)  # another process holds it: wait, cancellably
                    delay = min(delay * 2, 0.05)
                    locked = await run_sync(try_flock, blobs, operation)
            except BaseException:
                os.close(blobs)
                raise
        return blobs

    # -- leases (files in this engine's temporary directory, flock-held while live) ----------

    async def _lease_begin(self, lease_id: str) -> None:
        def begin() -> int:
            temp = self._temp_dir()
            fd = os.open(
                f"{_LEASE_PREFIX}{lease_id}",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                0o600,
                dir_fd=temp,
            )
            fcntl.flock(fd, fcntl.LOCK_SH)  # a collector that can take it exclusively knows the lease is dead
            return fd

        self._leases[lease_id] = await run_sync(begin)

    async def _lease_record(self, lease_id: str, digests: list[Digest]) -> None:
        # a collector reads leases holding the lock exclusively; this runs holding it shared
        await run_sync(write_all, self._leases[lease_id], "".join(f"{d}\n" for d in digests).encode())

    async def _lease_end(self, lease_id: str) -> None:
        fd = self._leases.pop(lease_id, None)
        if fd is None:
            return

        def end() -> None:
            try:
                os.unlink(f"{_LEASE_PREFIX}{lease_id}", dir_fd=self._temp_dir())
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)

        await run_sync(end)

    async def _leased_blobs(self) -> set[Digest]:
        def scan() -> set[Digest]:
            leased: set[Digest] = set()
            with os.scandir(self._root) as entries:
                temps = [e.name for e in entries if e.name.startswith(TEMP_PREFIX)]
            for name in temps:
                try:
                    temp = os.open(name, DIR_FLAGS, dir_fd=self._root)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue
                    raise
                try:
                    leased.update(_read_leases(temp))
                finally:
                    os.close(temp)
            return leased

        return await run_sync(scan)

    def _listing(self, wrap: Callable[[str], _S], *, sort: bool = True) -> list[_S]:
        """Every stored digest, each made by ``wrap`` from its text, sorted or in directory order (a worker thread)."""
        out: list[_S] = []
        for algorithm in sorted(SUPPORTED_ALGORITHMS):
            try:
                alg = self._alg_dir(algorithm)
            except FileNotFoundError:
                continue
            listed: list[_S] = []
            try:
                match = _ENCODED[algorithm].fullmatch
                prefix = f"{algorithm}:"
                with os.scandir(alg) as entries:
                    for n, entry in enumerate(shared(entries)):
                        if not n % 4096:
                            checkpoint()
                        name = entry.name
                        if match(name) and entry.is_file(follow_symlinks=False):
                            listed.append(wrap(prefix + name))  # the name matched the grammar
            finally:
                os.close(alg)
            out += sorted_in_pieces(listed) if sort else listed
        return out

    async def _list_blobs(self) -> list[Digest]:
        return await run_sync(self._listing, Digest._trusted)

    async def _gc_list(self) -> list[str]:
        # in directory order: on ext4 (hashed directories) a sweep in that order stats and unlinks
        # ~20% faster in system time, and ~2x in wall time, than one in name order
        return await run_sync(functools.partial(self._listing, str, sort=False))

    async def _gc_scan(self, wanted: Callable[[str], bool]) -> AsyncGenerator[list[str], None]:
        # in directory order (see _gc_list), GC_SCAN_BATCH entries per thread hop: the collector holds a batch at
        # a time, never the whole listing
        scan = _Scan(self, wanted)
        try:
            more = True
            while more:
                batch, more = await run_sync(scan.next_batch)
                if batch:
                    yield batch
        finally:
            scan.close()  # after the hop: a cancelled hop's thread is waited for

    async def _gc_triage(
        self, digests: list[str], cutoff: float | None, head: int, limit: int
    ) -> tuple[dict[str, int], list[str], list[str], list[str]]:
        cutoff_ns = None if cutoff is None else int(cutoff * 1e9)

        def triage(digests: list[str]) -> tuple[dict[str, int], list[str], list[str], list[str]]:
            sizes: dict[str, int] = {}
            fresh: list[str] = []
            old: list[str] = []
            json_like: list[str] = []
            for alg, name, digest, st in self._regular_files(digests):
                size = st.st_size
                if cutoff_ns is not None and st.st_mtime_ns >= cutoff_ns:
                    sizes[digest] = size
                    fresh.append(digest)  # kept: neither read nor deleted
                    continue
                if head and size <= limit:
                    prefix = _head(alg, name, head) if size else b""
                    if prefix is None:
                        continue
                    if prefix.lstrip()[:1] in (b"{", b""):
                        json_like.append(digest)
                sizes[digest] = size
                old.append(digest)
            return sizes, fresh, old, json_like

        return await run_sync(triage, digests)

    async def _gc_delete(
        self, digests: list[str], unmodified_since: float | None, clock: list[float]
    ) -> dict[str, int]:
        return await self._unlink_old(digests, unmodified_since, clock)

    async def _delete_blobs(self, digests: list[Digest], unmodified_since: float | None) -> dict[Digest, int]:
        return await self._unlink_old(digests, unmodified_since)

    async def _unlink_old(
        self, digests: list[_S], unmodified_since: float | None, clock: list[float] | None = None
    ) -> dict[_S, int]:
        """Unlink those of ``digests`` unmodified since then; return their sizes. ``clock``: see ``_gc_delete``."""
        cutoff = None if unmodified_since is None else int(unmodified_since * 1e9)
        removed: dict[_S, int] = {}
        failed = threading.Event()  # one slice failed: the others stop at their next blob
        # the round's threads come from a limiter of their own: a writer of this process waiting (in a thread of
        # the default pool) for the round's lock must not hold the tokens the round needs to finish
        threads = QuickLimiter(_SWEEP_THREADS)

        def unlink(alg: int, cut: int, part: list[_S]) -> None:
            try:
                for n, digest in enumerate(part):
                    if not n % 64:
                        checkpoint()
                    if failed.is_set():
                        return
                    st = unlink_unused(alg, digest[cut:], cutoff)
                    if st is not None:
                        removed[digest] = st.st_size
            except BaseException:
                failed.set()
                raise

        def grouped() -> list[tuple[str, list[_S]]]:
            groups: dict[str, list[_S]] = {}
            for digest in shared(digests):
                groups.setdefault(digest[: digest.find(":")], []).append(digest)
            return list(groups.items())

        paused = time.monotonic() if clock is None else clock[0]
        for algorithm, group in grouped() if len(digests) < _BATCH else await run_sync(grouped):
            cut = len(algorithm) + 1
            for start in range(0, len(group), _ROUND):
                if time.monotonic() - paused >= _SWEEP_FAIRNESS:
                    await anyio.sleep(POLL_INTERVAL * 1.5)
                    paused = time.monotonic()
                batch = group[start : start + _ROUND]
                alg = await run_sync(self._held_alg_dir, algorithm)
                if alg is None:
                    break
                try:
                    # the age checks and unlinks of a round, under one exclusive hold, in threads at once: on a
                    # filesystem that discards freed blocks at unlink (ext4 without a journal, mounted with
                    # -o discard) each unlink waits for the device, and the waits overlap
                    size = max(_SWEEP_SLICE, -(-len(batch) // _SWEEP_THREADS))
                    async with task_group() as tg:
                        for at in range(0, len(batch), size):
                            tg.start_soon(
                                functools.partial(run_sync, unlink, alg, cut, batch[at : at + size], limiter=threads)
                            )
                finally:
                    os.close(alg)  # drops the lock, once every thread of the round has returned
        if clock is not None:
            clock[0] = paused

        def ordered() -> dict[_S, int]:  # in the order asked, not as the threads ended
            return {digest: removed[digest] for digest in shared(digests) if digest in removed}

        return ordered() if len(digests) < _BATCH else await run_sync(ordered)

    def _held_alg_dir(self, algorithm: str) -> int | None:
        """Open an algorithm directory of its own (``None`` if there is none) and ``flock`` it exclusively.

        The collector's side of :func:`blobs_held`: closing the descriptor drops the lock.
        """
        try:
            alg = self._alg_dir(algorithm)
        except FileNotFoundError:
            return None
        try:
            wait_for(lambda: try_flock(alg, fcntl.LOCK_EX))
        except BaseException:
            os.close(alg)
            raise
        return alg

    async def _read_nodes(
        self, nodes: list[Descriptor], expand: Callable[[Descriptor, bytes], list[Descriptor]]
    ) -> dict[str, tuple[bytes, list[Descriptor]]]:
        def read() -> dict[str, tuple[bytes, list[Descriptor]]]:
            out: dict[str, tuple[bytes, list[Descriptor]]] = {}
            budget = _NODES_BUDGET
            with contextlib.closing(_AlgDirs(self)) as dirs:
                for n, node in enumerate(shared(nodes)):
                    if n and not n % 64:
                        checkpoint()
                    size = node.size
                    if size >= _NODE_LIMIT or size > budget or node.data is not None:
                        continue
                    if (data := dirs.read_node(node)) is None:
                        continue
                    try:
                        found = expand(node, data)
                    except Exception:  # the usual read reports it, exactly
                        continue
                    budget -= size
                    out[node.digest] = (data, found)
            return out

        return await run_sync(read)

    # -- references ---------------------------------------------------------------------

    async def _get_reference(self, name: str) -> Descriptor:
        descriptor = (await self._index.read()).get(name)
        if descriptor is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found")
        return descriptor

    async def _list_references(self) -> list[str]:
        return (await self._index.read()).names()

    async def _list_roots(self) -> list[Descriptor]:
        # parsed in the thread that reads index.json: parsing 200 entries is ~7 ms of event-loop time
        with metadata_hops():
            return await run_sync(lambda: self._index.load().roots())

    async def _list_broken_roots(self) -> list[BrokenRoot]:
        with metadata_hops():
            return await run_sync(lambda: self._index.load().broken())

    async def _update_references(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        await self._index.update(changes, replace)

    # -- lifecycle ----------------------------------------------------------------------

    async def _gc(self) -> None:
        """Remove temporary directories left by dead ocicas engines (never another tool's files)."""

        def collect() -> None:
            with os.scandir(self._root) as entries:
                names = [e.name for e in entries if e.name.startswith(TEMP_PREFIX) and e.name != self._temp_name]
            for name in names:
                checkpoint()
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=self._root)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # vanished, or not a directory: not ours to judge
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue  # a symlink: not ours
                    raise
                try:
                    if not try_flock(fd, fcntl.LOCK_EX):
                        continue  # a live engine holds it
                    try:
                        remove_temp_dir(self._root, name, fd)
                    except FileNotFoundError:
                        pass  # another collector was faster
                    except OSError as exc:
                        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EPERM):
                            raise
                        # it holds something we did not put there: leave it
                finally:
                    os.close(fd)

        await run_sync(collect)

    async def _release(self) -> None:
        def release() -> None:
            if self._temp_fd is not None and self._temp_name is not None:
                try:
                    remove_temp_dir(self._root, self._temp_name, self._temp_fd)
                except OSError:
                    pass  # a later gc() retries once our flock is gone
                os.close(self._temp_fd)  # drops the flock
                self._temp_fd = None
            self._index.release()
            os.close(self._root)

        await run_sync(release)
