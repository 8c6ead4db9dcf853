"""Referrers across registries: the referrers API (``examples/serve_registry.py``) and its tag fallback.

``docker-registry`` (distribution 2.8) has no referrers API: there the engine reads
and keeps up the referrers tag (``sha256-<hex>``), whose exact content is checked.
``serve_registry`` serves the API from a layout, ``artifactType`` filter included.
``copy(referrers=True)`` and ``ocicas copy --referrers`` run registry→layout,
layout→registry and registry→registry, referrers of referrers included.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from blockbuster import blockbuster_ctx

import ocicas
from ocicas import Descriptor, Digest, Engine
from ocicas._copy import copy
from ocicas.registry import RegistryEngine, open_registry
from ocicas.registry._referrers import referrers_tag
from ocicas.testing import sha256
from tests.images import CONFIG, INDEX, MANIFEST, put_artifact, put_image, put_index
from tests.registry_fixtures import Recorder, Registry, start_registry
from tests.tools import require

EXAMPLES = Path(__file__).parents[1] / "examples"
SIG = "application/vnd.example.sig"
SBOM = "application/vnd.example.sbom"
AMD64 = ocicas.Platform(os="linux", architecture="amd64")
ARM64 = ocicas.Platform(os="linux", architecture="arm64")


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``name`` (as tests/test_embedding.py does)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if TYPE_CHECKING:  # mypy checks examples/ as top-level modules
    import serve_registry
else:
    serve_registry = _load("serve_registry")

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    with blockbuster_ctx(["ocicas", serve_registry]):
        yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain ``docker-registry``: no referrers API."""
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


async def open_repository(registry: Registry, repository: str | None = None, **options: Any) -> RegistryEngine:
    return await open_registry(registry.location(repository or registry.repository()), docker_config=False, **options)


@asynccontextmanager
async def served(root: Path) -> AsyncIterator[str]:
    """``examples/serve_registry.py`` serving ``root`` in this event loop; its base URL."""
    sock = serve_registry.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = anyio.Event()

    async def run() -> None:
        await serve_registry.serve(root, sock, shutdown=stop.wait)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()


def entry(descriptor: Descriptor, artifact_type: str | None = None, **annotations: str) -> dict[str, Any]:
    """A referrers-list entry, as the distribution spec defines it."""
    out: dict[str, Any] = {"mediaType": descriptor.media_type, "digest": descriptor.digest, "size": descriptor.size}
    if artifact_type is not None:
        out["artifactType"] = artifact_type
    if annotations:
        out["annotations"] = annotations
    return out


@dataclass
class Signed:
    """A two-platform index with referrers, a referrer of a referrer, and an unrelated signed image."""

    index: Descriptor
    amd64: Descriptor
    arm64: Descriptor
    sig: Descriptor  # of amd64, a signature artifact
    countersig: Descriptor  # of sig
    sbom: Descriptor  # of the index, an artifact
    attestations: Descriptor  # of the index: an (empty) index with annotations
    provenance: Descriptor  # of arm64: an image manifest without artifactType
    reachable: set[Digest]  # the index with its manifests, configs and layers
    referrer_blobs: set[Digest]  # every digest the referrers above reach beyond that
    unrelated: set[Digest]

    @property
    def referrers(self) -> tuple[Digest, ...]:
        return tuple(
            sorted(d.digest for d in (self.sig, self.countersig, self.sbom, self.attestations, self.provenance))
        )

    def expected(self) -> dict[Digest, list[dict[str, Any]]]:
        """Each subject's referrers list, sorted by digest."""
        lists = {
            self.index.digest: [entry(self.sbom, SBOM), entry(self.attestations, kind="attestations")],
            self.amd64.digest: [entry(self.sig, SIG)],
            self.arm64.digest: [entry(self.provenance, CONFIG)],
            self.sig.digest: [entry(self.countersig, SIG)],
        }
        return {subject: sorted(entries, key=lambda e: str(e["digest"])) for subject, entries in lists.items()}

    @classmethod
    async def put(cls, engine: Engine) -> Signed:
        amd64, amd64_blobs = await put_image(engine, [b"base", b"amd64 app"], platform=AMD64)
        arm64, arm64_blobs = await put_image(engine, [b"base", b"arm64 app"], platform=ARM64)
        index = await put_index(engine, [amd64, arm64])
        await engine.put_reference("v1", index)
        sig, sig_blobs = await put_artifact(engine, amd64, b"signature of amd64", SIG)
        countersig, countersig_blobs = await put_artifact(engine, sig, b"signature of the signature", SIG)
        sbom, sbom_blobs = await put_artifact(engine, index, b"sbom of the index", SBOM)
        attestations = await put_index(engine, [], subject=index, annotations={"kind": "attestations"})
        provenance, provenance_blobs = await put_image(engine, [b"provenance of arm64"], subject=arm64)
        other, other_blobs = await put_image(engine, [b"another image"])
        await engine.put_reference("other", other)
        _, other_sig_blobs = await put_artifact(engine, other, b"signature of another image", SIG)
        reachable = {index.digest, *amd64_blobs, *arm64_blobs}
        referrer_blobs = {*sig_blobs, *countersig_blobs, *sbom_blobs, attestations.digest, *provenance_blobs}
        return cls(
            index=index,
            amd64=amd64,
            arm64=arm64,
            sig=sig,
            countersig=countersig,
            sbom=sbom,
            attestations=attestations,
            provenance=provenance,
            reachable=reachable,
            referrer_blobs=referrer_blobs - reachable,
            unrelated={*other_blobs, *other_sig_blobs} - reachable - referrer_blobs,
        )


