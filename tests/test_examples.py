"""Every example runs, so none can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
