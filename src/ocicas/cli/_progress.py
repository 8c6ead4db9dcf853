"""Progress bars on stderr (rich), shown only on a terminal unless asked for.

A :class:`Display` is started and stopped outside the event loop (those steps
write to the terminal); inside it, :meth:`Display.bar` and :class:`Bar` only
update counters, which rich's own thread draws. When bars are off, every call is
a no-op and rich is never imported.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from .._descriptor import Descriptor
from .._media_types import CONFIG_MEDIA_TYPES, INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES
from ._params import human_size
from ._run import settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from .._copy import CopyEvent

__all__ = ["Bar", "CopyBars", "Display"]

#: Blobs smaller than this get no bar of their own in a copy (they only advance the total).
_OWN_BAR_SIZE = 1 << 20


class Bar:
    """One line of a :class:`Display`; does nothing when bars are off."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: int) -> None:
        """Move on by ``amount`` bytes."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def set_total(self, total: int | None) -> None:
        """Change the total (``None``: unknown, shown as a pulse)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)

    def remove(self) -> None:
        """Take the line away."""
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None


class Display:
    """A set of progress bars on stderr, used as a context manager around :func:`run`.

    ``kind="bytes"`` shows transfer bars (size, speed, time left); ``"spinner"``
    shows an activity indicator and the elapsed time, for work without a measure.
    """

    def __init__(self, kind: Literal["bytes", "spinner"] = "bytes") -> None:
        mode = settings.progress
        self.enabled = mode == "always" or (mode == "auto" and sys.stderr.isatty())
        self._kind = kind
        self._progress: Progress | None = None

    def __enter__(self) -> Display:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                ProgressColumn,
                SpinnerColumn,
                Task,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class BinarySpeedColumn(ProgressColumn):
                """Speed in binary units (MiB/s), as the sizes next to it (rich's own says MB/s)."""

                def render(self, task: Task) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text("?" if speed is None else f"{human_size(int(speed))}/s", style="progress.data.speed")

            console = Console(stderr=True, force_terminal=True if settings.progress == "always" else None)
            if self._kind == "bytes":
                columns = (
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    BinarySpeedColumn(),
                    TimeRemainingColumn(),
                )
            else:
                columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())  # type: ignore[assignment]
            self._progress = Progress(*columns, console=console, transient=True)
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def bar(self, description: str, total: int | None = None) -> Bar:
        """A new line on the display."""
        if self._progress is None:
            return Bar(None, None)
        return Bar(self._progress, self._progress.add_task(description, total=total))


def _kind(descriptor: Descriptor) -> str:
    media_type = descriptor.media_type
    if media_type in MANIFEST_MEDIA_TYPES:
        return "manifest"
    if media_type in INDEX_MEDIA_TYPES:
        return "index"
    if media_type in CONFIG_MEDIA_TYPES:
        return "config"
    return "blob"


class CopyBars:
    """A :data:`~ocicas.CopyProgress` callback drawing an overall bar and one per large blob in flight."""

    def __init__(self, display: Display, title: str) -> None:
        self._display = display
        self._total = display.bar(title, None)
        self._blobs: dict[str, Bar] = {}

    def __call__(self, event: CopyEvent) -> None:
        descriptor = event.descriptor
        if event.kind == "planned":
            self._total.set_total(event.bytes_total)
        elif event.kind == "skipped":
            self._total.advance(event.nbytes)
        elif descriptor is None:
            return
        elif event.kind == "started":
            if descriptor.size >= _OWN_BAR_SIZE:
                name = f"  {_kind(descriptor)} {descriptor.digest.encoded[:12]}"
                self._blobs[descriptor.digest] = self._display.bar(name, descriptor.size)
        elif event.kind == "progress":
            self._total.advance(event.nbytes)
            bar = self._blobs.get(descriptor.digest)
            if bar is not None:
                bar.advance(event.nbytes)
        elif event.kind == "finished":
            bar = self._blobs.pop(descriptor.digest, None)
            if bar is not None:
                bar.remove()
