"""A Go-style cancellation context that crosses threads and event loops.

A :class:`Context` carries an optional deadline and can be cancelled from any
thread. Engine methods bind it to an anyio cancel scope for the parts they await
(:func:`bound`), and their worker threads poll :meth:`Context.check` between chunks,
so a long copy stops at the next chunk rather than at the end. Cancelling a parent
cancels its children; a child's deadline is never later than its parent's.
Ambient cancellation (anyio cancel scopes, ``Task.cancel()``, trio) is independent
of contexts and propagates exactly as usual.
"""

from __future__ import annotations

import datetime
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio
import anyio.lowlevel

from ._errors import ContextCancelledError, ContextError, DeadlineExceededError
from ._tasks import loop_caller

__all__ = ["Context", "bound"]

_lock: Final = threading.Lock()  # guards every context's cancellation state and watchers


class Context:
    """Cancellation and deadline for engine calls, safe to share between threads.

    Create one with :meth:`background` and derive children with
    :meth:`with_cancel`, :meth:`with_timeout` or :meth:`with_deadline`. Deadlines are
    on the :func:`time.monotonic` clock.
    """

    __slots__ = ("__weakref__", "_children", "_deadline", "_error", "_parent", "_watchers")

    def __init__(self, *, _parent: Context | None = None, _deadline: float | None = None) -> None:
        self._parent = _parent
        self._deadline = _deadline
        self._error: ContextError | None = None
        self._children: weakref.WeakSet[Context] = weakref.WeakSet()
        self._watchers: list[Callable[[], None]] = []
        if _parent is not None:
            with _lock:
                self._error = _parent._error
                _parent._children.add(self)

    @classmethod
    def background(cls) -> Context:
        """A new root context: never cancelled unless you call :meth:`cancel`, no deadline."""
        return cls()

    def with_cancel(self) -> Context:
        """A child that is cancelled when this one is, or by its own :meth:`cancel`."""
        return Context(_parent=self, _deadline=self._deadline)

    def with_deadline(self, deadline: float) -> Context:
        """A child that expires at ``deadline`` (a :func:`time.monotonic` value), or earlier with this one."""
        from ._checks import check_real  # _checks imports this module

        deadline = check_real(deadline, "deadline")
        if self._deadline is not None:
            deadline = min(deadline, self._deadline)
        return Context(_parent=self, _deadline=deadline)

    def with_timeout(self, seconds: float | datetime.timedelta) -> Context:
        """A child that expires ``seconds`` (a number or a ``timedelta``) from now, or earlier with this one.

        A timeout of zero or less gives a context that is already past its deadline.
        """
        from ._checks import check_real  # _checks imports this module

        if isinstance(seconds, datetime.timedelta):
            seconds = seconds.total_seconds()
        return self.with_deadline(time.monotonic() + check_real(seconds, "seconds"))

    @property
    def deadline(self) -> float | None:
        """The :func:`time.monotonic` time this context expires at, or ``None``."""
        return self._deadline

    def cancel(self, reason: str = "context cancelled") -> None:
        """Cancel this context and its children. Safe from any thread; idempotent."""
        self._finish(ContextCancelledError(reason))

    def _finish(self, error: ContextError) -> None:
        with _lock:
            pending = [self]
            fired: list[Callable[[], None]] = []
            while pending:
                ctx = pending.pop()
                if ctx._error is None:
                    ctx._error = error
                    fired.extend(ctx._watchers)
                    ctx._watchers.clear()
                    pending.extend(ctx._children)
        for watcher in fired:
            watcher()

    def error(self) -> ContextError | None:
        """The error this context ended with, or ``None`` while it is live."""
        error = self._error
        if error is None and self._deadline is not None and time.monotonic() >= self._deadline:
            error = DeadlineExceededError(f"deadline exceeded ({self._deadline - time.monotonic():+.3f}s)")
            self._finish(error)
            error = self._error
        return error

    @property
    def done(self) -> bool:
        """Whether the context is cancelled or past its deadline."""
        return self.error() is not None

    def check(self) -> None:
        """Raise the context's error if it is done; cheap enough to call per chunk."""
        error = self.error()
        if error is not None:
            raise type(error)(*error.args)

    def _watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when cancelled; returns an unwatch function."""
        with _lock:
            if self._error is None:
                self._watchers.append(callback)
                already = False
            else:
                already = True
        if already:
            callback()

        def unwatch() -> None:
            with _lock:
                try:
                    self._watchers.remove(callback)
                except ValueError:
                    pass

        return unwatch

    def __repr__(self) -> str:
        state = "done" if self._error is not None else "live"
        deadline = "" if self._deadline is None else f", {self._deadline - time.monotonic():.3f}s left"
        return f"<Context {state}{deadline}>"


@asynccontextmanager
async def bound(ctx: Context | None) -> AsyncIterator[None]:
    """Run the body under an anyio cancel scope that ``ctx`` cancels.

    On leaving, if the scope was cancelled because of ``ctx``, the context's
    :class:`ContextCancelledError` or :class:`DeadlineExceededError` is raised in
    place of the cancellation; any other cancellation propagates untouched.
    """
    if ctx is None:
        yield
        return
    ctx.check()
    call_soon = loop_caller()
    loop_thread = threading.get_ident()
    with anyio.CancelScope() as scope:
        if ctx.deadline is not None:
            scope.deadline = anyio.current_time() + (ctx.deadline - time.monotonic())

        def on_cancel() -> None:
            if threading.get_ident() == loop_thread:
                scope.cancel()
                return
            try:  # another thread: hand the cancel to the event loop without waiting
                call_soon(scope.cancel)
            except RuntimeError:
                pass  # the loop has already finished

        unwatch = ctx._watch(on_cancel)
        try:
            yield
        finally:
            unwatch()
    if scope.cancelled_caught:
        ctx.check()  # our deadline or our cancel: raise the context's own error
        # a deadline reached by the event loop's clock a hair before time.monotonic()'s
        raise DeadlineExceededError("deadline exceeded")
