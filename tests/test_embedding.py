"""The embedding examples run and do what they say: a registry served from a layout, trio, aiofiles, a push.

``examples/serve_registry.py`` is pulled from by skopeo (exact digest sets), hit by
many concurrent whole and ranged requests while ``ocicas.gc`` collects garbage in
the same layout (exact bytes for every live blob), and checked endpoint by
endpoint against the distribution spec, corrupt blobs included. Expectations are
computed in the tests (``hashlib``, slicing), not by the example's own helpers.
Every server binds 127.0.0.1 only, and every request loop is bounded in count and time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from blockbuster import blockbuster_ctx

import ocicas
from ocicas import MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_LAYER_GZIP, MEDIA_TYPE_IMAGE_MANIFEST, Descriptor, Digest
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``name``."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if TYPE_CHECKING:  # mypy checks examples/ as top-level modules
    import aiofiles_io
    import push_to_registry
    import serve_registry
    import trio_program
else:
    aiofiles_io = _load("aiofiles_io")
    push_to_registry = _load("push_to_registry")
    serve_registry = _load("serve_registry")
    trio_program = _load("trio_program")

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any blocking call made on an asyncio loop by ocicas or by an example."""
    with blockbuster_ctx(["ocicas", aiofiles_io, push_to_registry, serve_registry, trio_program]):
        yield


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A reproducible gzip-compressed tar of ``files``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), mtime=0)


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, encoded = digest.partition(":")
    return layout / "blobs" / algorithm / encoded


def error_body(code: str, message: str) -> dict[str, object]:
    return {"errors": [{"code": code, "message": message, "detail": {}}]}


