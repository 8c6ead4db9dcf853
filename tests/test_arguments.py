"""Arguments are checked at the door: a wrong type raises TypeError naming the parameter,
a bad value InvalidError naming it, and nothing is stored, deleted or changed meanwhile."""

from __future__ import annotations

import ast
import datetime
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import ocicas
from ocicas import Context, Descriptor, Digest, Engine, InvalidError, Platform
from ocicas.testing import sha256
from tests.images import LAYER, MANIFEST, put_image


def case_ids(cases: list[Any]) -> list[str]:
    """Test ids from each case's keyword arguments, the same in every process (no object addresses)."""
    return [re.sub(r" at 0x[0-9a-f]+>", ">", str(case[0])) for case in cases]


pytestmark = pytest.mark.anyio

NAN = math.nan
SOME_DIGEST = sha256(b"absent")


def assert_names(caught: pytest.ExceptionInfo[BaseException], exc_type: type[BaseException], name: str) -> None:
    """The exception is exactly ``exc_type`` and its message names ``name``."""
    assert caught.type is exc_type, f"{caught.type.__name__}: {caught.value}"
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", str(caught.value)), str(caught.value)


async def refused(exc_type: type[BaseException], name: str, call: Callable[[], Any]) -> None:
    """``call()`` (awaited if it returns an awaitable) raises exactly ``exc_type``, naming ``name``."""

    async def run() -> None:
        result = call()
        if isinstance(result, Awaitable):
            await result

    with pytest.raises(exc_type) as caught:
        await run()
    assert_names(caught, exc_type, name)


async def state(engine: Engine) -> tuple[list[str], list[Digest], list[Descriptor]]:
    """What a careless call must leave alone."""
    return await engine.list_references(), await engine.list_blobs(), await engine.list_roots()


@pytest.fixture
async def seeded(engine: Engine) -> Engine:
    """``engine`` with image ``v1`` and one unreachable blob (which a successful gc(grace_period=0) removes)."""
    descriptor, _ = await put_image(engine, [b"layer one"], name="one")
    await engine.put_reference("v1", descriptor)
    await engine.put_blob(b"garbage")
    return engine


def sync_policy(digest: Digest) -> bool:
    return True


async def async_policy(digest: Digest) -> bool:
    return True


# -- gc ------------------------------------------------------------------------------------------


GC_CASES = [
    ({"grace_period": "1h"}, TypeError, "grace_period"),
    ({"grace_period": True}, TypeError, "grace_period"),
    ({"grace_period": None}, TypeError, "grace_period"),
    ({"grace_period": -1}, InvalidError, "grace_period"),
    ({"grace_period": NAN}, InvalidError, "grace_period"),
    ({"grace_period": datetime.timedelta(seconds=-1)}, InvalidError, "grace_period"),
    ({"referrers": "yes"}, TypeError, "referrers"),
    ({"broken_ok": 1}, TypeError, "broken_ok"),
    ({"dry_run": None}, TypeError, "dry_run"),
    ({"policy": sync_policy}, TypeError, "policy"),
    ({"policy": 5}, TypeError, "policy"),
    ({"concurrency": 0}, InvalidError, "concurrency"),
    ({"concurrency": 2.0}, TypeError, "concurrency"),
    ({"concurrency": True}, TypeError, "concurrency"),
    ({"max_size": -1}, InvalidError, "max_size"),
    ({"max_size": "1000"}, TypeError, "max_size"),
    ({"ctx": 5.0}, TypeError, "ctx"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "name"), GC_CASES, ids=case_ids(GC_CASES))
async def test_gc_refuses(seeded: Engine, kwargs: dict[str, Any], exc_type: type[Exception], name: str) -> None:
    before = await state(seeded)
    await refused(exc_type, name, lambda: ocicas.gc(seeded, **{"grace_period": 0, **kwargs}))
    assert await state(seeded) == before


async def test_gc_refuses_a_path_for_the_engine(tmp_path: Path) -> None:
    await refused(TypeError, "engine", lambda: ocicas.gc(str(tmp_path)))  # type: ignore[arg-type]


