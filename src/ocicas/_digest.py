"""Content digests: the image-spec grammar, the algorithms we compute, and hashing."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from ._errors import DigestMismatchError, InvalidError, SizeMismatchError, UnsupportedAlgorithmError

__all__ = ["BLOB_ALGORITHM", "SUPPORTED_ALGORITHMS", "Digest", "Verifier", "addressable"]

#: The algorithm new blobs are stored under.
BLOB_ALGORITHM: Final = "sha256"

#: Registered algorithms and the exact shape of their encoded part (lowercase hex).
_ENCODED: Final[dict[str, re.Pattern[str]]] = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

#: Algorithms ocicas can compute and therefore store and verify.
SUPPORTED_ALGORITHMS: Final = frozenset(_ENCODED)

# image-spec descriptor.md: algorithm ":" encoded. Explicit ASCII classes, so no
# unicode digit or letter slips through; fullmatch, so no trailing newline does.
_GRAMMAR: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_MAX_LENGTH: Final = 1024


class Digest(str):
    """A validated content digest such as ``"sha256:e3b0c4…"``.

    A ``str`` subclass, so it compares equal to (and hashes like) its text.
    Construction validates it against the image-spec grammar and, for the
    registered algorithms ``sha256`` and ``sha512``, the exact encoded form
    (lowercase hex of the right length): anything else raises
    :class:`~ocicas.InvalidError`. Digests with unregistered algorithms parse
    (the grammar admits them) but :attr:`supported` is false and operations that
    must hash with them raise :class:`~ocicas.UnsupportedAlgorithmError`.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if type(value) is cls:
            return value
        if not isinstance(value, str):
            raise InvalidError(f"digest must be a string, not {type(value).__name__}: {value!r:.80}")
        if len(value) > _MAX_LENGTH or not _GRAMMAR.fullmatch(value):
            raise InvalidError(f"invalid digest {value!r:.200}")
        algorithm, _, encoded = value.partition(":")
        shape = _ENCODED.get(algorithm)
        if shape is not None and not shape.fullmatch(encoded):
            raise InvalidError(f"invalid {algorithm} digest {value!r:.200}: expected lowercase hex of the right length")
        return super().__new__(cls, value)

    @classmethod
    def _trusted(cls, value: str) -> Digest:
        """Wrap text already known to match the grammar (hot listing loops)."""
        return str.__new__(cls, value)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, algorithm: str = BLOB_ALGORITHM) -> Digest:
        """Return the digest of ``data`` under ``algorithm``."""
        return cls(f"{algorithm}:{_hash_bytes(algorithm, data)}")

    @property
    def algorithm(self) -> str:
        """The algorithm part, e.g. ``"sha256"``."""
        return self.partition(":")[0]

    @property
    def encoded(self) -> str:
        """The encoded part after the colon (the hex string for sha256)."""
        return self.partition(":")[2]

    @property
    def supported(self) -> bool:
        """Whether ocicas can compute this digest's algorithm."""
        return self.algorithm in _ENCODED

    def __repr__(self) -> str:
        return f"Digest({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Digest, (str(self),))


def addressable(value: Digest | str) -> Digest:
    """Validate ``value`` as a digest whose blob we can store, find and verify."""
    digest = Digest(value)
    if not digest.supported:
        raise UnsupportedAlgorithmError(
            f"cannot address blob {digest}: algorithm {digest.algorithm!r} is not supported"
        )
    return digest


def _new_hash(algorithm: str) -> Any:
    if algorithm not in _ENCODED:
        raise UnsupportedAlgorithmError(f"digest algorithm {algorithm!r} is not supported (supported: sha256, sha512)")
    return hashlib.new(algorithm)


def _hash_bytes(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    h = _new_hash(algorithm)
    h.update(data)
    return str(h.hexdigest())


class Verifier:
    """Hashes content as it passes and checks it against an expected digest and size.

    ``update`` may be called from a worker thread (hashlib releases the GIL for
    large buffers). ``check_size`` fails as soon as more bytes than expected
    arrive; :meth:`verify` checks the final size first, then the digest.
    """

    __slots__ = ("_hash", "digest", "received", "size")

    def __init__(self, digest: Digest | None, size: int | None = None, *, algorithm: str = BLOB_ALGORITHM) -> None:
        self.digest = digest
        self.size = size
        self.received = 0
        self._hash = _new_hash(digest.algorithm if digest is not None else algorithm)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hash ``chunk``; raise :class:`SizeMismatchError` once the expected size is passed."""
        self.received += len(chunk)
        self.check_total(self.received)
        self._hash.update(chunk)

    def count(self, chunk: bytes | bytearray | memoryview) -> None:
        """Account for ``chunk`` without hashing it (its source verifies the digest itself)."""
        self.received += len(chunk)
        self.check_total(self.received)

    def check_total(self, total: int) -> None:
        """Raise :class:`SizeMismatchError` if ``total`` bytes are more than expected (before hashing them)."""
        if self.size is not None and total > self.size:
            raise SizeMismatchError(f"{self._what()} is larger than its expected size {self.size}")

    def _what(self) -> str:
        return f"blob {self.digest}" if self.digest is not None else "content"

    def result(self) -> Digest:
        """The digest of everything hashed so far."""
        return Digest(f"{self._hash.name}:{self._hash.hexdigest()}")

    def verify(self) -> Digest:
        """Check the totals at the end of the content and return the computed digest."""
        if self.size is not None and self.received != self.size:
            raise SizeMismatchError(f"{self._what()} has size {self.received}, expected {self.size}")
        actual = self.result()
        if self.digest is not None and actual != self.digest:
            raise DigestMismatchError(f"{self._what()} hashes to {actual}")
        return actual
