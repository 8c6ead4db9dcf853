"""The registry engine against real ``docker-registry`` processes on loopback (and fakes, for failures).

One registry of each kind per module (plain, htpasswd basic auth, TLS from a test
CA), started from ``tests/registry_fixtures.py``; each test works in a repository
of its own. The conformance suite runs on the plain one; skopeo checks that what
we push is what a registry client pulls, and the other way round. Failures a real
registry cannot be made to produce on demand (5xx, dropped connections, bearer
tokens, lying digests) are played by ``httpx.MockTransport`` fakes.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme

import ocicas
from ocicas import Context, Descriptor, Digest, Engine
from ocicas._copy import CopyEvent, copy
from ocicas._errors import (
    AccessDeniedError,
    BlobNotFoundError,
    ClobberError,
    ContextCancelledError,
    DigestMismatchError,
    InvalidError,
    ReferenceNotFoundError,
    RegistryError,
    RegistryUnreachableError,
    SizeMismatchError,
    UnsupportedError,
)
from ocicas.registry import Credentials, RegistryEngine, RetryPolicy, open_registry, parse_registry_location
from ocicas.registry._auth import Challenge, credentials_from_docker_config, parse_challenges
from ocicas.testing import EngineConformance, blob_bytes, sha256
from tests.images import CONFIG, LAYER, MANIFEST, put_image, put_index
from tests.registry_fixtures import Recorder, Registry, free_port, start_registry
from tests.tools import Tool, require

pytestmark = pytest.mark.anyio

MiB = 1 << 20
FAST = RetryPolicy(retries=3, backoff=0.001, max_delay=5)
AMD64 = ocicas.Platform(os="linux", architecture="amd64")
ARM64 = ocicas.Platform(os="linux", architecture="arm64")


# -- registries ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain ``docker-registry`` (deletes enabled), for the module."""
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A ``docker-registry`` behind htpasswd basic auth: user ``alice``, password ``s3cret``."""
    directory = tmp_path_factory.mktemp("auth-registry")
    started = start_registry(require("docker-registry").path, directory, credentials=("alice", "s3cret"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A ``docker-registry`` serving HTTPS with a certificate from a test CA (``Registry.ca_file``)."""
    directory = tmp_path_factory.mktemp("tls-registry")
    started = start_registry(require("docker-registry").path, directory, ca=trustme.CA())
    yield started
    started.stop()


@pytest.fixture
def skopeo() -> Tool:
    return require("skopeo")


async def open_repository(registry: Registry, repository: str | None = None, **options: Any) -> RegistryEngine:
    """Open ``repository`` (default: a new one) on ``registry``, ignoring the user's Docker config."""
    options.setdefault("docker_config", False)
    return await open_registry(registry.location(repository or registry.repository()), **options)


async def layout(path: Path) -> Engine:
    await ocicas.create_layout(path)
    return await ocicas.open_layout(path)


async def reachable(engine: Engine, root: Descriptor) -> dict[Digest, int]:
    """Every digest ``root`` reaches in ``engine``, with its size as the engine stores it."""
    graph = await ocicas.walk(engine, [root])
    return {digest: await engine.stat_blob(digest) for digest in graph.descriptors}


# -- the conformance suite -----------------------------------------------------------------


class TestRegistryEngine(EngineConformance):
    """The shared conformance suite, on a fresh repository of a real registry per test."""

    unsupported = frozenset({"list_blobs", "list_roots"})
    references_are_tags = True

    @pytest.fixture
    async def engine(self, registry: Registry) -> AsyncIterator[Engine]:
        async with await open_repository(registry) as engine:
            yield engine


# -- uploads -------------------------------------------------------------------------------


async def test_content_in_hand_goes_up_in_one_put_and_is_not_sent_twice(registry: Registry) -> None:
    recorder = Recorder()
    repository = registry.repository()
    async with await open_repository(registry, repository, transport=recorder) as engine:
        recorder.take()
        assert await engine.put_blob(b"payload") == (sha256(b"payload"), 7)
        uploads = f"/v2/{repository}/blobs/uploads/"
        assert [(m, p if not p.startswith(uploads) else uploads) for m, p in recorder.take()] == [
            ("HEAD", f"/v2/{repository}/blobs/{sha256(b'payload')}"),
            ("POST", uploads),
            ("PUT", uploads),
        ]
        assert await engine.put_blob(b"payload") == (sha256(b"payload"), 7)
        assert recorder.take() == [("HEAD", f"/v2/{repository}/blobs/{sha256(b'payload')}")]


async def test_a_known_digest_that_is_present_is_not_read_or_sent(registry: Registry) -> None:
    recorder = Recorder()
    repository = registry.repository()
    async with await open_repository(registry, repository, transport=recorder) as engine:
        await engine.put_blob(b"present")
        recorder.take()
        pulled = 0

        async def source() -> AsyncIterator[bytes]:
            nonlocal pulled
            pulled += 1
            yield b"present"

        assert await engine.put_blob(source(), expected_digest=sha256(b"present")) == (sha256(b"present"), 7)
        assert pulled == 0
        assert recorder.take() == [("HEAD", f"/v2/{repository}/blobs/{sha256(b'present')}")]
        with pytest.raises(SizeMismatchError, match="has 7 bytes here, expected 8"):
            await engine.put_blob(source(), expected_digest=sha256(b"present"), expected_size=8)