async def layout(path: Path) -> Engine:
    await ocicas.create_layout(path)
    return await ocicas.open_layout(path)


async def assert_referrers(engine: Engine, image: Signed) -> None:
    """``engine.referrers`` lists exactly the expected referrers of every subject, filters included."""
    for subject, entries in image.expected().items():
        found = await engine.referrers(subject)
        assert [d.to_dict() for d in found] == entries
        for artifact_type in (SIG, SBOM):
            filtered = await engine.referrers(subject, artifact_type=artifact_type)
            assert [d.to_dict() for d in filtered] == [e for e in entries if e.get("artifactType") == artifact_type]
    assert await engine.referrers(image.sbom) == []


async def tag_document(registry: Registry, repository: str, tag: str) -> dict[str, Any]:
    """What ``tag`` holds, read with a plain HTTP client."""
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": INDEX + ", " + MANIFEST}
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == INDEX
    document: dict[str, Any] = json.loads(response.content)
    return document


async def assert_fallback_tags(registry: Registry, repository: str, image: Signed, *tags: str) -> None:
    """The repository's tags are ``tags`` plus one referrers tag per subject, each holding exactly its list."""
    expected = image.expected()
    async with await open_repository(registry, repository) as engine:
        assert await engine.list_references() == sorted([*tags, *(referrers_tag(s) for s in expected)])
    for subject, entries in expected.items():
        document = await tag_document(registry, repository, referrers_tag(subject))
        manifests = document.pop("manifests")
        assert document == {"schemaVersion": 2, "mediaType": INDEX}
        # entries are appended as referrers land, concurrently: the order is the pushes'
        assert sorted(manifests, key=lambda e: str(e["digest"])) == entries


async def all_blobs(engine: Engine) -> set[Digest]:
    digests = set(await engine.list_blobs())
    for digest in digests:
        await engine.read_blob(digest, max_size=None)  # verified
    return digests


# -- the tag schema ------------------------------------------------------------------------


def test_referrers_tag_follows_the_spec() -> None:
    assert referrers_tag(Digest("sha256:" + "a" * 64)) == "sha256-" + "a" * 64
    assert referrers_tag(Digest("sha512:" + "b" * 128)) == "sha512-" + "b" * 64
    assert referrers_tag(Digest("test+algo.x_y:AbC=d-e_f")) == "test-algo.x_y-AbC-d-e_f"
    long = Digest(f"{'a' * 40}:{'c' * 70}")
    assert referrers_tag(long) == f"{'a' * 32}-{'c' * 64}"


# -- local engines: the default hook scans -------------------------------------------------


async def test_local_engines_find_referrers_by_scanning(engine: Engine) -> None:
    image = await Signed.put(engine)
    await assert_referrers(engine, image)
    # a descriptor names the subject as well as a digest string does
    assert await engine.referrers(image.amd64) == await engine.referrers(str(image.amd64.digest))
    with pytest.raises(TypeError, match="artifact_type"):
        await engine.referrers(image.index, artifact_type=3)  # type: ignore[arg-type]
    with pytest.raises(ocicas.InvalidError, match="artifact_type"):
        await engine.referrers(image.index, artifact_type="not a media type")
    with pytest.raises(TypeError, match="subject"):
        await engine.referrers(42)  # type: ignore[arg-type]
    with pytest.raises(ocicas.InvalidError, match="subject"):
        await engine.referrers("sha256:nope")


