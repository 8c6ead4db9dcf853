"""A light install: the core needs anyio alone; the registry engine and the command load on use.

Each check runs in a fresh interpreter. "The core install" is simulated faithfully: ``python -S``
(no site-packages) with a path holding only ocicas's source and links to anyio, its dependencies
and trio, so httpx, click and rich are really absent, as after ``pip install ocicas``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ocicas

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(ocicas.__file__).resolve().parent.parent
OPTIONAL = ("httpx", "click", "rich")
REGISTRY_MESSAGE = "the ocicas registry engine needs httpx: pip install 'ocicas[registry]'"
# anyio and what it imports, plus trio (the suite runs the core on both backends) and its own
CORE_PACKAGES = (
    "anyio",
    "sniffio",
    "idna",
    "exceptiongroup",
    "typing_extensions",
    "trio",
    "outcome",
    "attr",
    "attrs",
    "sortedcontainers",
)

LOADED = """
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {"ocicas", "httpx", "click", "rich"})))
"""


def run(script: str, *args: str, core_only: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter: this environment, or with ``core_only`` the core install."""
    env = dict(os.environ)
    command = [sys.executable]
    if core_only is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    else:
        command.append("-S")
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(core_only)])
    return subprocess.run(
        [*command, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def loaded(script: str) -> list[str]:
    done = run(script + LOADED)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


@pytest.fixture(scope="module")
def core_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with links to the core's packages only (what ``pip install ocicas`` installs, and trio)."""
    path = tmp_path_factory.mktemp("core-site")
    for name in CORE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue  # not needed on this Python (exceptiongroup, typing_extensions from 3.11)
        origin = Path(spec.origin)
        target = origin.parent if origin.name == "__init__.py" else origin
        (path / target.name).symlink_to(target)
    done = run("import anyio, trio, ocicas", core_only=path)
    assert done.returncode == 0, done.stderr
    for name in OPTIONAL:
        done = run(f"import {name}", core_only=path)
        assert f"No module named '{name}'" in done.stderr
    return path


def test_import_loads_nothing_but_the_package() -> None:
    assert loaded("import ocicas") == ["ocicas"]


def test_core_names_do_not_load_the_registry_or_the_command() -> None:
    names = ["open_layout", "MemoryEngine", "copy", "gc", "walk", "build_image", "from_descriptor", "OCICASError"]
    modules = loaded("import ocicas\n" + "".join(f"ocicas.{name}\n" for name in names))
    assert not [m for m in modules if m.startswith(("httpx", "click", "rich", "ocicas.registry", "ocicas.cli"))]
    assert "ocicas._dir" in modules
    assert "ocicas._copy" in modules


@pytest.mark.parametrize("name", ["RegistryEngine", "open_registry", "RetryPolicy"])
def test_registry_names_load_the_registry_engine_on_use(name: str) -> None:
    modules = loaded(f"import ocicas\nocicas.{name}")
    assert {"ocicas.registry", "ocicas.registry._engine", "httpx"} <= set(modules)
    # (httpx itself imports click and rich when they are installed, for its own command)
    assert not [m for m in modules if m.startswith("ocicas.cli")]


def test_lazy_names_are_the_defining_modules_objects() -> None:
    from ocicas import registry
    from ocicas._dir import open_layout

    assert ocicas.RegistryEngine is registry.RegistryEngine
    assert ocicas.open_registry is registry.open_registry
    assert ocicas.parse_registry_location is registry.parse_registry_location
    assert ocicas.RegistryLocation is registry.RegistryLocation
    assert ocicas.RetryPolicy is registry.RetryPolicy
    assert ocicas.open_layout is open_layout


def test_dir_and_all_list_every_public_name() -> None:
    lazy = {"RegistryEngine", "RegistryLocation", "RetryPolicy", "open_registry", "parse_registry_location"}
    assert lazy <= set(ocicas.__all__)
    assert set(ocicas.__all__) <= set(dir(ocicas))
    assert len(ocicas.__all__) == len(set(ocicas.__all__))
    # every name in __all__ resolves, in a fresh interpreter too (no name relies on an earlier import)
    done = run(
        "import ocicas\nmissing = [n for n in ocicas.__all__ if getattr(ocicas, n, None) is None]\nprint(missing)"
    )
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'ocicas' has no attribute 'open_regsitry'"):
        ocicas.open_regsitry  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(ocicas, "registry_engine")


def test_core_install_has_no_optional_dependency(core_only: Path) -> None:
    done = run("import ocicas\n" + LOADED, core_only=core_only)
    assert (done.returncode, done.stdout) == (0, '["ocicas"]\n'), done.stderr


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_core_install_builds_copies_and_collects(core_only: Path, tmp_path: Path, backend: str) -> None:
    script = """
    import sys, anyio, ocicas

    async def main(path):
        async with ocicas.MemoryEngine() as memory:
            root = await ocicas.build_image(memory, [b"layer bytes"], reference="v1", platform="linux/amd64")
            await ocicas.create_layout(path)
            async with await ocicas.open_layout(path) as layout:
                result = await ocicas.copy(memory, "v1", layout)
                assert result.root == root == await layout.get_reference("v1")
                assert list(result.copied) == sorted(await memory.list_blobs()) == sorted(await layout.list_blobs())
                assert (await ocicas.gc(layout)).removed == ()
        print(len(result.copied), "httpx" in sys.modules)

    anyio.run(main, sys.argv[1], backend=sys.argv[2])
    """
    done = run(script, str(tmp_path / "layout"), backend, core_only=core_only)
    assert (done.returncode, done.stdout, done.stderr) == (0, "3 False\n", "")


@pytest.mark.parametrize(
    "script",
    [
        "import ocicas.registry",
        "import ocicas\nocicas.open_registry",
        "from ocicas import RegistryEngine",
        "from ocicas.registry import open_registry",
    ],
)
def test_registry_without_httpx_says_how_to_install_it(core_only: Path, script: str) -> None:
    done = run(script, core_only=core_only)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"ModuleNotFoundError: {REGISTRY_MESSAGE}"


def test_registry_error_is_a_module_not_found_error_for_httpx(core_only: Path) -> None:
    script = """
    import ocicas
    try:
        ocicas.open_registry
    except ImportError as exc:
        print(type(exc).__name__, exc.name, str(exc), sep="|")
    """
    done = run(script, core_only=core_only)
    assert (done.returncode, done.stdout) == (0, f"ModuleNotFoundError|httpx|{REGISTRY_MESSAGE}\n"), done.stderr


COMMAND_MESSAGE = "ocicas: the command needs click, rich and httpx (not installed): pip install 'ocicas[cli]'\n"


@pytest.mark.parametrize(
    "script",
    ["import runpy; runpy.run_module('ocicas', run_name='__main__')", "from ocicas._cli_entry import main; main()"],
    ids=["python -m ocicas", "console script"],
)
def test_command_without_its_extra_says_how_to_install_it(core_only: Path, script: str) -> None:
    done = run(script, "--help", core_only=core_only)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", COMMAND_MESSAGE)


def test_command_names_only_what_is_missing() -> None:
    # httpx alone blocked in this environment: the message names it
    script = "import sys; sys.modules['httpx'] = None\nfrom ocicas._cli_entry import main; main()"
    done = run(script, "--version")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "ocicas: the command needs httpx (not installed): pip install 'ocicas[cli]'\n"


def test_command_runs_with_its_extra() -> None:
    done = run("from ocicas._cli_entry import main; main()", "--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ocicas, version {ocicas.__version__}\n", "")
    done = subprocess.run(
        [sys.executable, "-m", "ocicas", "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        cwd=ROOT,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ocicas, version {ocicas.__version__}\n", "")


def test_pyproject_core_is_anyio_alone_and_extras_name_the_rest() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == [
        "anyio>=4.11",
        "exceptiongroup>=1.0.2; python_version < '3.11'",
        "typing_extensions>=4.5; python_version < '3.11'",
    ]
    extras = project["optional-dependencies"]
    assert extras["registry"] == ["httpx>=0.28"]
    assert extras["cli"] == ["click>=8.2", "rich>=13.7", "httpx>=0.28"]
    assert set(extras["registry"] + extras["cli"]) <= set(extras["test"])
    assert project["scripts"] == {"ocicas": "ocicas._cli_entry:main"}
    # every requirement has a lower bound
    for requirement in [*project["dependencies"], *(r for group in extras.values() for r in group)]:
        assert ">=" in requirement, requirement