async def test_a_long_stream_goes_up_in_chunked_patches(registry: Registry) -> None:
    recorder = Recorder()
    repository = registry.repository()
    data = blob_bytes(10 * MiB + 3, seed=7)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1_000_000):
            yield data[start : start + 1_000_000]

    async with await open_repository(registry, repository, transport=recorder, chunk_size=4 * MiB) as engine:
        recorder.take()
        assert await engine.put_blob(chunks()) == (sha256(data), len(data))
        # two full chunks, the tail as a PATCH too, and a closing PUT that carries no bytes (one cut is resumable)
        assert [m for m, _ in recorder.take()] == ["POST", "PATCH", "PATCH", "PATCH", "PUT"]
        assert await engine.read_blob(sha256(data)) == data


async def test_a_mismatch_cancels_the_upload_session_and_stores_nothing(registry: Registry) -> None:
    recorder = Recorder()
    repository = registry.repository()
    data = blob_bytes(5 * MiB, seed=8)
    wrong = sha256(b"something else")

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    async with await open_repository(registry, repository, transport=recorder, chunk_size=4 * MiB) as engine:
        recorder.take()
        with pytest.raises(DigestMismatchError, match=f"blob {wrong} hashes to {sha256(data)}"):
            await engine.put_blob(chunks(), expected_digest=wrong)
        session = recorder.requests[-1].url  # with the upload state the registry signed into it
        assert [m for m, _ in recorder.take()] == ["HEAD", "POST", "PATCH", "DELETE"]
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(data))
    async with httpx.AsyncClient() as client:  # the session is gone, not merely abandoned
        response = await client.get(session)
        assert (response.status_code, response.json()["errors"][0]["code"]) == (404, "BLOB_UPLOAD_UNKNOWN")


async def test_mount_links_a_blob_of_another_repository(registry: Registry) -> None:
    recorder = Recorder()
    source, target = registry.repository(), registry.repository()
    async with await open_repository(registry, source) as src:
        digest, _ = await src.put_blob(b"shared layer")
        async with await open_repository(registry, target, transport=recorder) as dst:
            recorder.take()
            assert dst.can_mount_from(src)
            assert not dst.can_mount_from(dst)
            assert await dst.mount_blob(digest, src, expected_size=12) is True
            assert recorder.take() == [
                ("POST", f"/v2/{target}/blobs/uploads/"),
                ("HEAD", f"/v2/{target}/blobs/{digest}"),
            ]
            assert await dst.read_blob(digest) == b"shared layer"
            recorder.take()
            # absent in the source: the registry opens an ordinary upload instead, which is cancelled
            missing = sha256(b"not there")
            assert await dst.mount_blob(missing, source) is False
            assert [m for m, _ in recorder.take()] == ["POST", "DELETE"]


# -- manifests and tags ----------------------------------------------------------------------


async def test_an_index_is_tagged_after_its_manifests_are_pushed_by_digest(registry: Registry) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as engine:
        amd64, _ = await put_image(engine, [b"amd64 layer"], platform=AMD64)
        arm64, _ = await put_image(engine, [b"arm64 layer"], platform=ARM64)
        index = await put_index(engine, [amd64, arm64])
        await engine.put_reference("multi", index)
        assert await engine.get_reference("multi") == index
        assert await engine.list_references() == ["multi"]
    async with httpx.AsyncClient() as client:  # what any client sees: the manifests, by digest
        for manifest in (amd64, arm64):
            response = await client.head(
                f"{registry.url}/v2/{repository}/manifests/{manifest.digest}", headers={"Accept": MANIFEST}
            )
            assert (response.status_code, response.headers["docker-content-digest"]) == (200, manifest.digest)


async def test_reading_a_manifest_only_in_the_manifest_store(registry: Registry) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as engine:
        config_digest, config_size = await engine.put_blob_json({"architecture": "amd64", "os": "linux"})
        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
            "layers": [],
        }
        body = json.dumps(document).encode()
    async with httpx.AsyncClient() as client:  # pushed as another client would: manifest store only
        response = await client.put(
            f"{registry.url}/v2/{repository}/manifests/{sha256(body)}", content=body, headers={"Content-Type": MANIFEST}
        )
        assert response.status_code == 201
    async with await open_repository(registry, repository) as engine:
        assert await engine.stat_blob(sha256(body)) == len(body)
        assert await engine.read_blob(sha256(body)) == body
        assert await engine.stat_blobs([sha256(body), sha256(b"absent")], head=6) == {
            sha256(body): ocicas.BlobInfo(len(body), None, body[:6])
        }
        await engine.put_reference("by-others", Descriptor(media_type=MANIFEST, digest=sha256(body), size=len(body)))
        assert (await engine.get_reference("by-others")).digest == sha256(body)


