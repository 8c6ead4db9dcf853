"""Argument checks at the door: every public function checks what it is given here.

A wrong type raises ``TypeError`` naming the parameter; a value of the right type
that is out of range raises :class:`~ocicas.InvalidError` (a ``ValueError``), also
naming it. Nothing reaches the internals unchecked, so a careless call never
deletes, stores or half-does anything.
"""

from __future__ import annotations

import datetime
import inspect
import io
import math
import os
from collections.abc import AsyncIterable, Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

import anyio

from ._digest import _ENCODED, Digest, addressable
from ._errors import InvalidError

if TYPE_CHECKING:  # imported where used: _context and _descriptor check their own arguments here
    from ._context import Context
    from ._descriptor import Descriptor
    from ._engine import Engine

__all__ = [
    "check_async_callable",
    "check_blob_source",
    "check_bool",
    "check_callable",
    "check_ctx",
    "check_descriptor",
    "check_digest",
    "check_digests",
    "check_digests_yielding",
    "check_engine",
    "check_instance",
    "check_int",
    "check_path",
    "check_real",
    "check_reference_name",
    "check_seconds",
    "type_name",
]

_T = TypeVar("_T")


def type_name(value: object) -> str:
    """``value``'s type as an error message shows it."""
    return "None" if value is None else type(value).__name__


def check_instance(value: Any, types: type[_T] | tuple[type[_T], ...], name: str, what: str | None = None) -> _T:
    """``value`` if it is an instance of ``types``; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(value, types):
        if what is None:
            what = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{name} must be {what}, not {type_name(value)}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A real ``bool`` (not a truthy object)."""
    return check_instance(value, bool, name, "True or False")


@overload
def check_int(value: Any, name: str, *, minimum: int = 0, optional: Literal[False] = False) -> int: ...
@overload
def check_int(value: Any, name: str, *, minimum: int = 0, optional: bool) -> int | None: ...
def check_int(value: Any, name: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    """An ``int`` (``bool`` refused) of at least ``minimum``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, not {type_name(value)}")
    if value < minimum:
        raise InvalidError(f"{name} must be at least {minimum}, not {value}")
    return value


def check_seconds(value: Any, name: str) -> float:
    """A non-negative duration in seconds: an ``int``, a ``float`` or a ``datetime.timedelta``."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{name} must be seconds (int or float) or a datetime.timedelta, not {type_name(value)}")
    if not seconds >= 0:  # also refuses NaN
        raise InvalidError(f"{name} must not be negative, not {value!r}")
    return seconds


def check_real(value: Any, name: str) -> float:
    """A real number of seconds or a point in time: an ``int`` or a ``float``, negative allowed, never NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number (int or float), not {type_name(value)}")
    seconds = float(value)
    if math.isnan(seconds):
        raise InvalidError(f"{name} must be a number, not NaN")
    return seconds


def check_ctx(ctx: Any) -> Context | None:
    """A :class:`~ocicas.Context` or ``None``."""
    from ._context import Context

    if ctx is not None and not isinstance(ctx, Context):
        raise TypeError(f"ctx must be an ocicas.Context or None, not {type_name(ctx)}")
    return ctx


def check_digest(value: Any, name: str = "digest") -> Digest:
    """An addressable digest from a ``Digest`` or ``str`` (:class:`InvalidError` for a malformed one)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a digest string, not {type_name(value)}")
    try:
        return addressable(value)
    except InvalidError as exc:
        if name == "digest":
            raise
        raise type(exc)(f"{name}: {exc}") from None


def check_descriptor(value: Any, name: str = "descriptor") -> Descriptor:
    """A :class:`~ocicas.Descriptor`."""
    from ._descriptor import Descriptor

    return check_instance(value, Descriptor, name, "an ocicas.Descriptor")


def check_engine(value: Any, name: str = "engine") -> Engine:
    """An :class:`~ocicas.Engine`."""
    from ._engine import Engine

    return check_instance(value, Engine, name, "an ocicas.Engine")