async def test_gc_takes_a_timedelta_grace_period(seeded: Engine) -> None:
    garbage = sha256(b"garbage")
    kept = await ocicas.gc(seeded, grace_period=datetime.timedelta(hours=1))
    assert kept.removed == ()
    assert garbage in kept.fresh
    gone = await ocicas.gc(seeded, grace_period=datetime.timedelta(0))
    assert gone.removed == (garbage,)


async def test_gc_policy_that_returns_no_bool_deletes_nothing(seeded: Engine) -> None:
    async def forgetful(digest: Digest) -> bool:
        return None  # type: ignore[return-value]

    before = await state(seeded)
    await refused(TypeError, "policy", lambda: ocicas.gc(seeded, grace_period=0, policy=forgetful))
    assert await state(seeded) == before


async def test_gc_takes_an_object_with_async_call_as_policy(seeded: Engine) -> None:
    class Keep:
        async def __call__(self, digest: Digest) -> bool:
            return False

    result = await ocicas.gc(seeded, grace_period=0, policy=Keep())
    assert result.removed == ()
    assert result.vetoed == {sha256(b"garbage")}


# -- copy ----------------------------------------------------------------------------------------


async def _async_progress(event: ocicas.CopyEvent) -> None:
    pass


COPY_CASES = [
    ({"dst_ref": 5}, TypeError, "dst_ref"),
    ({"dst_ref": "Not A Name"}, InvalidError, "dst_ref"),
    ({"referrers": "no"}, TypeError, "referrers"),
    ({"replace": None}, TypeError, "replace"),
    ({"platforms": "linux/amd64"}, TypeError, "platforms"),
    ({"platforms": Platform(os="linux", architecture="amd64")}, TypeError, "platforms"),
    ({"platforms": 5}, TypeError, "platforms"),
    ({"platforms": [5]}, TypeError, "platforms"),
    ({"platforms": ["linux"]}, InvalidError, "platforms"),
    ({"concurrency": 0}, InvalidError, "concurrency"),
    ({"concurrency": "4"}, TypeError, "concurrency"),
    ({"progress": 5}, TypeError, "progress"),
    ({"progress": _async_progress}, TypeError, "progress"),
    ({"max_size": -1}, InvalidError, "max_size"),
    ({"max_size": 1.5}, TypeError, "max_size"),
    ({"ctx": 5.0}, TypeError, "ctx"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "name"), COPY_CASES, ids=case_ids(COPY_CASES))
async def test_copy_refuses(seeded: Engine, kwargs: dict[str, Any], exc_type: type[Exception], name: str) -> None:
    before = await state(seeded)
    async with ocicas.MemoryEngine() as dst:
        await refused(exc_type, name, lambda: ocicas.copy(seeded, "v1", dst, **kwargs))
        assert await state(dst) == ([], [], [])
    assert await state(seeded) == before


async def test_copy_to_a_path_names_dst(seeded: Engine, tmp_path: Path) -> None:
    """Issue 12: ``copy(src, "v1", "/path")`` raised AttributeError about touch_blobs."""
    target = tmp_path / "target"
    target.mkdir()
    before = await state(seeded)
    await refused(TypeError, "dst", lambda: ocicas.copy(seeded, "v1", str(target)))  # type: ignore[arg-type]
    await refused(TypeError, "dst", lambda: ocicas.copy(seeded, "v1", target))  # type: ignore[arg-type]
    assert await state(seeded) == before
    assert list(target.iterdir()) == []


async def test_copy_from_a_path_names_src(tmp_path: Path) -> None:
    async with ocicas.MemoryEngine() as dst:
        await refused(TypeError, "src", lambda: ocicas.copy(str(tmp_path), "v1", dst))  # type: ignore[arg-type]
        assert await state(dst) == ([], [], [])


@pytest.mark.parametrize(
    ("src_ref", "exc_type"), [(42, TypeError), (None, TypeError), (b"v1", TypeError), ("Not A Name", InvalidError)]
)
async def test_copy_refuses_src_ref(seeded: Engine, src_ref: Any, exc_type: type[Exception]) -> None:
    async with ocicas.MemoryEngine() as dst:
        await refused(exc_type, "src_ref", lambda: ocicas.copy(seeded, src_ref, dst))
        assert await state(dst) == ([], [], [])


