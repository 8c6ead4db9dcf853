"""Every example runs, so none can rot."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ocicas.cli import cli

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_quickstart_stores_and_reads_back_an_image(tmp_path: Path, backend: str) -> None:
    args = [sys.executable, str(EXAMPLES / "quickstart.py"), str(tmp_path / "layout")]
    result = subprocess.run(
        [*args, "--trio"] if backend == "trio" else args, capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("latest -> sha256:")
    assert lines[2] == "blobs: 3, references: ['latest']"
    assert (tmp_path / "layout" / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'


# -- the user guide (docs/) ----------------------------------------------------------------------
#
# Every ```python block of a page runs in tests/test_docs.py.

DOCS = Path(__file__).parents[1] / "docs"
PAGES = sorted(p.name for p in (DOCS / "guide").glob("*.md"))
_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def test_the_user_guide_builds_with_mkdocs_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"), "-d", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("index.html")}
    assert built == {"index.html", *(f"{page[:-3]}/index.html" for page in PAGES if page != "index.md")}


def _resolve(dotted: str) -> bool:
    """Whether ``ocicas.X.Y…`` names something (a module, attribute or dataclass field)."""
    parts = dotted.split(".")
    target: object = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if hasattr(target, part):
            target = getattr(target, part)
        elif dataclasses.is_dataclass(target) and part in {f.name for f in dataclasses.fields(target)}:
            return index == len(parts) - 1
        else:
            try:
                target = importlib.import_module(".".join(parts[: index + 1]))
            except ImportError:
                return False
    return True


@pytest.mark.parametrize("page", PAGES)
def test_every_ocicas_name_in_the_guide_exists(page: str) -> None:
    names = set(re.findall(r"\bocicas(?:\.\w+)+", (DOCS / "guide" / page).read_text()))
    assert [name for name in sorted(names) if not _resolve(name)] == []


#: Every exported name, method, field and referenced Go name of the godoc of umoci's ``oci/cas``
#: package as ocicas was ported from (umoci 0.4: its constants, errors, functions, types, the
#: Engine interface's methods, Blob's fields, and the ispec/io/os/context/digest names it uses).
GO_NAMES = {
    *("BlobAlgorithm", "ImageLayoutVersion", "ErrInvalid", "ErrNotImplemented", "ErrClobber"),
    *("CreateLayout", "GC", "FromDescriptor", "Blob", "MediaType", "Digest", "Data", "Engine"),
    *("PutBlob", "PutBlobJSON", "PutReference", "GetBlob", "GetReference", "DeleteBlob", "DeleteReference"),
    *("ListBlobs", "ListReferences", "Close"),
    *("context.Context", "digest.Digest", "digest.SHA256", "io.ReadCloser", "io.Reader", "os.ErrExist"),
    *("os.ErrNotExist", "ispec.Descriptor", "ispec.Image", "ispec.Manifest", "ispec.ManifestList"),
    *("ispec.MediaTypeDescriptor", "ispec.MediaTypeImageConfig", "ispec.MediaTypeImageLayer"),
    *("ispec.MediaTypeImageLayerGzip", "ispec.MediaTypeImageLayerNonDistributable"),
    *("ispec.MediaTypeImageLayerNonDistributableGzip", "ispec.MediaTypeImageManifest"),
    *("ispec.MediaTypeImageManifestList",),
}


def test_the_umoci_page_maps_every_go_name_of_the_godoc() -> None:
    assert len(GO_NAMES) == 42
    page = (DOCS / "guide" / "umoci.md").read_text()
    rows = [line.split("|")[1:-1] for line in page.splitlines() if line.startswith("| `")]
    go_column = " ".join(re.findall(r"`([^`]+)`", " ".join(" ".join(row[:-1]) for row in rows)))  # Python is last
    mapped = set(re.findall(r"[\w.]+", go_column))
    mapped |= {name.rpartition(".")[2] for name in mapped}
    assert sorted(GO_NAMES - mapped) == []


def test_every_command_the_guide_shows_exists() -> None:
    shell = "".join(m[2] for m in _BLOCK.finditer((DOCS / "guide" / "index.md").read_text()) if m[1] == "sh")
    shown = set(re.findall(r"^ocicas (\w+)", shell, re.MULTILINE))
    assert {"init", "put", "tag", "gc"} <= shown
    assert sorted(shown - set(cli.commands)) == []