async def test_tagging_content_that_is_not_stored_changes_no_tag(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        present, _ = await put_image(engine, [b"here"])
        absent = Descriptor(media_type=MANIFEST, digest=sha256(b"nowhere"), size=7)
        with pytest.raises(BlobNotFoundError, match=re.escape(f"{MANIFEST} {absent.digest} is not stored in repo")):
            await engine.update_references({"a": present, "b": absent})
        assert await engine.list_references() == []
        missing_config = {"mediaType": CONFIG, "digest": sha256(b"no config"), "size": 9}
        orphan = {"schemaVersion": 2, "mediaType": MANIFEST, "config": missing_config, "layers": []}
        digest, size = await engine.put_blob_json(orphan)  # stored, but what it points at is not
        with pytest.raises(BlobNotFoundError) as info:
            await engine.put_reference("c", Descriptor(media_type=MANIFEST, digest=digest, size=size))
        assert str(info.value) == (
            f"{MANIFEST} {digest} refers to blob {sha256(b'no config')}, which is not in {engine._client.where}"
        )
        with pytest.raises(InvalidError, match="a registry tag names a manifest or an index, not application/"):
            await engine.put_reference("d", Descriptor(media_type=LAYER, digest=sha256(b"x"), size=1))
        assert await engine.list_references() == []


async def test_a_tag_whose_manifest_another_tag_needs_is_not_deleted(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        manifest, _ = await put_image(engine, [b"shared"])
        await engine.update_references({"a": manifest, "b": manifest})
        with pytest.raises(UnsupportedError) as info:
            await engine.delete_reference("a")
        assert str(info.value) == (
            f"cannot delete reference 'a' alone in {engine._client.where}: this registry deletes a tag only by "
            f"deleting its manifest {manifest.digest}, which tag 'b' still needs"
        )
        assert await engine.list_references() == ["a", "b"]
        await engine.update_references({"a": None, "b": None})  # both at once: nothing else needs it
        assert await engine.list_references() == []


async def test_a_tag_whose_manifest_a_tagged_index_needs_is_not_deleted(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        manifest, _ = await put_image(engine, [b"child"])
        index = await put_index(engine, [manifest])
        await engine.update_references({"child": manifest, "parent": index})
        with pytest.raises(UnsupportedError, match=f"which the index {index.digest} named by tag 'parent' still"):
            await engine.delete_reference("child")
        await engine.delete_reference("parent")
        await engine.delete_reference("child")
        assert await engine.list_references() == []


async def test_tags_are_moved_only_with_replace(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        one, _ = await put_image(engine, [b"one"])
        two, _ = await put_image(engine, [b"two"])
        await engine.put_reference("latest", one)
        with pytest.raises(ClobberError, match=f"reference 'latest' already holds {one.digest}, not {two.digest}"):
            await engine.put_reference("latest", two)
        await engine.update_references({"latest": two}, replace=True)
        assert await engine.get_reference("latest") == two


async def test_deleting_a_manifest_blob_drops_its_tags(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        manifest, digests = await put_image(engine, [b"layer"])
        await engine.put_reference("v1", manifest)
        await engine.delete_blob(manifest.digest)
        assert await engine.list_references() == []
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(manifest.digest)
        assert await engine.stat_blob(digests[-1]) == 5  # the layer stays


async def test_gc_on_a_registry_says_why_it_cannot(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        with pytest.raises(UnsupportedError) as info:
            await ocicas.gc(engine)
        assert str(info.value) == (
            f"cannot list the roots of {engine._client.where}: garbage collection is not possible on a registry: "
            "the distribution API lists neither a repository's blobs nor its untagged manifests (index children, "
            "referrers, digests pushed by other clients), so neither the live set nor the garbage can be known "
            "from outside; run the registry's own collector (distribution: `registry garbage-collect`)"
        )
        with pytest.raises(UnsupportedError, match="the distribution API has no blob listing"):
            await engine.list_blobs()


# -- copies and interoperability --------------------------------------------------------------


async def test_layout_to_registry_to_layout_keeps_every_digest(registry: Registry, tmp_path: Path) -> None:
    src = await layout(tmp_path / "src")
    amd64, _ = await put_image(src, [blob_bytes(5 * MiB, 1), b"small"], platform=AMD64)
    arm64, _ = await put_image(src, [b"arm"], docker=True, platform=ARM64)
    index = await put_index(src, [amd64, arm64])
    await src.put_reference("v1", index)
    expected = await reachable(src, index)
    async with src, await open_repository(registry) as remote, await layout(tmp_path / "back") as back:
        result = await copy(src, "v1", remote)
        assert (result.root, sorted(result.copied)) == (index, sorted(expected))
        assert await remote.get_reference("v1") == index
        assert await reachable(remote, index) == expected
        result = await copy(remote, "v1", back)
        assert result.root == index
        assert await reachable(back, index) == expected
        assert await back.list_blobs() == sorted(expected)
        for digest in expected:
            assert await back.read_blob(digest, max_size=None) == await src.read_blob(digest, max_size=None)


async def test_a_copy_between_repositories_of_one_registry_mounts_its_blobs(registry: Registry) -> None:
    recorder = Recorder()
    source = registry.repository()
    async with await open_repository(registry, source) as src:
        image, digests = await put_image(src, [blob_bytes(3 * MiB, 2), b"second"])
        await src.put_reference("v1", image)
        async with await open_repository(registry, transport=recorder) as dst:
            recorder.take()
            result = await copy(src, "v1", dst)
            assert sorted(result.copied) == sorted(digests)
            mounted = [
                (r.url.params["mount"], r.url.params["from"]) for r in recorder.requests if "mount" in r.url.params
            ]
            # config and layers are linked by the registry; only the manifest (in hand) is uploaded
            assert sorted(mounted) == sorted((digest, source) for digest in digests[1:])
            assert [m for m, _ in recorder.take() if m == "PATCH"] == []
            assert await reachable(dst, image) == await reachable(src, image)


async def test_a_copy_cancelled_by_its_context_leaves_no_tag(registry: Registry, tmp_path: Path) -> None:
    big = blob_bytes(9 * MiB, 3)
    async with await layout(tmp_path / "src") as src, await open_repository(registry) as remote:
        image, digests = await put_image(src, [big])
        await src.put_reference("v1", image)
        ctx = Context.background().with_cancel()

        def cancel_midway(event: CopyEvent) -> None:
            if event.kind == "progress" and event.descriptor is not None and event.descriptor.size == len(big):
                ctx.cancel()

        with pytest.raises(ContextCancelledError):
            await copy(src, "v1", remote, concurrency=1, progress=cancel_midway, ctx=ctx)
        with pytest.raises(ReferenceNotFoundError):
            await remote.get_reference("v1")
        with pytest.raises(BlobNotFoundError):
            await remote.stat_blob(sha256(big))  # the upload was cancelled, not half committed
        result = await copy(src, "v1", remote)
        assert sorted(result.copied + result.skipped) == sorted(digests)
        assert await remote.get_reference("v1") == image
        assert await remote.read_blob(sha256(big)) == big


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A reproducible gzip-compressed tar layer holding ``files``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


async def build(engine: Engine, *layers: bytes) -> tuple[Descriptor, list[Digest]]:
    """A linux/amd64 image of gzip ``layers`` tagged ``v1``; its manifest and every digest, manifest first."""
    image = await ocicas.build_image(
        engine, layers, layer_media_type=ocicas.MEDIA_TYPE_IMAGE_LAYER_GZIP, platform=AMD64, reference="v1"
    )
    manifest = ocicas.Manifest.from_json(await engine.read_blob(image.digest))
    return image.replace(platform=None), [image.digest, manifest.config.digest, *(d.digest for d in manifest.layers)]


async def test_skopeo_pulls_what_we_pushed(registry: Registry, skopeo: Tool, tmp_path: Path) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as remote:
        image, digests = await build(remote, tar_gz({"a": blob_bytes(MiB, 4)}), tar_gz({"b": b"second layer"}))
    source = f"docker://{registry.host}/{repository}:v1"
    inspected = await skopeo.json("inspect", "--tls-verify=false", source)
    assert (inspected["Digest"], inspected["Layers"]) == (image.digest, digests[2:])
    raw = await skopeo.run("inspect", "--raw", "--tls-verify=false", source)
    assert sha256(raw) == image.digest
    await skopeo.run(
        "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", source, f"oci:{tmp_path / 'out'}:v1"
    )
    async with await ocicas.open_layout(tmp_path / "out") as pulled, await open_repository(registry, repository) as r:
        assert await pulled.get_reference("v1") == image
        assert sorted(await pulled.list_blobs()) == sorted(digests)
        for digest in digests:
            assert await pulled.read_blob(digest) == await r.read_blob(digest)


async def test_we_pull_what_skopeo_pushed(registry: Registry, skopeo: Tool, tmp_path: Path) -> None:
    async with await layout(tmp_path / "built") as built:
        image, digests = await build(built, tar_gz({"data": blob_bytes(2 * MiB, 5)}))
    repository = registry.repository()
    await skopeo.run(
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'built'}:v1",
        f"docker://{registry.host}/{repository}:v1",
    )
    async with (
        await open_repository(registry, repository) as remote,
        await ocicas.open_layout(tmp_path / "built") as built,
        await layout(tmp_path / "pulled") as pulled,
    ):
        assert await remote.get_reference("v1") == image
        for digest in digests:
            assert await remote.read_blob(digest) == await built.read_blob(digest)
        await copy(remote, "v1", pulled)
        assert sorted(await pulled.list_blobs()) == sorted(digests)


# -- authentication, TLS and unreachable registries -------------------------------------------


async def test_basic_auth_with_credentials_from_arguments(auth_registry: Registry) -> None:
    async with await open_repository(auth_registry, username="alice", password="s3cret") as engine:
        digest, _ = await engine.put_blob(b"authenticated")
        assert await engine.read_blob(digest) == b"authenticated"


async def test_basic_auth_with_credentials_from_docker_config(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = base64.b64encode(b"alice:s3cret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {f"http://{auth_registry.host}/v1/": {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    async with await open_repository(auth_registry, docker_config=True) as engine:
        assert await engine.put_blob(b"from config.json") == (sha256(b"from config.json"), 16)


async def test_wrong_credentials_are_a_clear_error(auth_registry: Registry) -> None:
    repository = auth_registry.repository()
    with pytest.raises(AccessDeniedError) as info:
        await open_repository(auth_registry, repository, username="alice", password="wrong")
    assert isinstance(info.value, PermissionError)
    assert (info.value.status, info.value.codes) == (401, ("UNAUTHORIZED",))
    assert str(info.value) == (
        f"access denied to repository {repository!r} on registry {auth_registry.url}: "
        "the registry refused the credentials of user 'alice' (HTTP 401 UNAUTHORIZED)"
    )


async def test_missing_credentials_are_a_clear_error(auth_registry: Registry) -> None:
    repository = auth_registry.repository()
    with pytest.raises(AccessDeniedError) as info:
        await open_repository(auth_registry, repository)
    assert str(info.value) == (
        f"access denied to repository {repository!r} on registry {auth_registry.url}: the registry requires "
        "authentication: pass username= and password=, or add them to a Docker config.json (HTTP 401 UNAUTHORIZED)"
    )


async def test_tls_with_the_test_ca(tls_registry: Registry) -> None:
    assert tls_registry.ca_file is not None
    repository = tls_registry.repository()
    async with await open_repository(tls_registry, repository, verify=tls_registry.ca_file) as engine:
        digest, _ = await engine.put_blob(b"over TLS")
        assert await engine.read_blob(digest) == b"over TLS"
    context = await anyio.to_thread.run_sync(lambda: ssl.create_default_context(cafile=str(tls_registry.ca_file)))
    async with await open_repository(tls_registry, repository, verify=context) as engine:
        assert await engine.stat_blob(digest) == 8


async def test_tls_without_the_ca_is_a_clear_error(tls_registry: Registry) -> None:
    with pytest.raises(RegistryUnreachableError) as info:
        await open_repository(tls_registry)
    assert isinstance(info.value, ConnectionError)
    assert str(info.value) == (
        f"cannot connect to the registry at {tls_registry.url}: TLS certificate verification failed: unable to get "
        "local issuer certificate; pass verify= a CA bundle path or an ssl.SSLContext"
    )


async def test_an_unreachable_registry_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RegistryUnreachableError) as info:
        await open_registry(f"http://127.0.0.1:{port}/team/app", docker_config=False)
    assert isinstance(info.value, OSError)
    assert info.value.status is None
    assert str(info.value) == f"cannot connect to the registry at http://127.0.0.1:{port}: connection refused"


async def test_a_server_that_is_no_registry_is_refused(registry: Registry) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="404 page not found")

    with pytest.raises(InvalidError, match=r"^http://web.test is not an OCI distribution registry: GET /v2/ answered"):
        await open_registry("http://web.test/app", docker_config=False, transport=httpx.MockTransport(handler))


# -- fakes: what a real registry does only sometimes --------------------------------------------

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


async def fake(handler: Handler, *, ping: bool = True, **options: Any) -> RegistryEngine:
    """An engine on ``http://reg.test/team/app`` whose requests ``handler`` answers (``/v2/`` too unless ``ping``)."""

    async def answer(request: httpx.Request) -> httpx.Response:
        if ping and request.url.path == "/v2/" and request.url.host == "reg.test":
            return httpx.Response(200, json={})
        return await handler(request)

    options.setdefault("retry", FAST)
    return await open_registry(
        "http://reg.test/team/app", docker_config=False, transport=httpx.MockTransport(answer), **options
    )


def blob_head(data: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Length": str(len(data)), "Docker-Content-Digest": sha256(data)})


async def test_bearer_tokens_are_fetched_once_per_scope() -> None:
    issued: list[tuple[str, tuple[str, ...], str | None, str | None]] = []
    uploads = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal uploads
        if request.url.host == "auth.test":
            scopes = tuple(request.url.params.get_list("scope"))
            issued.append(
                (
                    request.url.params["service"],
                    scopes,
                    request.url.params.get("account"),
                    request.headers.get("authorization"),
                )
            )
            return httpx.Response(200, json={"token": "T " + " ".join(scopes), "expires_in": 300})
        needed = f"repository:team/app:{'pull' if request.method in ('GET', 'HEAD') else 'pull,push'}"
        if request.headers.get("authorization") != f"Bearer T {needed}":
            challenge = f'Bearer realm="http://auth.test/token",service="reg.test",scope="{needed}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge}, json={"errors": []})
        if request.method == "HEAD":
            return blob_head(b"hello") if request.url.path.endswith(sha256(b"hello")) else httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": f"/v2/team/app/blobs/uploads/{uploads}"})
        uploads += 1
        return httpx.Response(201)

    async with await fake(handler, username="bob", password="pw", check=False) as engine:
        for _ in range(3):
            assert await engine.stat_blob(sha256(b"hello")) == 5
        assert await engine.put_blob(b"new") == (sha256(b"new"), 3)
        assert await engine.put_blob(b"newer") == (sha256(b"newer"), 5)
    basic = Credentials("bob", "pw").basic()
    assert issued == [
        ("reg.test", ("repository:team/app:pull",), "bob", basic),
        ("reg.test", ("repository:team/app:pull,push",), "bob", basic),
    ]
    assert uploads == 2


async def test_a_token_service_that_refuses_is_access_denied() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(401)
        challenge = 'Bearer realm="http://auth.test/token",service="reg.test",scope="repository:team/app:pull"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    with pytest.raises(AccessDeniedError) as info:
        await fake(handler, ping=False, username="bob", password="bad")
    assert str(info.value) == (
        "access denied to repository 'team/app' on registry http://reg.test: the token service "
        "http://auth.test/token refused the credentials of user 'bob' (HTTP 401)"
    )


async def test_5xx_and_429_are_retried_and_retry_after_is_honoured() -> None:
    answers = [
        httpx.Response(503, headers={"Retry-After": "0"}),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(502),
        blob_head(b"hello"),
    ]
    times: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return answers.pop(0)

    async with await fake(handler) as engine:
        assert await engine.stat_blob(sha256(b"hello")) == 5
    assert len(times) == 4
    assert times[2] - times[1] >= 0.95  # Retry-After: 1


async def test_retries_end_with_a_registry_error() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE", "message": "busy"}]})

    async with await fake(handler) as engine:
        with pytest.raises(RegistryError) as info:
            await engine.stat_blob(sha256(b"x"))
    assert calls == 4
    assert (info.value.status, info.value.codes) == (503, ("UNAVAILABLE",))
    assert str(info.value) == (
        f"repository 'team/app' on registry http://reg.test answered HTTP 503 to HEAD "
        f"/v2/team/app/blobs/{sha256(b'x')}: UNAVAILABLE: busy"
    )


async def test_a_retry_after_beyond_the_limit_ends_the_retries() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "3600"})

    async with await fake(handler) as engine:
        with pytest.raises(RegistryError, match="asked to retry after 3600 s, over the limit of 5 s"):
            await engine.stat_blob(sha256(b"x"))


async def test_dropped_connections_are_retried_for_idempotent_requests_only() -> None:
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "HEAD" and calls.count("HEAD") == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/team/app/blobs/uploads/1?_state=x"})
        if request.method == "PATCH":
            raise httpx.ReadError("connection reset")
        return httpx.Response(204)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 600
        yield b"y" * 600

    async with await fake(handler, chunk_size=1000) as engine:
        with pytest.raises(RegistryUnreachableError) as info:
            await engine.put_blob(chunks(), expected_digest=sha256(b"x" * 600 + b"y" * 600))
    # the failed PATCH is not sent again blindly: the upload's status is asked (GET), and this fake gives no Range
    assert calls == ["HEAD", "HEAD", "POST", "PATCH", "GET", "DELETE"]
    assert str(info.value) == (
        f"pushing blob {sha256(b'x' * 600 + b'y' * 600)} stopped at byte 1200, and its source cannot be read "
        "again: connection to repository 'team/app' on registry http://reg.test dropped during PATCH "
        "/v2/team/app/blobs/uploads/1: connection reset"
    )


async def test_requests_in_flight_are_bounded() -> None:
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1
        return blob_head(b"abc")

    digests = [sha256(bytes([i])) for i in range(24)]
    async with await fake(handler, concurrency=3) as engine:
        infos = await engine.stat_blobs(digests)
    assert (len(infos), peak) == (24, 3)


async def test_a_manifest_whose_digest_header_lies_is_refused() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {}, "layers": []}).encode()
    liar = sha256(b"another manifest")

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": MANIFEST, "Docker-Content-Digest": liar}
        return httpx.Response(200, headers=headers, content=body)

    async with await fake(handler) as engine:
        with pytest.raises(DigestMismatchError) as info:
            await engine.get_reference("v1")
    assert str(info.value) == (
        f"manifest 'v1' in repository 'team/app' on registry http://reg.test: the registry says {liar}, "
        f"the content hashes to {sha256(body)}"
    )


async def test_a_corrupt_blob_is_refused() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "5"}, content=b"HELLO")

    async with await fake(handler) as engine:
        with pytest.raises(DigestMismatchError, match=f"blob {sha256(b'hello')} hashes to {sha256(b'HELLO')}"):
            await engine.read_blob(sha256(b"hello"))


