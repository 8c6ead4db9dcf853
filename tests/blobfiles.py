"""Blob-sized test data, and what a put may leave in a layout: shared by the tests of puts from files."""

from __future__ import annotations

from pathlib import Path


def payload(size: int) -> bytes:
    """``size`` bytes that differ all along (a block repeated would hide a misplaced range)."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return b"".join(i.to_bytes(4, "big") + block[4:] for i in range(size // len(block) + 1))[:size]


def temp_files(layout: Path) -> list[Path]:
    """The files in the layout's private temporary directories: none once a put has ended, however it ended."""
    return [f for d in layout.iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir()]