@asynccontextmanager
async def served(root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Run the example's server in this event loop on a free loopback port; a client for it."""
    sock = serve_registry.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = anyio.Event()

    async def run() -> None:
        await serve_registry.serve(root, sock, shutdown=stop.wait)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                yield client
        finally:
            stop.set()


@asynccontextmanager
async def server_process(root: Path, backend: str) -> AsyncIterator[int]:
    """Run ``examples/serve_registry.py`` as a program on a free loopback port; its port."""
    argv = [sys.executable, str(EXAMPLES / "serve_registry.py"), str(root), "--port", "0"]
    if backend == "trio":
        argv.append("--trio")
    process = await anyio.open_process(argv, stdout=subprocess.PIPE, stderr=None)
    async with process:
        try:
            assert process.stdout is not None
            with anyio.fail_after(30):
                first = b""
                while b"\n" not in first:
                    first += await process.stdout.receive()
            match = re.search(rb"on http://127\.0\.0\.1:(\d+)\n", first)
            assert match is not None, first
            yield int(match[1])
        finally:
            process.terminate()
            with anyio.fail_after(15):
                await process.wait()
    assert process.returncode == 0  # SIGTERM shuts it down gracefully


# -- skopeo pulls from it --------------------------------------------------------------------


async def test_skopeo_pulls_exactly_the_served_images(tmp_path: Path, anyio_backend: str) -> None:
    skopeo = require("skopeo")
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    rng = random.Random(1)
    async with await ocicas.open_layout(layout) as engine:
        amd64 = await ocicas.build_image(
            engine,
            [tar_gz({"hello.txt": b"hello\n"}), tar_gz({"big.bin": rng.randbytes(3 << 20)})],
            layer_media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP,
            platform="linux/amd64",
            reference="v1",
        )
        arm64 = await ocicas.build_image(
            engine,
            [tar_gz({"arm.txt": b"arm\n"})],
            layer_media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP,
            platform="linux/arm64",
        )
        multi = await ocicas.build_index(engine, [amd64, arm64], reference="multi")
        wanted = {
            "v1": (amd64, (await ocicas.walk(engine, [amd64])).digests()),
            "multi": (multi, (await ocicas.walk(engine, [multi])).digests()),
        }
    assert len(wanted["v1"][1]) == 4
    assert len(wanted["multi"][1]) == 8

    async with server_process(layout, anyio_backend) as port:
        for tag in wanted:
            await skopeo.run(
                "copy",
                "--all",
                "--src-tls-verify=false",
                "--insecure-policy",
                f"docker://127.0.0.1:{port}/team/app:{tag}",
                f"oci:{tmp_path / tag}:{tag}",
            )

    for tag, (root, digests) in wanted.items():
        async with await ocicas.open_layout(tmp_path / tag) as pulled:
            assert set(await pulled.list_blobs()) == digests
            assert (await pulled.get_reference(tag)).digest == root.digest
            for digest in digests:
                assert sha256(blob_path(tmp_path / tag, digest).read_bytes()) == digest


# -- many requests while gc runs ---------------------------------------------------------------


@dataclass
class Store:
    """A layout, what it holds, and which of it is live."""

    path: Path
    data: dict[Digest, bytes] = field(default_factory=dict)
    live: set[Digest] = field(default_factory=set)
    manifest: Descriptor | None = None


async def _store_with_garbage(path: Path) -> Store:
    rng = random.Random(2)
    store = Store(path)
    await ocicas.create_layout(path)
    async with await ocicas.open_layout(path) as engine:
        live_layers = [b"", b"x", rng.randbytes(1000), rng.randbytes(700_000), rng.randbytes((5 << 20) + 17)]
        store.manifest = await ocicas.build_image(engine, live_layers, reference="live")
        dead = await ocicas.build_image(engine, [rng.randbytes(300_000), rng.randbytes(2 << 20)])
        for _ in range(40):
            await engine.put_blob(rng.randbytes(rng.randrange(1, 1 << 20)))
        for digest in await engine.list_blobs():
            store.data[digest] = await engine.read_blob(digest, max_size=None)
        store.live = (await ocicas.walk(engine, [store.manifest])).digests()
    assert dead.digest not in store.live
    assert len(store.data) == len(store.live) + 4 + 40
    return store


@dataclass(frozen=True)
class Ask:
    """One planned request: what, of which blob, and the range asked for."""

    kind: str  # "full", "head", "range", "manifest"
    digest: Digest
    range: str | None = None
    expected: tuple[int, int] | None = None  # first and last byte; None: unsatisfiable


def _plan(store: Store, count: int) -> list[Ask]:
    rng = random.Random(3)
    digests = sorted(store.data)
    asks = []
    for _ in range(count):
        kind = rng.choice(["full", "full", "head", "range", "range", "range", "manifest"])
        digest = rng.choice(digests)
        size = len(store.data[digest])
        if kind != "range":
            asks.append(Ask(kind, digest))
            continue
        shape = rng.choice(["a-b", "a-", "-n", "past-end", "unsatisfiable"])
        if size == 0 or shape == "unsatisfiable":
            asks.append(Ask(kind, digest, rng.choice([f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"])))
            continue
        first = rng.randrange(size)
        last = rng.randrange(first, size)
        if shape == "a-b":
            asks.append(Ask(kind, digest, f"bytes={first}-{last}", (first, last)))
        elif shape == "a-":
            asks.append(Ask(kind, digest, f"bytes={first}-", (first, size - 1)))
        elif shape == "-n":
            n = rng.randrange(1, size + 10)
            asks.append(Ask(kind, digest, f"bytes=-{n}", (max(0, size - n), size - 1)))
        else:
            asks.append(Ask(kind, digest, f"bytes={first}-{size + 1000}", (first, size - 1)))
    return asks


async def _check(client: httpx.AsyncClient, store: Store, ask: Ask) -> str:
    """Send ``ask``; fail unless the answer is exact. Returns ``"ok"``, or ``"gone"`` for collected garbage."""
    data = store.data.get(ask.digest, b"")
    live = ask.digest in store.live
    url = f"/v2/some/name/blobs/{ask.digest}"
    if ask.kind == "manifest":
        assert store.manifest is not None
        reference = "live" if int(ask.digest[-1], 16) % 2 else store.manifest.digest
        response = await client.get(f"/v2/some/name/manifests/{reference}")
        assert response.status_code == 200
        assert response.headers["content-type"] == MEDIA_TYPE_IMAGE_MANIFEST
        assert response.headers["docker-content-digest"] == store.manifest.digest
        assert response.content == store.data[store.manifest.digest]
        return "ok"
    if ask.kind == "head":
        response = await client.head(url)
    else:
        response = await client.get(url, headers={"Range": ask.range} if ask.range else None)
    if response.status_code == 404 and not live:  # collected meanwhile: an exact "unknown", nothing else
        if ask.kind == "head":
            assert response.content == b""
        else:
            assert response.json() == error_body("BLOB_UNKNOWN", f"blob {ask.digest} is not known")
        return "gone"
    assert response.headers["docker-content-digest"] == ask.digest
    if ask.kind == "head":
        assert (response.status_code, response.headers["content-length"], response.content) == (
            200,
            str(len(data)),
            b"",
        )
    elif ask.kind == "full":
        assert (response.status_code, response.content) == (200, data)
    elif ask.expected is None:
        assert (response.status_code, response.headers["content-range"]) == (416, f"bytes */{len(data)}")
    else:
        first, last = ask.expected
        assert response.status_code == 206
        assert response.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
        assert response.headers["content-length"] == str(last + 1 - first)
        assert response.content == data[first : last + 1]
    return "ok"


async def test_live_blobs_are_served_whole_and_exact_while_gc_collects_the_same_layout(tmp_path: Path) -> None:
    store = await _store_with_garbage(tmp_path / "layout")
    garbage = sorted(set(store.data) - store.live)
    plan = iter(_plan(store, 1500))
    done = {"ok": 0, "gone": 0}
    during_gc = 0
    warmed_up = anyio.Event()  # 30 requests answered: time to collect
    collecting = anyio.Event()
    busy = anyio.Event()  # 60 requests answered since the collection began
    finished = anyio.Event()
    result: list[ocicas.GCResult] = []

    async def hold_until_busy(digest: Digest) -> bool:
        """A policy that vetoes nothing, but keeps the collection open until requests have flowed through it."""
        await busy.wait()
        return True

    async def collect() -> None:
        async with await ocicas.open_layout(store.path) as engine:
            collecting.set()
            result.append(await ocicas.gc(engine, grace_period=0, policy=hold_until_busy))
        finished.set()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal during_gc
        for ask in plan:
            if finished.is_set() and sum(done.values()) >= 400:
                return
            done[await _check(client, store, ask)] += 1
            if sum(done.values()) >= 30:
                warmed_up.set()
            if collecting.is_set() and not finished.is_set():
                during_gc += 1
                if during_gc >= 60:
                    busy.set()

    with anyio.fail_after(60):
        async with served(store.path) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(worker, client)
                await warmed_up.wait()
                tg.start_soon(collect)

            assert finished.is_set()
            assert during_gc >= 60
            assert sum(done.values()) >= 400
            assert result[0].removed == tuple(garbage)
            assert set(result[0].live) == store.live
            for digest in garbage:
                response = await client.get(f"/v2/some/name/blobs/{digest}")
                assert response.status_code == 404
                assert response.json() == error_body("BLOB_UNKNOWN", f"blob {digest} is not known")
            for digest in sorted(store.live):
                assert (await client.get(f"/v2/some/name/blobs/{digest}")).content == store.data[digest]
    assert sorted(os.listdir(store.path / "blobs" / "sha256")) == sorted(d.encoded for d in store.live)


# -- the endpoints, one by one ---------------------------------------------------------------------


async def test_a_directory_of_layouts_is_served_by_repository_name_in_the_spec_format(tmp_path: Path) -> None:
    app, tools = tmp_path / "team" / "app", tmp_path / "tools"
    for path in (app, tools):
        await ocicas.create_layout(path)
    async with await ocicas.open_layout(app) as engine:
        v1 = await ocicas.build_image(engine, [b"layer one"], reference="v1", platform="linux/amd64")
        other = await ocicas.build_image(engine, [b"layer two"], platform="linux/arm64")
        multi = await ocicas.build_index(engine, [v1, other], reference="multi")
        await engine.update_references(
            {"release+1": v1, "a-layer": (await ocicas.walk(engine, [v1])).descriptors[Digest(sha256(b"layer one"))]}
        )
        manifest_bytes = await engine.read_blob(v1.digest)
        index_bytes = await engine.read_blob(multi.digest)
    async with await ocicas.open_layout(tools) as engine:
        await ocicas.build_image(engine, [b"tool"], reference="latest")
    layer = sha256(b"layer one")

    async with served(tmp_path) as client:
        response = await client.get("/v2/")
        assert (response.status_code, response.json()) == (200, {})
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"

        for reference in ("v1", v1.digest):
            response = await client.get(f"/v2/team/app/manifests/{reference}")
            assert response.status_code == 200
            assert response.content == manifest_bytes
            assert response.headers["content-type"] == MEDIA_TYPE_IMAGE_MANIFEST
            assert response.headers["docker-content-digest"] == v1.digest
            assert response.headers["content-length"] == str(v1.size)
        for reference in ("multi", multi.digest):
            response = await client.get(f"/v2/team/app/manifests/{reference}")
            assert (response.status_code, response.content) == (200, index_bytes)
            assert response.headers["content-type"] == MEDIA_TYPE_IMAGE_INDEX
        response = await client.head("/v2/team/app/manifests/v1")
        assert (response.status_code, response.headers["content-length"], response.content) == (200, str(v1.size), b"")

        response = await client.get("/v2/team/app/tags/list")
        assert response.json() == {"name": "team/app", "tags": ["a-layer", "multi", "v1"]}  # release+1 is no tag
        response = await client.get("/v2/team/app/tags/list", params={"n": "1", "last": "a-layer"})
        assert response.json() == {"name": "team/app", "tags": ["multi"]}
        assert response.headers["link"] == '</v2/team/app/tags/list?n=1&last=multi>; rel="next"'
        assert (await client.get("/v2/tools/tags/list")).json() == {"name": "tools", "tags": ["latest"]}

        failures = [
            ("GET", "/v2/team/app/manifests/nope", 404, "MANIFEST_UNKNOWN", "manifest 'nope' is not known"),
            ("GET", "/v2/team/app/manifests/a-layer", 404, "MANIFEST_UNKNOWN", "manifest 'a-layer' is not known"),
            ("GET", f"/v2/team/app/manifests/{layer}", 404, "MANIFEST_UNKNOWN", f"manifest '{layer}' is not known"),
            ("GET", "/v2/tools/manifests/v1", 404, "MANIFEST_UNKNOWN", "manifest 'v1' is not known"),
            ("GET", "/v2/tools/manifests/_v1", 404, "MANIFEST_UNKNOWN", "manifest '_v1' is not known"),
            ("GET", "/v2/team/other/manifests/v1", 404, "NAME_UNKNOWN", "repository 'team/other' is not known"),
            ("GET", "/v2/team/blobs/" + layer, 404, "NAME_UNKNOWN", "repository 'team' is not known"),
            ("GET", "/v2/Team/App/manifests/v1", 400, "NAME_INVALID", "invalid repository name 'Team/App'"),
            ("GET", "/v2/team/app/blobs/sha256:abc", 400, "DIGEST_INVALID", "invalid digest 'sha256:abc'"),
            ("GET", f"/v2/tools/blobs/{layer}", 404, "BLOB_UNKNOWN", f"blob {layer} is not known"),
            ("PUT", "/v2/team/app/manifests/v2", 405, "UNSUPPORTED", "this registry is pull-only"),
            ("POST", "/v2/team/app/blobs/uploads/", 405, "UNSUPPORTED", "this registry is pull-only"),
            ("DELETE", f"/v2/team/app/blobs/{layer}", 405, "UNSUPPORTED", "this registry is pull-only"),
            ("GET", "/v2/_catalog", 404, "UNSUPPORTED", "GET /v2/_catalog is not served here"),
        ]
        for method, url, status, code, message in failures:
            response = await client.request(method, url)
            assert (response.status_code, response.headers["content-type"]) == (status, "application/json"), url
            assert response.json() == error_body(code, message)
        unverifiable = f"sha384:{'a' * 96}"  # an algorithm ocicas cannot compute
        response = await client.get(f"/v2/tools/blobs/{unverifiable}", headers={"Range": "bytes=0-1"})
        assert response.status_code == 404
        assert response.json() == error_body("BLOB_UNKNOWN", f"blob {unverifiable} is not known")
        response = await client.head(f"/v2/tools/blobs/{layer}")
        assert (response.status_code, response.content) == (404, b"")
        response = await client.get(f"/v2/team/app/blobs/{layer}", headers={"Range": "bytes=1-2, 4-5"})
        assert (response.status_code, response.content) == (200, b"layer one")  # several ranges: the whole blob
        response = await client.get(f"/v2/team/app/blobs/{layer}", headers={"Range": "bytes=2-4", "If-Range": '"x"'})
        assert (response.status_code, response.content) == (200, b"layer one")  # another version: the whole blob
        response = await client.get(
            f"/v2/team/app/blobs/{layer}", headers={"Range": "bytes=2-4", "If-Range": f'"{layer}"'}
        )
        assert (response.status_code, response.content) == (206, b"yer")


async def test_a_corrupt_blob_is_cut_short_and_never_served_as_a_range(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    content = random.Random(4).randbytes((5 << 20) + 17)
    async with await ocicas.open_layout(layout) as engine:
        digest, size = await engine.put_blob(content)
    path = blob_path(layout, digest)
    url = f"/v2/x/blobs/{digest}"

    async with served(layout) as client:
        response = await client.get(url, headers={"Range": "bytes=0-9"})  # hashes the file, caches the verdict
        assert (response.status_code, response.content) == (206, content[:10])
        before = path.stat()
        with path.open("r+b") as f:  # same size, one byte flipped, and the mtime put back
            f.seek(size - 1)
            f.write(bytes([content[-1] ^ 1]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

        received: list[int] = []

        async def download() -> None:
            async with client.stream("GET", url) as response:
                assert (response.status_code, response.headers["content-length"]) == (200, str(size))
                async for chunk in response.aiter_raw():
                    received.append(len(chunk))

        with pytest.raises(httpx.RemoteProtocolError):
            await download()
        assert sum(received) == ocicas.CHUNK_SIZE  # everything but the chunk that failed verification

        response = await client.get(url, headers={"Range": "bytes=0-9"})  # a new identity (ctime): hashed again
        assert response.status_code == 500
        assert response.json() == error_body(
            "UNKNOWN", f"stored content is damaged: blob {digest} does not hash to its digest"
        )


# -- trio, aiofiles, and a push to a registry ---------------------------------------------------


def _layout_files(layout: Path) -> list[str]:
    return sorted(os.listdir(layout))


@pytest.mark.parametrize("anyio_backend", ["trio"])  # a trio program
async def test_the_trio_program_builds_reads_back_cancels_and_collects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = tmp_path / "layout"
    await trio_program.main(layout)
    assert capsys.readouterr().out.splitlines() == [
        "tagged: app, tools",
        "upload abandoned by a cancel scope: True",
        "upload stopped by its context's deadline",
        "nothing half-written: True",
        "app: bin/app etc/app.conf",
        "tools: bin/fmt bin/lint",
        f"gc removed {sha256(trio_program.STRAY)}; 6 blobs live",
    ]
    assert _layout_files(layout) == ["blobs", "index.json", "oci-layout"]  # no temporary directory left
    async with await ocicas.open_layout(layout) as engine:
        layers = {sha256(trio_program.tar_layer(files)) for files in trio_program.IMAGES.values()}
        roots = {name: await engine.get_reference(name) for name in ("app", "tools")}
        graph = await ocicas.walk(engine, roots.values())
        assert set(await engine.list_blobs()) == graph.digests()
        assert layers < graph.digests()
        assert len(graph.digests()) == 6


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiofiles runs on asyncio only
async def test_aiofiles_puts_a_large_file_and_writes_the_blob_back_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await aiofiles_io.main(tmp_path, mib=24)
    source = (tmp_path / "big.bin").read_bytes()
    digest = sha256(source)
    assert capsys.readouterr().out.splitlines() == [
        f"stored big.bin: {digest} ({24 << 20} bytes)",
        "wrong expected digest refused; blobs stored: 1",
        "copy.bin is big.bin: True",
    ]
    assert (tmp_path / "copy.bin").read_bytes() == source
    assert os.listdir(tmp_path / "layout" / "blobs" / "sha256") == [digest.partition(":")[2]]
    assert _layout_files(tmp_path / "layout") == ["blobs", "index.json", "oci-layout"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A ``docker-registry`` on 127.0.0.1, for the module."""
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


async def test_a_push_sends_every_blob_once_and_tags_it(
    tmp_path: Path, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        amd64 = await ocicas.build_image(engine, [tar_gz({"a": b"a" * 100})], platform="linux/amd64")
        arm64 = await ocicas.build_image(engine, [tar_gz({"b": b"b" * 200})], platform="linux/arm64")
        index = await ocicas.build_index(engine, [amd64, arm64], reference="v1")
        graph = await ocicas.walk(engine, [index])
        stored = {digest: await engine.read_blob(digest) for digest in graph.descriptors}
    repository = registry.repository("embedding")

    result = await push_to_registry.push(layout, "v1", f"{registry.url}/{repository}:release")
    assert (result.root, result.reference) == (index, "release")
    assert (set(result.copied), result.skipped, result.bytes_copied) == (
        set(stored),
        (),
        sum(map(len, stored.values())),
    )
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[:-1]) == sorted(
        f"  {d.media_type} {d.digest} ({d.size} bytes)" for d in graph.descriptors.values()
    )
    assert lines[-1] == (
        f"pushed 7 blobs ({result.bytes_copied} bytes), 0 already there; {repository}:release is {index.digest}"
    )

    again = await push_to_registry.push(layout, "v1", f"{registry.url}/{repository}:release")
    assert (again.copied, set(again.skipped)) == ((), set(stored))

    async with await ocicas.open_registry(registry.location(repository), docker_config=False) as pushed:
        assert await pushed.list_references() == ["release"]
        assert await pushed.get_reference("release") == Descriptor(
            media_type=index.media_type, digest=index.digest, size=index.size
        )
        for digest, data in stored.items():
            assert await pushed.read_blob(digest) == data