async def test_a_blob_pulled_into_a_layout_is_hashed_by_the_put_and_lands_whole(tmp_path: Path) -> None:
    data = bytes(range(256)) * (13 << 10)  # 3.25 MiB: several of the put's batches
    digest = sha256(data)

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v2/team/app/blobs/{digest}"
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, content=data)

    await ocicas.create_layout(tmp_path / "dst")
    read: list[int] = []
    async with await fake(handler) as registry, await ocicas.open_layout(tmp_path / "dst") as layout:
        async with await registry.get_blob(digest) as reader:
            reader.on_read = read.append
            assert await layout.put_blob(reader, expected_digest=digest, expected_size=len(data)) == (digest, len(data))
            assert reader.closed  # it lent its source: it claims nothing itself
        assert await layout.read_blob(digest) == data
    assert sum(read) == len(data)
    assert [f for d in (tmp_path / "dst").iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir()] == []


async def test_a_corrupt_blob_pulled_into_a_layout_never_lands(tmp_path: Path) -> None:
    good = bytes(range(256)) * (13 << 10)
    bad = good[:-1] + bytes([good[-1] ^ 1])  # the last byte: everything before it was written already
    digest = sha256(good)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(len(bad))}, content=bad)

    await ocicas.create_layout(tmp_path / "dst")
    async with await fake(handler) as registry, await ocicas.open_layout(tmp_path / "dst") as layout:
        async with await registry.get_blob(digest) as reader:
            with pytest.raises(DigestMismatchError, match=f"blob {digest} hashes to {sha256(bad)}"):
                await layout.put_blob(reader, expected_digest=digest, expected_size=len(good))
            assert (reader.bytes_read, reader.closed) == (0, True)
        assert await layout.list_blobs() == []
    assert [f for d in (tmp_path / "dst").iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir()] == []


