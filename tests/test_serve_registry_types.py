"""examples/serve_registry.py gives one digest one media type: the manifest's own, by tag and by digest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ocicas
from tests.images import DOCKER_CONFIG, DOCKER_MANIFEST, MANIFEST, put_json
from tests.test_embedding import served

pytestmark = pytest.mark.anyio


async def test_content_type_is_the_documents_own_media_type_by_tag_and_by_digest(tmp_path: Path) -> None:
    layout = tmp_path / "app"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        config = await put_json(engine, {"architecture": "amd64", "os": "linux"}, DOCKER_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config.to_dict(), "layers": []}
        docker = await put_json(engine, manifest, DOCKER_MANIFEST)
        # index.json names it with the OCI type, as a tool converting formats might leave it
        await engine.put_reference(
            "mislabelled", docker.replace(media_type=MANIFEST), partial=True
        )  # mislabelled on purpose
        data = await engine.read_blob(docker.digest)
    assert json.loads(data)["mediaType"] == DOCKER_MANIFEST
    async with served(tmp_path) as client:
        for reference in ("mislabelled", docker.digest):
            for method in (client.get, client.head):
                response = await method(f"/v2/app/manifests/{reference}")
                assert response.status_code == 200
                assert response.headers["content-type"] == DOCKER_MANIFEST
                assert response.headers["docker-content-digest"] == docker.digest
            assert (await client.get(f"/v2/app/manifests/{reference}")).content == data
