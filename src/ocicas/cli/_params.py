"""Command-line value types: digests, reference names, platforms, durations, sizes.

A malformed value is a usage error (exit status 2) that names the value, raised
while the command line is parsed, before anything is opened.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import click

from .._descriptor import Platform, validate_media_type
from .._digest import Digest, addressable
from .._errors import InvalidError, UnsupportedError
from .._graph import parse_platform
from .._layout_format import validate_reference_name

__all__ = ["DIGEST", "DURATION", "MEDIA_TYPE", "PLATFORM", "REFERENCE", "human_size", "parse_duration"]

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}

if TYPE_CHECKING:  # generic since click 8.5; plain before
    _ParamType = click.ParamType[Any, Any]
else:
    _ParamType = click.ParamType


class _Checked(_ParamType):
    """A value checked by an ocicas validator; its error becomes a usage error."""

    def check(self, value: str) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.check(value)
        except (InvalidError, UnsupportedError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


class _DigestType(_Checked):
    name = "digest"

    def check(self, value: str) -> Digest:
        if _HEX64.fullmatch(value):
            value = f"sha256:{value}"  # a bare hex digest, as pasted from a file name
        return addressable(value)


class _ReferenceType(_Checked):
    name = "reference"

    def check(self, value: str) -> str:
        return validate_reference_name(value)


class _PlatformType(_Checked):
    name = "platform"

    def check(self, value: str) -> Platform:
        return parse_platform(value)


class _MediaType(_Checked):
    name = "media type"

    def check(self, value: str) -> str:
        return validate_media_type(value, "media type")


def parse_duration(value: str) -> float:
    """Seconds in ``"0"``, ``"90"``, ``"30s"``, ``"10m"``, ``"1h30m"``, ``"2d"``."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"invalid duration {value!r}: use seconds or units s, m, h, d, as in 30s, 10m, 1h30m"
            ) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative time")
    return seconds


class _DurationType(_Checked):
    name = "duration"

    def check(self, value: str) -> float:
        return parse_duration(value)


DIGEST: Final = _DigestType()
REFERENCE: Final = _ReferenceType()
PLATFORM: Final = _PlatformType()
MEDIA_TYPE: Final = _MediaType()
DURATION: Final = _DurationType()


def human_size(size: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``…"""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """``0s``, ``45s``, ``10m``, ``1h``, ``1h30m``."""
    if seconds == 0:
        return "0s"
    out = []
    rest = seconds
    for unit in ("d", "h", "m"):
        count, rest = divmod(rest, _UNITS[unit])
        if count:
            out.append(f"{int(count)}{unit}")
    if rest:
        out.append(f"{rest:g}s")
    return "".join(out)