def test_the_registry_engine_does_not_import_httpx_command_line_until_used() -> None:
    script = (
        "import sys, ocicas.registry, httpx\n"
        "print(sorted(m for m in ('click', 'rich', 'pygments', 'httpx._main') if m in sys.modules))\n"
        "import httpx._main\n"
        "print(httpx._main.__file__.endswith('_main.py'), callable(httpx.main))\n"
    )
    src = str(Path(ocicas.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "[]\nTrue True\n"), done.stderr


async def test_tags_are_listed_across_link_pages() -> None:
    pages = {
        "": (["c", "a"], '</v2/team/app/tags/list?last=c&n=2>; rel="next"'),
        "c": (["d", "b"], '</v2/team/app/tags/list?last=d&n=2>; rel="next"'),
        "d": (["e"], None),
    }
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        last = request.url.params.get("last", "")
        asked.append(last)
        tags, link = pages[last]
        return httpx.Response(200, json={"name": "team/app", "tags": tags}, headers={"Link": link} if link else {})

    async with await fake(handler) as engine:
        assert await engine.list_references() == ["a", "b", "c", "d", "e"]
    assert asked == ["", "c", "d"]


async def test_tags_are_deleted_alone_where_the_registry_can() -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {}, "layers": []}).encode()
    calls: list[tuple[str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v2/team/app/")
        calls.append((request.method, re.sub(r"ocicas-probe-[0-9a-f]{16}$", "ocicas-probe-…", path)))
        if request.method == "HEAD":  # tag v1 exists
            headers = {"Content-Type": MANIFEST, "Docker-Content-Digest": sha256(manifest)}
            return httpx.Response(200, headers={**headers, "Content-Length": str(len(manifest))})
        if path.startswith("manifests/ocicas-probe-"):
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        return httpx.Response(202)

    async with await fake(handler) as engine:
        await engine.delete_reference("v1")
        await engine.delete_reference("v1")
    # the probe (a tag that cannot exist) once; then each tag alone, never its manifest by digest
    assert calls == [
        ("HEAD", "manifests/v1"),
        ("DELETE", "manifests/ocicas-probe-…"),
        ("DELETE", "manifests/v1"),
        ("HEAD", "manifests/v1"),
        ("DELETE", "manifests/v1"),
    ]


async def test_a_registry_without_deletes_says_so() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            405, json={"errors": [{"code": "UNSUPPORTED", "message": "The operation is unsupported."}]}
        )

    async with await fake(handler) as engine:
        with pytest.raises(UnsupportedError) as info:
            await engine.delete_blob(sha256(b"x"))
    assert str(info.value) == (
        "repository 'team/app' on registry http://reg.test does not allow deletes "
        "(distribution: storage.delete.enabled is off)"
    )


async def test_a_repository_never_pushed_to_has_no_tags(registry: Registry) -> None:
    async with await open_repository(registry) as engine:
        assert await engine.list_references() == []
        with pytest.raises(ReferenceNotFoundError, match=r"^reference 'v1' not found in repository '"):
            await engine.get_reference("v1")


# -- locations, challenges, Docker config ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:5000/team/app", ("http://127.0.0.1:5000", "team/app", None)),
        ("127.0.0.1:5000/team/app:v1.0", ("https://127.0.0.1:5000", "team/app", "v1.0")),
        ("HTTPS://reg.example/a/b/c", ("https://reg.example", "a/b/c", None)),
        ("https://reg.example:443/app@" + sha256(b"m"), ("https://reg.example:443", "app", sha256(b"m"))),
        ("http://[::1]:5000/x_y/z-0.1", ("http://[::1]:5000", "x_y/z-0.1", None)),
    ],
)
def test_registry_locations(text: str, expected: tuple[str, str, str | None]) -> None:
    location = parse_registry_location(text)
    assert (location.base_url, location.repository, location.reference) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://host/app", "scheme must be http, https or docker, not 'ftp'"),
        ("http://host", "no repository"),
        ("http://host/Team/App", "invalid repository name 'Team/App'"),
        ("http://host/app:bad/tag", "invalid repository name"),
        ("http://user:pw@host/app", "pass credentials as arguments"),
        ("http://host/app?x=1", "no query or fragment"),
        ("http://host/app:-v1", "invalid reference name '-v1'"),
        ("http://host/app@sha256:abc", "invalid sha256 digest"),
    ],
)
def test_invalid_registry_locations(text: str, message: str) -> None:
    with pytest.raises(InvalidError, match=message.replace("?", r"\?")):
        parse_registry_location(text)


