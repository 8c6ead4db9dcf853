"""Strict, bounded JSON decoding and compact encoding shared by every format we read."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from ._errors import InvalidError

__all__ = ["DEFAULT_JSON_LIMIT", "dump_json", "load_json"]

#: Default cap on a JSON document (manifest, index, config) read from a store.
DEFAULT_JSON_LIMIT: Final = 4 << 20


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidError(f"duplicate JSON key {key!r:.100}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidError(f"JSON contains {name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid syntax, but no double holds it, and it could never be written back
        raise InvalidError(f"JSON number {text:.50} is out of range")
    return value


# a \uD800-\uDFFF escape: fine in a pair, but a lone one decodes to a str that is not UTF-8
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(data: bytes | bytearray | memoryview | str, what: str) -> Any:
    """Decode JSON text strictly: UTF-8, no duplicate keys, no NaN/Infinity, no number
    out of a double's range, no unpaired surrogate escape.

    Any failure (including nesting too deep to decode) raises :class:`InvalidError`
    naming ``what``.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)
        if _SURROGATE_ESCAPE.search(text):  # rare: check the strings can be written back as UTF-8
            try:
                json.dumps(value, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise InvalidError("JSON contains an unpaired surrogate escape") from None
        return value
    except InvalidError as exc:
        raise InvalidError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidError(f"{what} is not valid JSON: {exc}") from None


def dump_json(obj: Any) -> bytes:
    """Serialise ``obj`` compactly as UTF-8; objects with ``to_dict()`` (descriptors, models) included.

    Raises :class:`InvalidError` for what JSON cannot hold (NaN, infinities, unpaired
    surrogates) and for values nested too deeply to serialise (how deep depends on
    the caller's stack: a document read in a worker thread may be deeper than the
    event loop's thread can write), ``TypeError`` for objects of other types.
    """

    def default(value: Any) -> Any:
        to_dict = getattr(value, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"cannot serialise {type(value).__name__} as JSON")
        return to_dict()

    try:
        return json.dumps(obj, default=default, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except RecursionError:
        raise InvalidError("cannot serialise JSON nested this deeply") from None
    except ValueError as exc:  # NaN or infinity (allow_nan), an unpaired surrogate (encode)
        if isinstance(exc, InvalidError):
            raise
        raise InvalidError(f"cannot serialise as JSON: {exc}") from None