# -- docker-registry: the referrers tag ----------------------------------------------------


async def test_layout_to_registry_keeps_the_referrers_tags(registry: Registry, tmp_path: Path) -> None:
    repository = registry.repository()
    async with await layout(tmp_path / "src") as src, await open_repository(registry, repository) as dst:
        image = await Signed.put(src)
        result = await copy(src, "v1", dst, referrers=True)
        assert result.referrers == image.referrers
        assert set(result.copied) == image.reachable | image.referrer_blobs
        await assert_referrers(dst, image)
    await assert_fallback_tags(registry, repository, image, "v1")
    # a second engine, a second copy: every blob is present, no list changes, nothing is listed twice
    async with await ocicas.open_layout(tmp_path / "src") as src, await open_repository(registry, repository) as dst:
        again = await copy(src, "v1", dst, referrers=True)
        assert again.copied == ()
        assert again.referrers == image.referrers
    await assert_fallback_tags(registry, repository, image, "v1")


async def test_registry_to_layout_and_registry_to_registry_through_the_referrers_tag(
    registry: Registry, tmp_path: Path
) -> None:
    first, second = registry.repository(), registry.repository()
    async with await layout(tmp_path / "src") as src, await open_repository(registry, first) as pushed:
        image = await Signed.put(src)
        await copy(src, "v1", pushed, referrers=True)
    async with await open_repository(registry, first) as src, await layout(tmp_path / "dst") as dst:
        result = await copy(src, "v1", dst, referrers=True)
        assert result.referrers == image.referrers
        assert await all_blobs(dst) == image.reachable | image.referrer_blobs
        assert await dst.list_references() == ["v1"]
        await assert_referrers(dst, image)
        assert (await ocicas.gc(dst, grace_period=0)).removed == ()  # live subjects keep their referrers
    async with await open_repository(registry, first) as src, await open_repository(registry, second) as dst:
        result = await copy(src, "v1", dst, referrers=True)
        assert result.referrers == image.referrers
        await assert_referrers(dst, image)
    await assert_fallback_tags(registry, second, image, "v1")