async def test_open_registry_refuses_a_tag() -> None:
    with pytest.raises(InvalidError, match="open_registry takes a repository, not a tag or digest: "):
        await open_registry("http://127.0.0.1:1/team/app:v1")


def test_challenges_are_parsed() -> None:
    header = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    assert parse_challenges([header, 'Basic realm="x\\"y"', "Negotiate, Basic realm=z"]) == [
        Challenge(
            "bearer",
            {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"},
        ),
        Challenge("basic", {"realm": 'x"y'}),
        Challenge("negotiate", {}),
        Challenge("basic", {"realm": "z"}),
    ]


def test_docker_config_entries() -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:h").decode()},
            "http://127.0.0.1:5000": {"auth": auth},
            "reg.example": {"username": "carol", "password": "c"},
            "other.example": {},
        },
        "credHelpers": {"helper.example": "secretservice"},
    }
    data = json.dumps(config).encode()
    assert credentials_from_docker_config(data, "127.0.0.1:5000") == Credentials("alice", "pa:ss")
    assert credentials_from_docker_config(data, "REG.example") == Credentials("carol", "c")
    assert credentials_from_docker_config(data, "registry-1.docker.io") == Credentials("hub", "h")
    assert credentials_from_docker_config(data, "other.example") is None
    assert credentials_from_docker_config(data, "helper.example") is None
    assert "pa:ss" not in repr(Credentials("alice", "pa:ss"))
    with pytest.raises(InvalidError, match="auth is not base64 of user:password"):
        credentials_from_docker_config(b'{"auths": {"h": {"auth": "!!"}}}', "h")