def check_reference_name(value: Any, name: str) -> str:
    """A valid image-spec reference name: ``TypeError`` for a non-``str``, :class:`InvalidError` naming ``name``."""
    from ._layout_format import validate_reference_name

    check_instance(value, str, name, "a reference name (str)")
    try:
        return validate_reference_name(value)
    except InvalidError as exc:
        raise InvalidError(f"{name}: {exc}") from None


def check_digests(values: Any, name: str = "digests") -> list[Digest]:
    """An iterable of digests (not a single ``str``), as a list of addressable digests."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of digests, not {type_name(values)}")
    out = []
    for value in values:
        # fast path: a Digest (validated when made) of a supported algorithm, as GC passes thousands of
        if type(value) is not Digest or not value.startswith(_SUPPORTED_PREFIXES):
            value = check_digest(value, f"each of {name}")
        out.append(value)
    return out


_SUPPORTED_PREFIXES: Final = tuple(f"{algorithm}:" for algorithm in _ENCODED)
#: Digests :func:`check_digests_yielding` checks between two turns of the event loop (≈ 0.3 ms of work).
_DIGESTS_PER_TURN: Final = 1024


async def check_digests_yielding(values: Any, name: str = "digests") -> list[Digest]:
    """:func:`check_digests` for calls on the event loop: thousands of digests (GC's) are checked in pieces.

    Between pieces the loop gets a turn (without a cancellation point), so a
    bulk call costs the other tasks at most a piece's worth of waiting.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of digests, not {type_name(values)}")
    import anyio.lowlevel  # loaded by every async caller already; not by this module's importers

    items = iter(values)
    out: list[Digest] = []
    while piece := list(islice(items, _DIGESTS_PER_TURN)):
        if out:
            await anyio.lowlevel.cancel_shielded_checkpoint()
        out += check_digests(piece, name)
    return out


def check_blob_source(value: Any, name: str = "data") -> Any:
    """A blob source: bytes-like, an object with an async ``read(n)``, or an async iterable of bytes."""
    if isinstance(value, anyio.AsyncFile) and isinstance(value.wrapped, io.TextIOBase):  # open_file(path, "r")
        raise TypeError(f"{name} is a file opened in text mode ({type_name(value.wrapped)}): open it with 'rb'")
    if isinstance(value, bytes | bytearray | memoryview | AsyncIterable):
        return value
    if inspect.iscoroutinefunction(getattr(value, "read", None)):
        return value
    hint = ": encode the text first" if isinstance(value, str) else ""
    raise TypeError(
        f"{name} must be bytes, an async iterable of bytes or an object with an async read(), "
        f"not {type_name(value)}{hint}"
    )


def check_path(value: Any, name: str = "path") -> Path:
    """A non-empty ``str`` or ``os.PathLike`` path (an empty one would mean the working directory)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name} must be a str or os.PathLike, not {type_name(value)}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a text path, not {type_name(text)}")
    if not text:
        raise InvalidError(f"{name} must not be empty")
    if "\x00" in text:
        raise InvalidError(f"{name} must not contain NUL: {text!r}")
    return Path(text)


def check_callable(value: Any, name: str, *, optional: bool = True) -> Callable[..., Any] | None:
    """A plain (synchronous) callable; ``None`` passes when ``optional``. An async function is refused."""
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be a function{' or None' if optional else ''}, not {type_name(value)}")
    call = getattr(value, "__call__", None)  # noqa: B004
    if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(call):
        raise TypeError(f"{name} must be a plain function, not an async function: it is called without await")
    return value  # type: ignore[no-any-return]


def check_async_callable(value: Any, name: str, *, optional: bool = True) -> Callable[..., Any] | None:
    """A coroutine function (or an object whose ``__call__`` is one); ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    call = getattr(value, "__call__", None)  # noqa: B004 - a class with async __call__ counts too
    if not (inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(call)):
        raise TypeError(f"{name} must be an async function (async def), not {type_name(value)}")
    return value  # type: ignore[no-any-return]