async def test_a_pushed_referrer_is_listed_once_and_a_tagged_one_too(registry: Registry) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as engine:
        subject, _ = await put_image(engine, [b"subject layer"])
        await engine.put_reference("v1", subject)
        assert await engine.referrers(subject) == []
        sig, _ = await put_artifact(engine, subject, b"a signature", SIG)
        await engine.put_blob(await engine.read_blob(sig))  # again: still one entry
        tagged, _ = await put_artifact(engine, subject, b"a tagged signature", SBOM)
        await engine.put_reference("signature", tagged)
        expected = sorted([entry(sig, SIG), entry(tagged, SBOM)], key=lambda e: str(e["digest"]))
        assert [d.to_dict() for d in await engine.referrers(subject)] == expected
    async with await open_repository(registry, repository) as engine:  # a new engine knows nothing yet
        await engine.put_blob(await engine.read_blob(sig))
    document = await tag_document(registry, repository, referrers_tag(subject.digest))
    assert document == {"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry(sig, SIG), entry(tagged, SBOM)]}


async def test_a_deleted_referrer_leaves_the_referrers_tag(registry: Registry) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as engine:
        subject, _ = await put_image(engine, [b"subject layer"])
        await engine.put_reference("v1", subject)
        first, _ = await put_artifact(engine, subject, b"first signature", SIG)
        second, _ = await put_artifact(engine, subject, b"second signature", SIG)
    async with await open_repository(registry, repository) as engine:  # it reads the manifest to know
        await engine.delete_blob(first.digest)
        assert await engine.referrers(subject) == [second]
        third, _ = await put_artifact(engine, subject, b"third signature", SBOM)  # the tag still takes updates
        await engine.delete_blob(second.digest)
        await engine.delete_blob(second.digest)  # idempotent
    document = await tag_document(registry, repository, referrers_tag(subject.digest))
    assert document == {"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry(third, SBOM)]}


async def test_a_referrers_tag_that_is_not_an_index_is_not_overwritten(registry: Registry) -> None:
    repository = registry.repository()
    async with await open_repository(registry, repository) as engine:
        subject, _ = await put_image(engine, [b"subject"])
        squatter, _ = await put_image(engine, [b"squatter"])
        await engine.put_reference(referrers_tag(subject.digest), squatter)
        assert await engine.referrers(subject) == []  # not an index: no referrers, as the spec says
        with pytest.raises(ocicas.InvalidError, match="not an image index"):
            await put_artifact(engine, subject, b"a signature", SIG)
        assert await engine.get_reference(referrers_tag(subject.digest)) == squatter


# -- serve_registry: the referrers API -----------------------------------------------------


async def test_serve_registry_answers_the_referrers_api(tmp_path: Path) -> None:
    async with await layout(tmp_path / "src") as src:
        image = await Signed.put(src)
    async with served(tmp_path / "src") as base, httpx.AsyncClient(base_url=base) as client:
        response = await client.get(f"/v2/any/name/referrers/{image.index.digest}")
        assert response.status_code == 200
        assert response.headers["content-type"] == INDEX
        assert "oci-filters-applied" not in response.headers
        assert response.json() == {
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": image.expected()[image.index.digest],
        }
        response = await client.get(f"/v2/any/name/referrers/{image.index.digest}", params={"artifactType": SBOM})
        assert response.headers["oci-filters-applied"] == "artifactType"
        assert response.json()["manifests"] == [entry(image.sbom, SBOM)]
        response = await client.get(f"/v2/any/name/referrers/{image.sbom.digest}")
        assert response.json() == {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
        response = await client.get(f"/v2/any/name/referrers/{image.index.digest}", params={"artifactType": "x"})
        assert response.status_code == 400
        response = await client.get("/v2/any/name/referrers/sha256:nope")
        assert response.status_code == 400
        assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"


async def test_copy_through_the_referrers_api(registry: Registry, tmp_path: Path) -> None:
    async with await layout(tmp_path / "src") as src:
        image = await Signed.put(src)
    recorder = Recorder()
    async with served(tmp_path / "src") as base:
        async with (
            await open_registry(f"{base}/team/app", docker_config=False, transport=recorder) as src,
            await layout(tmp_path / "dst") as dst,
        ):
            await assert_referrers(src, image)
            result = await copy(src, "v1", dst, referrers=True)
            assert result.referrers == image.referrers
            assert await all_blobs(dst) == image.reachable | image.referrer_blobs
            await assert_referrers(dst, image)
        paths = [path for _, path in recorder.take()]
        assert any("/referrers/" in p for p in paths)
        assert not any("/manifests/sha256-" in p for p in paths)  # the API answered: no fallback
        # API source, fallback destination
        repository = registry.repository()
        async with (
            await open_registry(f"{base}/team/app", docker_config=False) as src,
            await open_repository(registry, repository) as dst,
        ):
            result = await copy(src, "v1", dst, referrers=True)
            assert result.referrers == image.referrers
        await assert_fallback_tags(registry, repository, image, "v1")


# -- the CLI -------------------------------------------------------------------------------


async def cli(*args: str | Path) -> str:
    env = {**os.environ, "OCICAS_PROGRESS": "never"}
    env.pop("OCICAS_DEBUG", None)
    done = await anyio.run_process([sys.executable, "-m", "ocicas", *map(str, args)], env=env, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout.decode()


async def test_cli_copy_referrers_both_ways(registry: Registry, tmp_path: Path) -> None:
    async with await layout(tmp_path / "src") as src:
        image = await Signed.put(src)
    first, second = registry.repository(), registry.repository()
    pushed = json.loads(
        await cli("copy", "--referrers", "--json", f"{tmp_path / 'src'}:v1", f"{registry.url}/{first}:v1")
    )
    assert pushed[0]["referrers"] == list(image.referrers)
    await assert_fallback_tags(registry, first, image, "v1")
    pulled = json.loads(await cli("copy", "--referrers", "--json", f"{registry.url}/{first}:v1", tmp_path / "dst"))
    assert pulled[0]["referrers"] == list(image.referrers)
    across = json.loads(
        await cli("copy", "--referrers", "--json", f"{registry.url}/{first}:v1", f"{registry.url}/{second}:v1")
    )
    assert across[0]["referrers"] == list(image.referrers)
    await assert_fallback_tags(registry, second, image, "v1")
    async with await ocicas.open_layout(tmp_path / "dst") as dst:
        assert await all_blobs(dst) == image.reachable | image.referrer_blobs
        await assert_referrers(dst, image)


# -- what docker-registry and serve_registry cannot show: pages, unfiltered answers, OCI-Subject ---------


def referrer_manifest(subject: bytes, artifact_type: str, note: str = "") -> tuple[bytes, Descriptor]:
    """A signature-like manifest whose subject is the manifest ``subject``: its bytes and descriptor."""
    empty = Descriptor(media_type="application/vnd.oci.empty.v1+json", digest=sha256(b"{}"), size=2)
    target = Descriptor(media_type=MANIFEST, digest=sha256(subject), size=len(subject))
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": artifact_type,
        "config": empty.to_dict(),
        "layers": [empty.to_dict()],
        "subject": target.to_dict(),
        "annotations": {"note": note},
    }
    data = json.dumps(document).encode()
    return data, Descriptor(
        media_type=MANIFEST,
        digest=sha256(data),
        size=len(data),
        artifact_type=artifact_type,
        annotations={"note": note},
    )


async def fake(handler: Any) -> RegistryEngine:
    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        response: httpx.Response = await handler(request)
        return response

    return await open_registry("http://reg.test/team/app", docker_config=False, transport=httpx.MockTransport(answer))


async def test_api_pages_are_followed_and_an_unapplied_filter_is_applied_here() -> None:
    subject = sha256(b"subject")
    listed = [referrer_manifest(b"subject", t, str(n))[1] for n, t in enumerate((SIG, SBOM, SIG))]
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        assert request.url.path == f"/v2/team/app/referrers/{subject}"
        page = request.url.params.get("page")
        index = {"schemaVersion": 2, "mediaType": INDEX}
        headers = {"Content-Type": INDEX}
        if page is None:
            headers["Link"] = f'</v2/team/app/referrers/{subject}?page=2>; rel="next"'
            return httpx.Response(200, headers=headers, json={**index, "manifests": [d.to_dict() for d in listed[:2]]})
        return httpx.Response(200, headers=headers, json={**index, "manifests": [listed[2].to_dict()]})

    async with await fake(handler) as engine:
        assert await engine.referrers(subject) == sorted(listed, key=lambda d: d.digest)
        assert asked == [
            f"http://reg.test/v2/team/app/referrers/{subject}",
            f"http://reg.test/v2/team/app/referrers/{subject}?page=2",
        ]
        asked.clear()
        found = await engine.referrers(subject, artifact_type=SIG)
        assert found == sorted([listed[0], listed[2]], key=lambda d: d.digest)
        assert asked[0] == f"http://reg.test/v2/team/app/referrers/{subject}?artifactType={SIG.replace('/', '%2F')}"


@pytest.mark.parametrize("how", ["OCI-Subject", "probe"])
async def test_a_registry_with_the_api_gets_no_referrers_tag(how: str) -> None:
    data, descriptor = referrer_manifest(b"subject", SIG)
    subject = sha256(b"subject")
    requests: list[tuple[str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append((request.method, request.url.path))
        if request.method == "HEAD" and request.url.path == f"/v2/team/app/blobs/{descriptor.digest}":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        if request.method == "PUT" and request.url.path == f"/v2/team/app/manifests/{descriptor.digest}":
            assert isinstance(request.stream, httpx.AsyncByteStream)
            assert b"".join([chunk async for chunk in request.stream]) == data
            headers = {"OCI-Subject": subject} if how == "OCI-Subject" else {}
            return httpx.Response(201, headers={**headers, "Docker-Content-Digest": descriptor.digest})
        if request.method == "GET" and request.url.path == f"/v2/team/app/referrers/{subject}":
            manifests = [descriptor.to_dict()]
            return httpx.Response(
                200, headers={"Content-Type": INDEX}, json={"schemaVersion": 2, "manifests": manifests}
            )
        return httpx.Response(404, json={"errors": [{"code": "UNKNOWN", "message": "not here"}]})

    async with await fake(handler) as engine:
        assert await engine.put_blob(data) == (descriptor.digest, len(data))
        expected = [
            ("HEAD", f"/v2/team/app/blobs/{descriptor.digest}"),
            ("PUT", f"/v2/team/app/manifests/{descriptor.digest}"),
        ]
        if how == "probe":
            expected.append(("GET", f"/v2/team/app/referrers/{subject}"))
        assert requests == expected
        assert await engine.referrers(subject) == [descriptor]