def test_the_registry_engine_does_not_import_trio_until_used() -> None:
    script = (
        "import sys, threading, http.server, anyio, ocicas.registry\n"
        "print('trio' in sys.modules)\n"
        "class Handler(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Length', '2')\n"
        "        self.end_headers()\n"
        "        self.wfile.write(b'{}')\n"
        "    def log_message(self, *args):\n"
        "        pass\n"
        "server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "async def main():\n"
        "    url = f'http://127.0.0.1:{server.server_port}/team/app'\n"
        "    async with await ocicas.registry.open_registry(url, docker_config=False) as registry:\n"
        "        print(await registry.list_references())\n"
        "anyio.run(main, backend='asyncio')\n"
        "print('trio' in sys.modules)\n"
        "anyio.run(main, backend='trio')\n"
        "server.shutdown()\n"
    )
    src = str(Path(ocicas.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "False\n[]\nFalse\n[]\n"), done.stderr


def test_without_trio_httpcore_sees_none_and_the_stand_in_keeps_what_it_loaded() -> None:
    """Without trio installed, httpcore gets ``trio = None`` as ever (no stand-in); with it, the stand-in
    holds the real module's attributes once loaded (later lookups skip ``__getattr__``)."""
    blocked = (
        "import sys, importlib.abc\n"
        "class NoTrio(importlib.abc.MetaPathFinder):  # trio not installed, as find_spec sees it too\n"
        "    def __init__(self, finders):\n"
        "        self.finders = finders\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'trio':\n"
        "            return None\n"
        "        for finder in self.finders:\n"
        "            spec = finder.find_spec(name, path, target)\n"
        "            if spec is not None:\n"
        "                return spec\n"
        "        return None\n"
        "sys.meta_path[:] = [NoTrio(list(sys.meta_path))]\n"
        "import ocicas.registry, httpcore._synchronization as sync\n"
        "print(sync.trio is None, 'trio' in sys.modules)\n"
    )
    loaded = (
        "import sys, ocicas.registry, httpcore._synchronization as sync\n"
        "stand_in = sync.trio\n"
        "print(type(stand_in).__name__, 'lowlevel' in vars(stand_in))\n"
        "import trio.lowlevel\n"
        "print(stand_in.lowlevel is trio.lowlevel, vars(stand_in)['lowlevel'] is trio.lowlevel)\n"
    )
    src = str(Path(ocicas.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "True False\n"), done.stderr
    done = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "_LazyModule False\nTrue True\n"), done.stderr
