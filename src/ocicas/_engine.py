"""The Engine protocol: the public methods every engine has, and the hooks a backend implements.

Every public method of :class:`Engine` is concrete and takes the same path:
its arguments are checked (``TypeError`` naming a wrong-typed parameter,
:class:`~ocicas.InvalidError` for a bad value), it runs as one operation of the
engine's :class:`~ocicas._lifecycle.Lifecycle` (refused once closed, bound to its
``ctx``, cancelled by ``close()``), and only then calls the backend's hook.
Readers come from :class:`~ocicas.BlobReader`, which verifies what any backend
supplies. A backend thus implements raw access and nothing it could forget:

==========================  ==================================================
hook                        does
==========================  ==================================================
``_put_blob``               store a stream, verified by the given ``Verifier``
``_open_blob``              a :class:`RawBlob` of a blob's bytes
``_stat_blob``              a blob's size
``_delete_blob``            remove one blob
``_list_blobs``             every digest stored
``_update_references``      apply reference changes, all or nothing
``_get_reference``          one descriptor, or ``None``
``_list_references``        every name
``_list_roots``             the root descriptors
``_gc``                     remove engine-level garbage (temporary files)
``_release``                free the engine's resources (after every operation left)
==========================  ==================================================

Optional hooks with defaults: ``_stat_blobs``, ``_touch_blobs``, ``_delete_blobs``, the collector's
(``_gc_list``, ``_gc_scan``, ``_gc_triage``, ``_gc_delete``, ``_read_nodes``), ``_mount_blob``,
``_list_broken_roots``, ``_referrers``, ``_check_and_update_references``, the collector's lock
(``_gc_lock`` exclusive, ``_gc_shared`` shared; in-process by default) and leases
(``_lease_begin``, ``_lease_record``, ``_lease_end``, ``_leased_blobs``; in-process
by default).

A :class:`RawBlob` over a local file says so with ``fileno()``: a directory engine
given an unread reader of it (:func:`ocicas.copy` between layouts) borrows the file
through the reader and lets the kernel copy it, hashing what lands (``_dir.clone``).
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, ClassVar, Final

import anyio

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

from ._checks import (
    check_blob_source,
    check_bool,
    check_ctx,
    check_descriptor,
    check_digest,
    check_digests_yielding,
    check_int,
    type_name,
)
from ._context import Context
from ._descriptor import Descriptor, validate_media_type
from ._digest import Digest, Verifier
from ._errors import BlobNotFoundError, BlobTooLargeError, SizeMismatchError
from ._gclock import SharedExclusiveLock
from ._json import dump_json
from ._layout_format import BrokenRoot, validate_reference_name
from ._lease import Lease, active_lease
from ._lease import enter as enter_lease
from ._lease import leave as leave_lease
from ._lifecycle import Lifecycle
from ._reader import BlobReader, RawBlob
from ._source import AsyncReadable, BlobSource
from ._tasks import bounded_shield
from ._threads import CHUNK_SIZE, run_sync

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_READ_LIMIT",
    "AsyncReadable",
    "BlobInfo",
    "BlobReader",
    "BlobSource",
    "Engine",
    "RawBlob",
]

#: Default cap of :meth:`Engine.read_blob`.
DEFAULT_READ_LIMIT: Final = 64 << 20
#: Seconds ``async with engine`` may spend closing it while the block is being cancelled.
_CLOSE_TIMEOUT: Final = 30.0
#: Digests a collector's scan (``_gc_scan``) hands over at most per batch.
GC_SCAN_BATCH: Final = 4096


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """What :meth:`Engine.stat_blobs` knows of a blob without reading it."""

    size: int
    #: POSIX time of the last write or freshening, or ``None`` if the engine cannot tell.
    modified: float | None
    #: The first bytes, when asked for with ``head=``: unverified, for sniffing only.
    head: bytes = b""


def _target(value: Any, name: str = "digest") -> tuple[Digest, int | None]:
    """A digest (and the size to expect) from a digest string or a :class:`Descriptor`."""
    if isinstance(value, Descriptor):
        return check_digest(value.digest, f"{name}.digest"), value.size
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a digest string or an ocicas.Descriptor, not {type_name(value)}")
    return check_digest(value, name), None


def _check_size(digest: Digest, size: int, expected: int | None) -> None:
    if expected is not None and size != expected:
        raise SizeMismatchError(f"blob {digest} has {size} bytes, but its descriptor says {expected}")


class Engine(ABC):
    """An OCI content-addressable store: blobs by digest, references by name.

    The Python form of umoci's ``cas.Engine``. Every method takes an optional
    keyword-only ``ctx`` (:class:`~ocicas.Context`). Engines are async context
    managers. :meth:`close` refuses new calls at once, cancels the calls still
    running (they raise :class:`~ocicas.EngineClosedError`), waits for them to
    leave and then frees the engine's resources; every later call, and every
    reader it handed out, raises :class:`~ocicas.EngineClosedError`.

    Backends subclass it and implement the hooks listed in the module
    documentation; the public methods below are the same for every engine.
    """

    #: Whether ``_update_references`` itself refuses a reference to absent content (a registry
    #: checks what a manifest reaches before it tags it): the generic check is then not repeated.
    _checks_own_references: ClassVar[bool] = False

    @property
    def _lifecycle(self) -> Lifecycle:
        life: Lifecycle | None = self.__dict__.get("_life")
        if life is None:
            life = self.__dict__["_life"] = Lifecycle(self, self._release)
        return life

    def _operation(self, ctx: Context | None) -> AbstractAsyncContextManager[None]:
        return self._lifecycle.operation(ctx)

    # -- blobs ---------------------------------------------------------------------

    async def put_blob(
        self,
        source: BlobSource,
        *,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        ctx: Context | None = None,
    ) -> tuple[Digest, int]:
        """Store a blob streamed from ``source``; return its digest and size.

        ``source`` is bytes-like, an async iterable of bytes, or an object with
        ``async read(n)``. Idempotent: storing content that is already present
        succeeds and refreshes its age. With ``expected_digest``/``expected_size``
        the content is checked as it streams (the digest's algorithm is used), and
        a mismatch raises before anything is stored.
        """
        ctx = check_ctx(ctx)
        check_blob_source(source, "source")
        expected = None if expected_digest is None else check_digest(expected_digest, "expected_digest")
        size = check_int(expected_size, "expected_size", optional=True)
        lease = active_lease(self)
        async with self._operation(ctx):
            if lease is None:
                return await self._put_blob(source, Verifier(expected, size))
            async with self._gc_shared():  # no collection between the put and its record in the lease
                digest, stored = await self._put_blob(source, Verifier(expected, size))
                await lease._record([digest])
            return digest, stored

    async def put_blob_json(self, obj: Any, *, ctx: Context | None = None) -> tuple[Digest, int]:
        """Store ``obj`` serialised as compact JSON (objects with ``to_dict()`` allowed)."""
        return await self.put_blob(dump_json(obj), ctx=check_ctx(ctx))

    async def get_blob(self, digest: Digest | str | Descriptor, *, ctx: Context | None = None) -> BlobReader:
        """Open a verified reader of a blob; :class:`~ocicas.BlobNotFoundError` if absent.

        ``digest`` may be a :class:`Descriptor`: its size is checked too
        (:class:`~ocicas.SizeMismatchError`). Read the reader to its end or close it
        (``async with``); one dropped unclosed is freed when collected, with a
        ``ResourceWarning``.
        """
        ctx = check_ctx(ctx)
        digest, expected = _target(digest)
        reader: BlobReader | None = None
        try:
            async with self._operation(ctx):
                reader = await self._reader(digest, ctx)
                _check_size(digest, reader.size, expected)
        except BaseException:
            if reader is not None:  # opened, but the call failed after all: nobody else will free it
                await reader.aclose()
            raise
        return reader

    async def _reader(self, digest: Digest, ctx: Context | None) -> BlobReader:
        """A reader owning the backend's raw bytes of ``digest`` from the moment they are opened."""
        raw = await self._open_blob(digest)
        try:
            return BlobReader(digest, raw, ctx=ctx, lifecycle=self._lifecycle)
        except BaseException:  # the engine closed meanwhile: the raw source is still ours to free
            with bounded_shield():
                await raw.aclose()
            raise

    async def read_blob(
        self,
        digest: Digest | str | Descriptor,
        *,
        max_size: int | None = DEFAULT_READ_LIMIT,
        ctx: Context | None = None,
    ) -> bytes:
        """Return a whole blob, verified before it is returned.

        Blobs larger than ``max_size`` bytes (``None``: no cap) are refused with
        :class:`~ocicas.BlobTooLargeError` before any byte is read. ``digest`` may
        be a :class:`Descriptor`, whose size is checked too.
        """
        ctx = check_ctx(ctx)
        max_size = check_int(max_size, "max_size", optional=True)
        digest, expected = _target(digest)
        async with self._operation(ctx), await self._reader(digest, ctx) as reader:
            _check_size(digest, reader.size, expected)
            if max_size is not None and reader.size > max_size:
                raise BlobTooLargeError(f"blob {digest} has {reader.size} bytes, over the cap of {max_size}")
            return await reader.read()

    async def stat_blob(self, digest: Digest | str | Descriptor, *, ctx: Context | None = None) -> int:
        """Return a blob's size without reading it; :class:`~ocicas.BlobNotFoundError` if absent.

        ``digest`` may be a :class:`Descriptor`, whose size is checked too.
        """
        ctx = check_ctx(ctx)
        digest, expected = _target(digest)
        async with self._operation(ctx):
            size = await self._stat_blob(digest)
        _check_size(digest, size, expected)
        return size

    async def delete_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> None:
        """Remove a blob. Idempotent: an absent blob is not an error."""
        ctx = check_ctx(ctx)
        digest = check_digest(digest)
        async with self._operation(ctx):
            await self._delete_blob(digest)

    async def list_blobs(self, *, ctx: Context | None = None) -> list[Digest]:
        """Every blob digest in the store, sorted."""
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            return await self._list_blobs()

    async def stat_blobs(
        self, digests: Iterable[Digest | str], *, head: int = 0, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        """Size and modification time of many blobs at once; absent blobs are left out.

        Engines that know when a blob was last written or freshened report it as
        :attr:`BlobInfo.modified` (GC's grace period relies on it). With ``head``,
        the first ``head`` bytes of each blob come along, unverified: enough to tell
        a JSON document from a tarball without reading either.
        """
        ctx = check_ctx(ctx)
        wanted = await check_digests_yielding(digests)
        head = check_int(head, "head")
        async with self._operation(ctx):
            return await self._stat_blobs(wanted, head)

    async def touch_blobs(
        self, digests: Iterable[Digest | str], *, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        """Freshen the present blobs among ``digests``, as ``put_blob`` of present content does; return them.

        A writer that reuses blobs it finds present (as :func:`ocicas.copy` does)
        touches them so a concurrent GC's grace period protects them until it has
        referenced them. Atomic with respect to :meth:`delete_blobs`. Engines
        without blob times only report them.
        """
        ctx = check_ctx(ctx)
        wanted = await check_digests_yielding(digests)
        async with self._operation(ctx):
            return await self._touch_blobs(wanted)

    async def delete_blobs(
        self,
        digests: Iterable[Digest | str],
        *,
        unmodified_since: float | None = None,
        ctx: Context | None = None,
    ) -> dict[Digest, int]:
        """Delete many blobs; return the ones removed with their sizes.

        With ``unmodified_since`` (a POSIX time), a blob written or freshened at or
        after it is kept: the check and the removal are atomic with respect to this
        engine's own :meth:`put_blob`. Engines without blob times keep every blob
        when it is given.
        """
        ctx = check_ctx(ctx)
        wanted = await check_digests_yielding(digests)
        if unmodified_since is not None and (
            isinstance(unmodified_since, bool) or not isinstance(unmodified_since, int | float)
        ):
            raise TypeError(f"unmodified_since must be a POSIX time or None, not {type_name(unmodified_since)}")
        async with self._operation(ctx):
            return await self._delete_blobs(wanted, unmodified_since)

    def gc_lock(self, *, ctx: Context | None = None) -> AbstractAsyncContextManager[None]:
        """Held by :func:`ocicas.gc` while it runs, so two collections never overlap.

        The default is a lock of this engine object; the directory engine also
        excludes collections in other processes. Held as one operation of the
        engine: closing the engine ends it.
        """
        return self._held_gc_lock(check_ctx(ctx))

    @asynccontextmanager
    async def _held_gc_lock(self, ctx: Context | None) -> AsyncIterator[None]:
        async with self._operation(ctx), self._gc_lock():
            yield

    def lease(self, *, ctx: Context | None = None) -> AbstractAsyncContextManager[Lease]:
        """Keep every blob put inside the block from every collector until the block ends.

        ``async with engine.lease() as lease:`` records each blob this task (and
        the tasks it starts) stores with :meth:`put_blob`; :func:`ocicas.gc` keeps
        them whatever its grace period, in this process and, for the directory
        engine, in others. :meth:`Lease.add` protects present blobs a writer reuses.
        Put, then tag, inside one lease and no collection can remove what the tag
        will name. Held as one operation of the engine: closing the engine ends it.
        """
        return self._leased(check_ctx(ctx))

    @asynccontextmanager
    async def _leased(self, ctx: Context | None) -> AsyncIterator[Lease]:
        async with self._operation(ctx):
            lease = Lease(self, secrets.token_hex(8))
            await self._lease_begin(lease.id)
            token = enter_lease(lease)
            try:
                yield lease
            finally:
                leave_lease(token)
                with anyio.CancelScope(shield=True):
                    await self._lease_end(lease.id)

    async def leased_blobs(self, *, ctx: Context | None = None) -> frozenset[Digest]:
        """Every blob a live lease protects, in this process or (directory engine) another."""
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            return frozenset(await self._leased_blobs())

    async def mount_blob_from(
        self, source: Engine, digest: Digest | str, *, size: int, ctx: Context | None = None
    ) -> bool:
        """Make ``digest`` (of ``size`` bytes) present here by linking it from ``source``, moving no bytes.

        Returns ``False`` when this engine cannot (the default: :func:`ocicas.copy`
        then moves the bytes). A registry engine mounts blobs across repositories
        of one registry.
        """
        ctx = check_ctx(ctx)
        if not isinstance(source, Engine):
            raise TypeError(f"source must be an ocicas.Engine, not {type_name(source)}")
        digest = check_digest(digest)
        size = check_int(size, "size")
        async with self._operation(ctx):
            return await self._mount_blob(source, digest, size)

    # -- references ----------------------------------------------------------------

    async def put_reference(
        self, name: str, descriptor: Descriptor, *, partial: bool = False, ctx: Context | None = None
    ) -> None:
        """Store ``descriptor`` under ``name``, once what it names is present (see :meth:`update_references`).

        Idempotent; raises :class:`~ocicas.ClobberError` if ``name`` already holds a
        different descriptor (delete it first to move a name), and
        :class:`~ocicas.BlobNotFoundError` if content it reaches is missing
        (``partial=True`` skips that check).
        """
        ctx = check_ctx(ctx)
        validate_reference_name(name)
        check_descriptor(descriptor)
        await self.update_references({name: descriptor}, partial=partial, ctx=ctx)

    async def delete_reference(self, name: str, *, ctx: Context | None = None) -> None:
        """Remove a reference. Idempotent: an absent name is not an error."""
        ctx = check_ctx(ctx)
        validate_reference_name(name)
        await self.update_references({name: None}, ctx=ctx)

    async def update_references(
        self,
        changes: Mapping[str, Descriptor | None],
        *,
        replace: bool = False,
        partial: bool = False,
        ctx: Context | None = None,
    ) -> None:
        """Apply many reference changes at once: ``name: descriptor`` puts, ``name: None`` deletes.

        All or nothing. A put is written only if its target and everything the
        target reaches (index entries, configs, layers; not ``subject``, a weak
        link) are present: else :class:`~ocicas.BlobNotFoundError` names what is
        missing and nothing is written. The check and the write hold the
        collector's lock shared, so no collection can come between them.
        ``partial=True`` skips the check, for content that is partial on purpose
        (a platform-filtered copy). Without ``replace``, a put that would change
        what a name already holds raises :class:`~ocicas.ClobberError` and nothing
        is applied; with ``replace=True`` names are moved. The directory engine
        writes ``index.json`` once for the whole batch.
        """
        ctx = check_ctx(ctx)
        if not isinstance(changes, Mapping):
            raise TypeError(f"changes must be a mapping of name to Descriptor or None, not {type_name(changes)}")
        replace = check_bool(replace, "replace")
        partial = check_bool(partial, "partial")
        checked: dict[str, Descriptor | None] = {}
        for name, descriptor in changes.items():
            validate_reference_name(name)
            if descriptor is not None and not isinstance(descriptor, Descriptor):
                raise TypeError(f"changes[{name!r}] must be an ocicas.Descriptor or None, not {type_name(descriptor)}")
            checked[name] = descriptor
        puts = [(name, d) for name, d in checked.items() if d is not None]
        async with self._operation(ctx):
            if not puts:
                await self._update_references(checked, replace)
                return
            async with self._gc_shared():
                await self._check_and_update_references(
                    checked, replace, [] if partial or self._checks_own_references else puts
                )

    async def get_reference(self, name: str, *, ctx: Context | None = None) -> Descriptor:
        """The descriptor stored under ``name``; :class:`~ocicas.ReferenceNotFoundError` if absent."""
        ctx = check_ctx(ctx)
        validate_reference_name(name)
        async with self._operation(ctx):
            return await self._get_reference(name)

    async def list_references(self, *, ctx: Context | None = None) -> list[str]:
        """Every reference name, sorted."""
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            return await self._list_references()

    async def list_roots(self, *, ctx: Context | None = None) -> list[Descriptor]:
        """Every descriptor the store keeps as a root, named or not (GC's root set).

        Named ones carry their ``org.opencontainers.image.ref.name`` annotation.
        """
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            return await self._list_roots()

    async def list_broken_roots(self, *, ctx: Context | None = None) -> list[BrokenRoot]:
        """The root entries that do not parse as descriptors (left out of :meth:`list_roots`), in order.

        A directory engine's ``index.json`` may hold entries another tool wrote
        badly; each is refused on its own (:meth:`get_reference` of its name raises
        :class:`~ocicas.InvalidError`) and kept as written. :func:`ocicas.gc` refuses
        to run while there are any (see its documentation). Empty for other engines.
        """
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            return await self._list_broken_roots()

    async def referrers(
        self, subject: Digest | str | Descriptor, *, artifact_type: str | None = None, ctx: Context | None = None
    ) -> list[Descriptor]:
        """The stored manifests and indexes whose ``subject`` is ``subject``, sorted by digest.

        Each comes as the distribution-spec's referrers API lists it: media type,
        digest, size, ``artifact_type`` (the referrer's own, else its config's media
        type) and annotations. With ``artifact_type``, only referrers of that type.
        A registry asks its referrers API, or reads the tag-schema fallback where it
        has none; other engines read every stored blob that can be a JSON document.
        """
        ctx = check_ctx(ctx)
        digest, _ = _target(subject, "subject")
        if artifact_type is not None:
            if not isinstance(artifact_type, str):
                raise TypeError(f"artifact_type must be a media type (str) or None, not {type_name(artifact_type)}")
            validate_media_type(artifact_type, "artifact_type")
        async with self._operation(ctx):
            found = await self._referrers(digest, artifact_type)
        return sorted({d.digest: d for d in found}.values(), key=lambda d: d.digest)

    # -- lifecycle -----------------------------------------------------------------

    async def gc(self, *, ctx: Context | None = None) -> None:
        """Remove engine-level garbage (stale temporary files); never a blob or reference."""
        ctx = check_ctx(ctx)
        async with self._operation(ctx):
            await self._gc()

    async def close(self) -> None:
        """Close the engine: refuse new calls, cancel running ones, then free its resources. Idempotent.

        Calls still running when ``close()`` begins raise
        :class:`~ocicas.EngineClosedError` at their next checkpoint (a worker thread
        checks between chunks); ``close()`` returns once they all left and the
        engine's files, descriptors or connections, and its open readers, are released.
        """
        await self._lifecycle.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._lifecycle.closed

    def _check_open(self) -> None:
        self._lifecycle.check()

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with bounded_shield(_CLOSE_TIMEOUT):
            await self.close()

    # -- what a backend implements ----------------------------------------------------

    @abstractmethod
    async def _put_blob(self, source: BlobSource, verifier: Verifier) -> tuple[Digest, int]:
        """Store ``source``, fed through ``verifier``; store nothing unless ``verifier.verify()`` passes."""

    @abstractmethod
    async def _open_blob(self, digest: Digest) -> RawBlob:
        """The raw bytes of ``digest``; :class:`~ocicas.BlobNotFoundError` if absent."""

    @abstractmethod
    async def _stat_blob(self, digest: Digest) -> int:
        """The size of ``digest``; :class:`~ocicas.BlobNotFoundError` if absent."""

    @abstractmethod
    async def _delete_blob(self, digest: Digest) -> None:
        """Remove ``digest``; nothing if absent."""

    @abstractmethod
    async def _list_blobs(self) -> list[Digest]:
        """Every stored digest, sorted."""

    async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
        """Default: one :meth:`_stat_blob` (and, for ``head``, one read) each, with no times."""
        out: dict[Digest, BlobInfo] = {}
        for digest in digests:
            try:
                size = await self._stat_blob(digest)
                prefix = b""
                if head:
                    raw = await self._open_blob(digest)
                    async with BlobReader(digest, raw) as reader:
                        prefix = await reader.read(head)
            except BlobNotFoundError:
                continue
            out[digest] = BlobInfo(size, None, prefix)
        return out

    async def _touch_blobs(self, digests: list[Digest]) -> dict[Digest, BlobInfo]:
        """Default, for engines without blob times: only report them."""
        return await self._stat_blobs(digests, 0)

    async def _delete_blobs(self, digests: list[Digest], unmodified_since: float | None) -> dict[Digest, int]:
        """Default: without blob times nothing is old enough with ``unmodified_since``; else one by one."""
        if unmodified_since is not None:
            return {}
        removed: dict[Digest, int] = {}
        for digest in digests:
            try:
                size = await self._stat_blob(digest)
            except BlobNotFoundError:
                continue
            await self._delete_blob(digest)
            removed[digest] = size
        return removed

    # -- the collector's own hooks: plain ``str`` digests (text already validated by the engine) and
    # plain containers, so that a collection of 200,000 blobs makes no per-blob Digest or BlobInfo
    # (tracked objects that provoke full runs of Python's cyclic garbage collector)

    async def _gc_list(self) -> list[str]:
        """Every stored digest as text, in the order the engine sweeps fastest. Default: :meth:`_list_blobs`."""
        return list[str](await self._list_blobs())

    async def _gc_scan(self, wanted: Callable[[str], bool]) -> AsyncGenerator[list[str], None]:
        """The stored digests ``wanted`` accepts, as text, in batches of bounded size, in the order the engine
        sweeps fastest (``wanted`` may run in a worker thread). Default: :meth:`_gc_list`, in pieces."""
        listed = await self._gc_list()
        for start in range(0, len(listed), GC_SCAN_BATCH):
            kept = await run_sync(_kept, listed[start : start + GC_SCAN_BATCH], wanted)
            if kept:  # a batch of live blobs only: nothing to triage
                yield kept

    async def _gc_triage(
        self, digests: list[str], cutoff: float | None, head: int, limit: int
    ) -> tuple[dict[str, int], list[str], list[str], list[str]]:
        """Sort the present blobs among ``digests``: ``(sizes, fresh, old, json_like)``.

        ``sizes`` holds every present blob's size; ``fresh`` the blobs written or
        freshened at or after ``cutoff`` (a POSIX time; ``None``: none is fresh; an
        unknown age is fresh); ``old`` the others, in the order given; with ``head``,
        ``json_like`` the old ones of at most ``limit`` bytes whose first ``head``
        bytes may start a JSON document. Default: :meth:`_stat_blobs`.
        """
        infos = await self._stat_blobs([Digest(d) for d in digests], head)
        sizes: dict[str, int] = {}
        fresh: list[str] = []
        old: list[str] = []
        json_like: list[str] = []
        for digest in digests:
            info = infos.get(digest)  # type: ignore[call-overload]
            if info is None:
                continue
            sizes[digest] = info.size
            if cutoff is not None and (info.modified is None or info.modified >= cutoff):
                fresh.append(digest)
                continue
            old.append(digest)
            if head and info.size <= limit and info.head.lstrip()[:1] in (b"{", b""):
                json_like.append(digest)
        return sizes, fresh, old, json_like

    async def _gc_delete(
        self, digests: list[str], unmodified_since: float | None, clock: list[float]
    ) -> dict[str, int]:
        """:meth:`_delete_blobs` of digests given as text, one of a collection's runs.

        ``clock[0]``, shared by the runs of one collection, is the monotonic time its sweep last let
        writers in: an engine that pauses for fairness keeps it, so the pauses keep their rhythm across
        runs. Default: unused.
        """
        return dict[str, int]((await self._delete_blobs([Digest(d) for d in digests], unmodified_since)).items())

    async def _read_nodes(
        self, nodes: list[Descriptor], expand: Callable[[Descriptor, bytes], list[Descriptor]]
    ) -> dict[str, tuple[bytes, list[Descriptor]]]:
        """A walk's fast path: the nodes among ``nodes`` read, verified and expanded without a fault.

        Anything left out (absent, unverifiable, unparseable) the walk reads the
        usual way, which reports it exactly. Default: nothing (every node is read
        the usual way).
        """
        return {}

    @property
    def _gc_rw(self) -> SharedExclusiveLock:
        lock: SharedExclusiveLock | None = self.__dict__.get("_gc_rw_lock")
        if lock is None:
            lock = self.__dict__["_gc_rw_lock"] = SharedExclusiveLock()
        return lock

    def _gc_lock(self) -> AbstractAsyncContextManager[None]:
        """The collector's lock, exclusive. Default: this engine object's, in this process."""
        return self._gc_rw.exclusive()

    def _gc_shared(self) -> AbstractAsyncContextManager[None]:
        """The collector's lock, shared (tagging, leased puts). Default: this engine object's."""
        return self._gc_rw.shared()

    async def _lease_begin(self, lease_id: str) -> None:
        """Start recording a lease. Default: in this process only."""
        self.__dict__.setdefault("_lease_table", {})[lease_id] = set()

    async def _lease_record(self, lease_id: str, digests: list[Digest]) -> None:
        """Add ``digests`` to a live lease."""
        self.__dict__["_lease_table"][lease_id].update(digests)

    async def _lease_end(self, lease_id: str) -> None:
        """End a lease: its blobs are ordinary blobs again."""
        self.__dict__.get("_lease_table", {}).pop(lease_id, None)

    async def _leased_blobs(self) -> set[Digest]:
        """Every blob a live lease protects (called by a collector holding the lock exclusively)."""
        table: dict[str, set[Digest]] = self.__dict__.get("_lease_table", {})
        return set().union(*table.values())

    async def _mount_blob(self, source: Engine, digest: Digest, size: int) -> bool:
        """Default: no mounting."""
        return False

    async def _list_broken_roots(self) -> list[BrokenRoot]:
        """Default: every root parses."""
        return []

    async def _check_and_update_references(
        self, changes: dict[str, Descriptor | None], replace: bool, targets: list[tuple[str, Descriptor]]
    ) -> None:
        """Under the collector's lock, shared: check ``targets`` are complete, then apply ``changes``.

        Default: :func:`~ocicas._tagging.check_closure`, then ``_update_references``. A
        backend may do both in one step (the directory engine checks in the group commit's hop).
        """
        if targets:
            from ._tagging import check_closure  # the graph walk builds on this module

            await check_closure(self, targets)
        await self._update_references(changes, replace)

    async def _closure_heads(
        self, roots: list[Descriptor]
    ) -> tuple[dict[Digest, tuple[Descriptor, list[Descriptor]]], dict[Digest, BlobInfo]]:
        """For a tag's content check, in one cheap look: the nodes reached from ``roots``, read, verified and
        parsed (each one's descriptor and its children less its subject), and the stats of their leaves.

        Only the happy path: if anything is left out (absent, unverifiable,
        large) the check walks the usual way, which reports it. Default: nothing.
        """
        return {}, {}

    async def _referrers(self, subject: Digest, artifact_type: str | None) -> list[Descriptor]:
        """Default: every blob that can be a JSON document is read (``_list_blobs``, ``_stat_blobs``)."""
        from ._referrers import scan_referrers  # it imports this module

        return await scan_referrers(self, subject, artifact_type)

    @abstractmethod
    async def _update_references(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        """Apply ``changes`` (names validated, values ``Descriptor`` or ``None``), all or nothing."""

    @abstractmethod
    async def _get_reference(self, name: str) -> Descriptor:
        """The descriptor under ``name``; :class:`~ocicas.ReferenceNotFoundError` if absent."""

    @abstractmethod
    async def _list_references(self) -> list[str]:
        """Every name, sorted."""

    @abstractmethod
    async def _list_roots(self) -> list[Descriptor]:
        """The root descriptors (named ones annotated)."""

    @abstractmethod
    async def _gc(self) -> None:
        """Remove engine-level garbage."""

    @abstractmethod
    async def _release(self) -> None:
        """Free the engine's resources; called once, after every operation left."""


def _kept(digests: list[str], wanted: Callable[[str], bool]) -> list[str]:
    return [digest for digest in digests if wanted(digest)]
