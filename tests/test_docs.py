"""Every ```python block of README.md and docs/guide/*.md runs, as written, and leaves valid layouts.

How blocks are written, and so how they run (each in a fresh temporary directory as cwd):

- README.md: every block is a whole program that ends in ``anyio.run(main)``. It runs as
  ``__main__`` on asyncio; on trio, that last line runs as ``anyio.run(main, backend="trio")``.
- A guide page: its blocks are one program, in page order, in one namespace, with top-level
  ``await`` (as in ``python -m asyncio``), on asyncio and on trio.
- ``<!-- run: asyncio -->`` or ``<!-- run: trio -->`` on the line before a block: the block
  uses aiofiles or trio, and runs on that backend only (and nothing after it depends on it).
- A block naming ``http://127.0.0.1:5000`` runs against a ``docker-registry`` the test starts,
  that address replaced by the registry's own.

Afterwards every layout left in the directory passes ``ocicas fsck``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import anyio
import pytest

import ocicas
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

ROOT: Final = Path(__file__).parents[1]
README: Final = ROOT / "README.md"
GUIDE: Final = ROOT / "docs" / "guide"
PAGES: Final = sorted(p.name for p in GUIDE.glob("*.md"))
#: The registry address the docs use; the tests point it at a registry they start.
DOCS_REGISTRY: Final = "http://127.0.0.1:5000"
BACKENDS: Final = ["asyncio", "trio"]

_FENCE: Final = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_RUN_MARK: Final = re.compile(r"<!-- run: (asyncio|trio) -->\n\Z")
_PYTHON_LIKE: Final = {"py", "python", "python3", "pycon", "ipython"}


class Block:
    """A ```python block: its source (line numbers as in the file) and the backends it runs on."""

    def __init__(self, path: Path, text: str, match: re.Match[str]) -> None:
        self.path = path
        self.line = text.count("\n", 0, match.start()) + 2
        self.source = "\n" * (self.line - 1) + match[2]
        mark = _RUN_MARK.search(text, 0, match.start())
        self.backends = [mark[1]] if mark else BACKENDS

    def code(self, registry: Registry | None, *, top_level_await: bool, on_trio: bool = False) -> types.CodeType:
        source = self.source
        if on_trio:  # a README program's last line, anyio.run(main), runs main on trio instead
            head, _, last = source.rstrip().rpartition("\n")
            source = head + "\n" + last.replace("anyio.run(main)", 'anyio.run(main, backend="trio")', 1) + "\n"
        if DOCS_REGISTRY in source:
            assert registry is not None
            source = source.replace(DOCS_REGISTRY, registry.url)
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0
        code: types.CodeType = compile(source, str(self.path.relative_to(ROOT)), "exec", flags=flags)
        return code


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(path, text, m) for m in _FENCE.finditer(text) if m[1] == "python"]


def test_every_python_looking_block_is_a_python_block() -> None:
    """No block escapes the runner by being fenced ```py or the like."""
    fences = {(p.name, m[1]) for p in [README, *GUIDE.glob("*.md")] for m in _FENCE.finditer(p.read_text())}
    assert sorted(f for f in fences if f[1] in _PYTHON_LIKE - {"python"}) == []


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    try:
        yield started
    finally:
        started.stop()


def _needs_registry(blocks: list[Block]) -> bool:
    return any(DOCS_REGISTRY in block.source for block in blocks)


def _fsck_every_layout(directory: Path) -> list[Path]:
    """Run ``ocicas fsck`` (this checkout's) on every layout under ``directory``; return the layouts."""
    layouts = sorted(marker.parent for marker in directory.rglob("oci-layout"))
    env = {**os.environ, "PYTHONPATH": str(Path(ocicas.__file__).parents[1]), "OCICAS_PROGRESS": "never"}
    for layout in layouts:
        done = subprocess.run(
            [sys.executable, "-m", "ocicas", "fsck", str(layout)], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, (layout, done.stdout, done.stderr)
        assert done.stdout.endswith("no problems\n"), done.stdout
    return layouts


# -- README.md -----------------------------------------------------------------------------------

README_BLOCKS: Final = _blocks(README)


def test_readme_has_its_programs() -> None:
    assert len(README_BLOCKS) >= 2
    for block in README_BLOCKS:
        assert block.source.rstrip().splitlines()[-1].startswith("anyio.run(main)"), block.line


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: f"line-{b.line}")
def test_readme_program_runs(
    block: Block, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    registry = request.getfixturevalue("registry") if _needs_registry([block]) else None
    exec(block.code(registry, top_level_await=False, on_trio=backend == "trio"), {"__name__": "__main__"})
    assert _fsck_every_layout(tmp_path)


# -- docs/guide/ ---------------------------------------------------------------------------------


async def _run_page(blocks: list[Block], backend: str, registry: Registry | None, page: str) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    for block in blocks:
        if backend not in block.backends:
            continue
        result = eval(block.code(registry, top_level_await=True), namespace)
        if inspect.iscoroutine(result):
            with anyio.fail_after(60):
                await result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(GUIDE / p)])
def test_guide_page_runs(
    page: str, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(GUIDE / page)
    registry = request.getfixturevalue("registry") if _needs_registry(blocks) else None
    anyio.run(_run_page, blocks, backend, registry, page, backend=backend)
    _fsck_every_layout(tmp_path)


def test_every_run_mark_is_on_a_python_block() -> None:
    """A misspelt or misplaced mark would silently run a block on both backends, or none."""
    for path in [README, *GUIDE.glob("*.md")]:
        marks = re.findall(r"<!--\s*run\b.*?-->\n?.*", path.read_text())
        assert [m for m in marks if not re.fullmatch(r"<!-- run: (asyncio|trio) -->\n```python", m)] == [], path
