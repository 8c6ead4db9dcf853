"""Review of e14ba21: tests that fail on it, each demonstrating one finding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import ocicas
from ocicas.registry import RetryPolicy

pytestmark = pytest.mark.anyio

KiB = 1 << 10
RETRIES = 3
FAST = RetryPolicy(retries=RETRIES, backoff=0.001, max_delay=5)


async def test_retrying_a_set_that_was_not_durable_makes_it_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After NotDurableError, the caller's natural retry is a no-op for ``apply`` (the name already holds it):
    nothing is written and only the directory is fsynced again, which (as index.py itself says) cannot tell,
    so the retry returns success for a change whose rename may still be lost in a crash. A rewrite after a
    failed directory sync should write and rename ``index.json`` again, re-dirtying the directory."""
    from tests.test_group_commit import fail_once, images

    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        (a,) = await images(engine, 1)
        made = fail_once(monkeypatch, "directory fsync", layout)
        with pytest.raises(ocicas.NotDurableError):
            await engine.put_reference("x", a)
        assert made == ["directory fsync"]
        before = os.stat(layout / "index.json").st_ino
        await engine.put_reference("x", a)  # the retry: told durable
        assert os.stat(layout / "index.json").st_ino != before  # ... but nothing was renamed again