class Mounting(ocicas.MemoryEngine):
    """An engine with the cross-repository mount capability: it links blobs of its ``peer`` itself."""

    def __init__(self, peer: Engine) -> None:
        super().__init__()
        self.peer = peer
        self.mounted: list[Digest] = []

    async def _mount_blob(self, source: Engine, digest: Digest, size: int) -> bool:
        if source is not self.peer:
            return False
        await self.put_blob(await source.read_blob(digest), expected_digest=digest, expected_size=size)
        self.mounted.append(digest)
        return True


async def test_copy_mounts_through_the_engine_capability(seeded: Engine) -> None:
    manifest = await seeded.get_reference("v1")
    layers_and_config = set((await ocicas.walk(seeded, [manifest])).digests()) - {manifest.digest}
    async with Mounting(seeded) as dst:
        result = await ocicas.copy(seeded, "v1", dst)
        assert set(dst.mounted) == layers_and_config  # the manifest was read while planning: put, not mounted
        assert set(result.copied) == layers_and_config | {manifest.digest}
        assert await dst.get_reference("v1") == manifest
    async with ocicas.MemoryEngine() as stranger, Mounting(stranger) as dst:
        await ocicas.copy(seeded, "v1", dst)
        assert dst.mounted == []  # the capability declined: bytes were copied


def test_copy_does_not_import_a_backend() -> None:
    """Backends stay behind the protocol: ``_copy`` imports nothing from ``ocicas.registry``."""
    source = (Path(ocicas.__file__).parent / "_copy.py").read_text()
    modules: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            modules.append(node.module or "")
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
    assert not [m for m in modules if "registry" in m]


# -- build_image, build_index --------------------------------------------------------------------


BUILD_IMAGE_CASES = [
    ({"layers": b"a layer"}, TypeError, "layers"),
    ({"layers": "a layer"}, TypeError, "layers"),
    ({"layers": 5}, TypeError, "layers"),
    ({"layers": [b"ok", 5]}, TypeError, "layers"),
    ({"layers": ["text"]}, TypeError, "layers"),
    ({"reference": 5}, TypeError, "reference"),
    ({"reference": "Not A Name"}, InvalidError, "reference"),
    ({"platform": 5}, TypeError, "platform"),
    ({"platform": "linux"}, InvalidError, "platform"),
    ({"layer_media_type": 5}, TypeError, "layer_media_type"),
    ({"layer_media_type": "nope"}, InvalidError, "layer_media_type"),
    ({"annotations": [("a", "b")]}, TypeError, "annotations"),
    ({"annotations": {"a": 1}}, InvalidError, "annotations"),
    ({"config": 5}, TypeError, "config"),
    ({"ctx": 5.0}, TypeError, "ctx"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "name"), BUILD_IMAGE_CASES, ids=case_ids(BUILD_IMAGE_CASES))
async def test_build_image_refuses(
    seeded: Engine, kwargs: dict[str, Any], exc_type: type[Exception], name: str
) -> None:
    before = await state(seeded)
    arguments = {"layers": [b"a new layer"], "reference": "v2", **kwargs}
    layers = arguments.pop("layers")
    await refused(exc_type, name, lambda: ocicas.build_image(seeded, layers, **arguments))
    assert await state(seeded) == before


