"""Running a command's async work: backend choice, Ctrl-C, and errors turned into exit codes."""

from __future__ import annotations

import dataclasses
import enum
import errno
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .._errors import ClobberError, InvalidError, OCICASError
from .._tasks import task_group

__all__ = [
    "CommandError",
    "ExitCode",
    "Interrupted",
    "Settings",
    "StdoutClosed",
    "exit_code",
    "report_error",
    "run",
    "settings",
]

_T = TypeVar("_T")


class ExitCode(enum.IntEnum):
    """The exit statuses of ``ocicas`` (listed in ``ocicas --help``)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    INVALID = 4
    CONFLICT = 5
    INTERRUPTED = 130
    BROKEN_PIPE = 141
    TERMINATED = 143


EXIT_CODES_HELP = """\b
Exit status:
  0    success
  1    failure (an operating-system error, an unsupported operation, ...)
  2    usage error: a bad option, argument or value on the command line
  3    not found: no such layout, blob, reference or file
  4    invalid or corrupt content; fsck found a problem
  5    conflict: the layout or reference exists already, or a blob is in use
  130  interrupted by Ctrl-C (143: by SIGTERM); nothing half-written is left
"""


@dataclasses.dataclass
class Settings:
    """Options of the ``ocicas`` group that every command obeys."""

    debug: bool = False
    backend: str = "asyncio"
    progress: str = "auto"
    direct_writes: bool = False


#: This process's settings (set by the group's callback before a command runs).
settings = Settings()


class CommandError(Exception):
    """A failure a command reports as one line, with its exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class StdoutClosed(CommandError):
    """Whoever read stdout went away (``ocicas cat … | head``): stop quietly."""

    def __init__(self) -> None:
        super().__init__("stdout was closed", ExitCode.BROKEN_PIPE)


class Interrupted(Exception):
    """The work was stopped by SIGINT or SIGTERM (and cleaned up)."""

    def __init__(self, signum: int) -> None:
        super().__init__("interrupted" if signum == signal.SIGINT else "terminated")
        self.code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED


def run(work: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``work()`` on the chosen backend; SIGINT/SIGTERM cancel it cleanly and raise :class:`Interrupted`.

    Cancellation unwinds through the engines' shielded clean-up (a ``put_blob`` in
    flight removes its temporary file, ``close()`` its temporary directory), so
    nothing half-written is left.
    """

    async def guarded() -> _T:
        received: list[int] = []
        work_scope = anyio.CancelScope()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def watch() -> None:
                async for signum in signals:  # keep draining: trio redelivers unread signals on exit
                    received.append(signum)
                    work_scope.cancel()

            try:
                async with task_group() as tg:
                    tg.start_soon(watch)
                    with work_scope:
                        result = await work()
                    tg.cancel_scope.cancel()
            except Exception as exc:
                if received:  # a failure while unwinding: the interruption is the news
                    raise Interrupted(received[0]) from exc
                raise
        if work_scope.cancelled_caught:
            raise Interrupted(received[0])
        return result  # a signal that came after the work was done interrupted nothing

    try:
        return anyio.run(guarded, backend=settings.backend)
    except KeyboardInterrupt:  # Ctrl-C before the receiver was installed or after it was removed
        raise Interrupted(signal.SIGINT) from None
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        raise Interrupted(signal.SIGINT) from None


def exit_code(exc: BaseException) -> ExitCode:
    """The exit status for an error."""
    if isinstance(exc, CommandError | Interrupted):
        return exc.code
    if isinstance(exc, FileNotFoundError):  # ocicas's NotFoundError too
        return ExitCode.NOT_FOUND
    if isinstance(exc, ClobberError):
        return ExitCode.CONFLICT
    if isinstance(exc, InvalidError):
        return ExitCode.INVALID
    if isinstance(exc, BrokenPipeError):
        return ExitCode.BROKEN_PIPE
    return ExitCode.FAILURE


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, OCICASError) and exc.strerror:
        where = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"{exc.strerror[0].lower()}{exc.strerror[1:]}{where}"
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, OCICASError | CommandError | Interrupted):
        text = f"{type(exc).__name__}: {text}"
    return text.splitlines()[0] if text.strip() else text


def report_error(exc: BaseException) -> ExitCode:
    """Print ``exc`` as one line on stderr (with a traceback under ``--debug``); return its exit status."""
    code = exit_code(exc)
    if code == ExitCode.BROKEN_PIPE or getattr(exc, "errno", None) == errno.EPIPE:
        return ExitCode.BROKEN_PIPE  # stdout's reader went away: nothing to say
    if settings.debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"ocicas: error: {_message(exc)}", file=sys.stderr)
    return code