async def test_build_image_refuses_a_path_for_the_engine(tmp_path: Path) -> None:
    await refused(TypeError, "engine", lambda: ocicas.build_image(str(tmp_path), [b"x"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc_type", "name"),
    [
        ({"reference": 5}, TypeError, "reference"),
        ({"reference": "Not A Name"}, InvalidError, "reference"),
        ({"annotations": 5}, TypeError, "annotations"),
        ({"ctx": 5.0}, TypeError, "ctx"),
    ],
)
async def test_build_index_refuses(
    seeded: Engine, kwargs: dict[str, Any], exc_type: type[Exception], name: str
) -> None:
    manifest = await seeded.get_reference("v1")
    before = await state(seeded)
    await refused(exc_type, name, lambda: ocicas.build_index(seeded, [manifest], **kwargs))
    assert await state(seeded) == before


async def test_build_index_refuses_what_is_not_descriptors(seeded: Engine) -> None:
    manifest = await seeded.get_reference("v1")
    before = await state(seeded)
    await refused(TypeError, "manifests", lambda: ocicas.build_index(seeded, manifest))  # type: ignore[arg-type]
    await refused(TypeError, "manifests", lambda: ocicas.build_index(seeded, [manifest.to_dict()]))  # type: ignore[list-item]
    await refused(TypeError, "engine", lambda: ocicas.build_index("layout", [manifest]))  # type: ignore[arg-type]
    assert await state(seeded) == before


# -- walk, resolve_reference, children -----------------------------------------------------------


WALK_CASES = [
    ({"concurrency": 0}, InvalidError, "concurrency"),
    ({"concurrency": "16"}, TypeError, "concurrency"),
    ({"broken_ok": "yes"}, TypeError, "broken_ok"),
    ({"max_size": -1}, InvalidError, "max_size"),
    ({"graph": {}}, TypeError, "graph"),
    ({"expand": 5}, TypeError, "expand"),
    ({"keep_data": 1}, TypeError, "keep_data"),
    ({"ctx": 5.0}, TypeError, "ctx"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "name"), WALK_CASES, ids=case_ids(WALK_CASES))
async def test_walk_refuses(seeded: Engine, kwargs: dict[str, Any], exc_type: type[Exception], name: str) -> None:
    manifest = await seeded.get_reference("v1")
    await refused(exc_type, name, lambda: ocicas.walk(seeded, [manifest], **kwargs))


async def test_walk_refuses_what_is_not_roots(seeded: Engine) -> None:
    manifest = await seeded.get_reference("v1")
    await refused(TypeError, "roots", lambda: ocicas.walk(seeded, manifest))  # type: ignore[arg-type]
    await refused(TypeError, "roots", lambda: ocicas.walk(seeded, [manifest.digest]))  # type: ignore[list-item]
    await refused(TypeError, "roots", lambda: ocicas.walk(seeded, None))  # type: ignore[arg-type]
    await refused(TypeError, "engine", lambda: ocicas.walk("layout", [manifest]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "exc_type", "name"),
    [
        ((None,), {}, TypeError, "name"),
        (("Not A Name",), {}, InvalidError, "name"),
        (("v1",), {"platform": 5}, TypeError, "platform"),
        (("v1",), {"platform": "linux"}, InvalidError, "platform"),
        (("v1",), {"max_size": -1}, InvalidError, "max_size"),
        (("v1",), {"ctx": 5.0}, TypeError, "ctx"),
    ],
)
async def test_resolve_reference_refuses(
    seeded: Engine, args: tuple[Any, ...], kwargs: dict[str, Any], exc_type: type[Exception], name: str
) -> None:
    await refused(exc_type, name, lambda: ocicas.resolve_reference(seeded, *args, **kwargs))


async def test_resolve_reference_refuses_a_path_for_the_engine() -> None:
    await refused(TypeError, "engine", lambda: ocicas.resolve_reference("layout", "v1"))  # type: ignore[arg-type]


def test_children_refuses_wrong_types() -> None:
    descriptor = Descriptor(media_type=MANIFEST, digest=SOME_DIGEST, size=2)
    with pytest.raises(TypeError) as caught:
        ocicas.children(descriptor.to_dict(), b"{}")  # type: ignore[arg-type]
    assert_names(caught, TypeError, "descriptor")
    with pytest.raises(TypeError) as caught:
        ocicas.children(descriptor, "{}")  # type: ignore[arg-type]
    assert_names(caught, TypeError, "data")


# -- from_descriptor, read_described -------------------------------------------------------------


@pytest.mark.parametrize("read", ["from_descriptor", "read_described"])
@pytest.mark.parametrize(
    ("kwargs", "exc_type", "name"),
    [
        ({"max_size": -1}, InvalidError, "max_size"),
        ({"max_size": "1"}, TypeError, "max_size"),
        ({"ctx": 5.0}, TypeError, "ctx"),
    ],
)
async def test_reading_a_descriptor_refuses(
    seeded: Engine, read: str, kwargs: dict[str, Any], exc_type: type[Exception], name: str
) -> None:
    function: Any = ocicas.from_descriptor if read == "from_descriptor" else ocicas.read_described
    manifest = await seeded.get_reference("v1")
    await refused(exc_type, name, lambda: function(seeded, manifest, **kwargs))
    await refused(TypeError, "descriptor", lambda: function(seeded, manifest.digest))
    await refused(TypeError, "descriptor", lambda: function(seeded, manifest.to_dict()))
    await refused(TypeError, "engine", lambda: function("layout", manifest))


# -- Context -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "exc_type"), [("1", TypeError), (None, TypeError), (True, TypeError), (NAN, InvalidError)]
)
def test_context_timeout_must_be_a_real_number(seconds: Any, exc_type: type[Exception]) -> None:
    with pytest.raises(exc_type) as caught:
        Context.background().with_timeout(seconds)
    assert_names(caught, exc_type, "seconds")
    with pytest.raises(exc_type) as caught:
        Context.background().with_deadline(seconds)
    assert_names(caught, exc_type, "deadline")


def test_context_timeout_takes_a_timedelta_and_a_past_one_is_done() -> None:
    live = Context.background().with_timeout(datetime.timedelta(hours=1))
    assert not live.done
    assert live.deadline is not None
    assert Context.background().with_timeout(-1).done
    assert Context.background().with_timeout(datetime.timedelta(seconds=-1)).done


# -- Descriptor, Platform, parse_platform, validate_reference_name -------------------------------


DESCRIPTOR_CASES = [
    ({"size": "3"}, TypeError, "size"),
    ({"size": True}, TypeError, "size"),
    ({"size": 3.0}, TypeError, "size"),
    ({"size": -1}, InvalidError, "size"),
    ({"size": 2**63}, InvalidError, "size"),
    ({"digest": None}, TypeError, "digest"),
    ({"digest": b"sha256:00"}, TypeError, "digest"),
    ({"digest": "sha256:00"}, InvalidError, "digest"),
    ({"media_type": 5}, TypeError, "media_type"),
    ({"media_type": "nope"}, InvalidError, "mediaType"),
    ({"urls": "http://example.com/x"}, TypeError, "urls"),
    ({"annotations": [("a", "b")]}, TypeError, "annotations"),
    ({"platform": {"os": "linux", "architecture": "amd64"}}, TypeError, "platform"),
    ({"platform": "linux/amd64"}, TypeError, "platform"),
    ({"artifact_type": 5}, TypeError, "artifact_type"),
    ({"data": "abc"}, TypeError, "data"),
    ({"extra": None}, TypeError, "extra"),
]


@pytest.mark.parametrize(("kwargs", "exc_type", "name"), DESCRIPTOR_CASES, ids=case_ids(DESCRIPTOR_CASES))
def test_descriptor_refuses(kwargs: dict[str, Any], exc_type: type[Exception], name: str) -> None:
    with pytest.raises(exc_type) as caught:
        Descriptor(**{"media_type": LAYER, "digest": SOME_DIGEST, "size": 6, **kwargs})
    assert_names(caught, exc_type, name)


def test_descriptor_from_json_still_raises_invalid_error() -> None:
    """JSON of the wrong shape is invalid content, not a programming error."""
    for bad in ({"size": "3"}, {"size": True}, {"digest": None}, {"mediaType": 5}, {"platform": "linux/amd64"}):
        with pytest.raises(InvalidError):
            Descriptor.from_dict({"mediaType": LAYER, "digest": SOME_DIGEST, "size": 6, **bad})


PLATFORM_CASES = [
    ({"architecture": None}, "architecture"),
    ({"os": 5}, "os"),
    ({"os_version": 10}, "os_version"),
    ({"variant": b"v8"}, "variant"),
    ({"features": "sse4"}, "features"),
    ({"os_features": [5]}, "os_features"),
    ({"extra": None}, "extra"),
]


@pytest.mark.parametrize(("kwargs", "name"), PLATFORM_CASES, ids=case_ids(PLATFORM_CASES))
def test_platform_refuses(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(TypeError) as caught:
        Platform(**{"os": "linux", "architecture": "amd64", **kwargs})
    assert_names(caught, TypeError, name)


def test_platform_keeps_feature_lists_as_tuples() -> None:
    platform = Platform(os="windows", architecture="amd64", os_features=["win32k"])  # type: ignore[arg-type]
    assert platform.os_features == ("win32k",)
    assert platform == Platform.from_dict(platform.to_dict())


@pytest.mark.parametrize(("value", "exc_type"), [(5, TypeError), (None, TypeError), ("linux", InvalidError)])
def test_parse_platform_refuses(value: Any, exc_type: type[Exception]) -> None:
    with pytest.raises(exc_type) as caught:
        ocicas.parse_platform(value)
    assert_names(caught, exc_type, "platform")


@pytest.mark.parametrize("value", [5, None, b"v1"])
def test_validate_reference_name_refuses_what_is_not_a_str(value: Any) -> None:
    with pytest.raises(TypeError) as caught:
        ocicas.validate_reference_name(value)
    assert_names(caught, TypeError, "name")


# -- open_layout (the lead's engine work) -------------------------------------------------------


async def test_open_layout_refuses_an_empty_path() -> None:
    """Issue 12: ``open_layout("")`` opened the working directory."""
    await refused(InvalidError, "path", lambda: ocicas.open_layout(""))


async def test_open_layout_refuses_none() -> None:
    await refused(TypeError, "path", lambda: ocicas.open_layout(None))  # type: ignore[arg-type]


# -- engine methods (the lead's engine work: these pass once it merges) -----------------------------


class TestEngineDoor:
    """Every engine method checks its arguments before it touches the store (issue 12, point 5)."""

    async def test_put_reference_none_does_not_delete(self, seeded: Engine) -> None:
        before = await state(seeded)
        await refused(TypeError, "descriptor", lambda: seeded.put_reference("v1", None))  # type: ignore[arg-type]
        assert await state(seeded) == before

    async def test_put_reference_name_must_be_a_str(self, seeded: Engine) -> None:
        manifest = await seeded.get_reference("v1")
        before = await state(seeded)
        await refused(TypeError, "name", lambda: seeded.put_reference(5, manifest))  # type: ignore[arg-type]
        await refused(TypeError, "descriptor", lambda: seeded.put_reference("v2", manifest.to_dict()))  # type: ignore[arg-type]
        assert await state(seeded) == before

    async def test_update_references_takes_a_mapping(self, seeded: Engine) -> None:
        manifest = await seeded.get_reference("v1")
        before = await state(seeded)
        await refused(TypeError, "changes", lambda: seeded.update_references([("v2", manifest)]))  # type: ignore[arg-type]
        await refused(TypeError, "changes", lambda: seeded.update_references({"v2": manifest.digest}))  # type: ignore[dict-item]
        await refused(TypeError, "replace", lambda: seeded.update_references({"v2": manifest}, replace="yes"))  # type: ignore[arg-type]
        assert await state(seeded) == before

    async def test_ctx_must_be_a_context(self, seeded: Engine) -> None:
        before = await state(seeded)
        bad: Any = 5.0
        await refused(TypeError, "ctx", lambda: seeded.put_blob(b"new", ctx=bad))
        await refused(TypeError, "ctx", lambda: seeded.get_reference("v1", ctx=bad))
        await refused(TypeError, "ctx", lambda: seeded.list_blobs(ctx=bad))
        await refused(TypeError, "ctx", lambda: seeded.delete_reference("v1", ctx=bad))
        await refused(TypeError, "ctx", lambda: seeded.delete_blob(sha256(b"garbage"), ctx=bad))
        with pytest.raises(TypeError) as caught:
            async with seeded.gc_lock(ctx=bad):
                pass
        assert_names(caught, TypeError, "ctx")
        assert await state(seeded) == before

    @pytest.mark.parametrize(
        ("expected_size", "exc_type"), [("3", TypeError), (True, TypeError), (3.0, TypeError), (-1, InvalidError)]
    )
    async def test_expected_size(self, seeded: Engine, expected_size: Any, exc_type: type[Exception]) -> None:
        before = await state(seeded)
        await refused(exc_type, "expected_size", lambda: seeded.put_blob(b"new", expected_size=expected_size))
        assert await state(seeded) == before

    async def test_expected_digest(self, seeded: Engine) -> None:
        before = await state(seeded)
        await refused(TypeError, "expected_digest", lambda: seeded.put_blob(b"new", expected_digest=5))  # type: ignore[arg-type]
        await refused(InvalidError, "expected_digest", lambda: seeded.put_blob(b"new", expected_digest="sha256:00"))
        assert await state(seeded) == before

    async def test_source_must_be_bytes(self, seeded: Engine) -> None:
        before = await state(seeded)
        await refused(TypeError, "source", lambda: seeded.put_blob("text"))  # type: ignore[arg-type]
        await refused(TypeError, "source", lambda: seeded.put_blob(None))  # type: ignore[arg-type]
        assert await state(seeded) == before

    @pytest.mark.parametrize(("max_size", "exc_type"), [(-1, InvalidError), ("10", TypeError), (True, TypeError)])
    async def test_max_size(self, seeded: Engine, max_size: Any, exc_type: type[Exception]) -> None:
        await refused(exc_type, "max_size", lambda: seeded.read_blob(sha256(b"garbage"), max_size=max_size))

    @pytest.mark.parametrize("method", ["stat_blobs", "touch_blobs", "delete_blobs"])
    async def test_many_digests_are_not_one_string(self, seeded: Engine, method: str) -> None:
        before = await state(seeded)
        digest = sha256(b"garbage")
        await refused(TypeError, "digests", lambda: getattr(seeded, method)(digest))
        await refused(TypeError, "digests", lambda: getattr(seeded, method)([5]))
        assert await state(seeded) == before

    @pytest.mark.parametrize("method", ["stat_blobs", "touch_blobs", "delete_blobs"])
    async def test_many_digests_are_checked_in_pieces_all_the_same(self, seeded: Engine, method: str) -> None:
        # thousands of digests are checked a piece per turn of the event loop: a bad one late still refuses all
        before = await state(seeded)
        many = [sha256(n.to_bytes(4, "big")) for n in range(3000)]
        for bad, exc_type in ((5, TypeError), ("sha256:00", InvalidError)):
            await refused(exc_type, "digests", lambda: getattr(seeded, method)(iter([*many, bad])))  # noqa: B023
        assert await state(seeded) == before
        assert await getattr(seeded, method)(iter(many)) == {}  # none of them is present

    async def test_stat_blobs_head(self, seeded: Engine) -> None:
        await refused(InvalidError, "head", lambda: seeded.stat_blobs([], head=-1))
        await refused(TypeError, "head", lambda: seeded.stat_blobs([], head="1"))  # type: ignore[arg-type]

    @pytest.mark.parametrize("method", ["get_blob", "read_blob", "stat_blob", "delete_blob"])
    @pytest.mark.parametrize("digest", [None, 5, b"sha256:00"])
    async def test_digest_of_the_wrong_type(self, seeded: Engine, method: str, digest: Any) -> None:
        before = await state(seeded)
        await refused(TypeError, "digest", lambda: getattr(seeded, method)(digest))
        assert await state(seeded) == before

    async def test_reference_name_of_the_wrong_type(self, seeded: Engine) -> None:
        before = await state(seeded)
        await refused(TypeError, "name", lambda: seeded.get_reference(None))  # type: ignore[arg-type]
        await refused(TypeError, "name", lambda: seeded.delete_reference(5))  # type: ignore[arg-type]
        assert await state(seeded) == before

    async def test_a_descriptor_is_accepted_for_a_digest(self, seeded: Engine) -> None:
        data = b"garbage"
        descriptor = Descriptor(media_type=LAYER, digest=sha256(data), size=len(data))
        assert await seeded.read_blob(descriptor) == data
        assert await seeded.stat_blob(descriptor) == len(data)
        async with await seeded.get_blob(descriptor) as reader:
            assert await reader.read() == data

    async def test_a_descriptor_of_the_wrong_size_is_refused(self, seeded: Engine) -> None:
        data = b"garbage"
        wrong = Descriptor(media_type=LAYER, digest=sha256(data), size=len(data) + 1)
        with pytest.raises(ocicas.SizeMismatchError):
            await seeded.read_blob(wrong)
        with pytest.raises(ocicas.SizeMismatchError):
            await seeded.stat_blob(wrong)
        with pytest.raises(ocicas.SizeMismatchError):
            await seeded.get_blob(wrong)
