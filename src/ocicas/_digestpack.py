"""Digests held as packed raw bytes: the collector's per-blob state and :attr:`GCResult.removed`.

A ``sha256`` digest kept as text is an object of about 120 bytes, plus a pointer and whatever maps it; kept
raw it is 32 bytes in one shared buffer. A collection of 200,000 garbage blobs then holds 6.4 MB where it
held about 90 MB of objects.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, overload

from ._digest import _ENCODED, Digest
from ._errors import InvalidError
from ._threads import share_gil, shared

__all__ = ["Candidates", "PackedDigests"]

#: Raw bytes of a digest of each registered algorithm (its encoded part is lowercase hex of twice as many).
_WIDTHS: Final = {algorithm: hashlib.new(algorithm).digest_size for algorithm in _ENCODED}


class _Segment:
    """The digests of one algorithm, in the order added: packed raw bytes for a registered algorithm, else text."""

    __slots__ = ("count", "kept", "packed", "prefix", "sizes", "texts", "width")

    def __init__(self, algorithm: str) -> None:
        self.prefix = f"{algorithm}:"
        self.width = _WIDTHS.get(algorithm, 0)  # 0: kept as text
        self.packed = bytearray()
        self.texts: list[str] = []
        self.sizes = array("q")
        self.count = 0
        self.kept = 0  # a sweep's write cursor: entries before it went

    def append(self, text: str, size: int) -> None:
        if self.width:
            # text from a third-party engine's hook: uppercase or spaced hex would name another (live) file when
            # made text again, and a wrong length would misalign every record after it
            encoded = text[len(self.prefix) :]
            try:
                raw = bytes.fromhex(encoded) if len(encoded) == 2 * self.width else b""
            except ValueError:
                raw = b""
            if raw.hex() != encoded:
                raise InvalidError(f"{text!r}: not a {self.prefix[:-1]} digest (lowercase hex of {2 * self.width})")
            self.packed += raw
        else:
            self.texts.append(text)
        self.sizes.append(size)
        self.count += 1

    def text(self, index: int) -> str:
        if self.width:
            at = index * self.width
            return self.prefix + self.packed[at : at + self.width].hex()
        return self.texts[index]

    def move(self, source: int, target: int, size: int) -> None:
        """Entry ``source`` to ``target`` (``target <= source``), with ``size``: compaction in place."""
        if self.width:
            w = self.width
            self.packed[target * w : target * w + w] = self.packed[source * w : source * w + w]
        else:
            self.texts[target] = self.texts[source]
        self.sizes[target] = size

    def truncate(self, count: int) -> None:
        del self.packed[count * self.width :]
        del self.texts[count:]
        del self.sizes[count:]
        self.count = count


class Candidates:
    """Digests (text, validated) with their sizes, per algorithm, in the order added: a collector's candidates.

    Every method is plain Python over every entry: the collector runs it in a worker thread, or on the event
    loop over a few entries (``_gc._compute``).
    """

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        self._segments: dict[str, _Segment] = {}

    def add(self, digests: list[str], sizes: Mapping[str, int]) -> None:
        """Append ``digests``, each with its size from ``sizes``."""
        segments = self._segments
        for digest in shared(digests):
            algorithm = digest[: digest.find(":")]
            segment = segments.get(algorithm)
            if segment is None:
                segment = segments[algorithm] = _Segment(algorithm)
            segment.append(digest, sizes[digest])

    def __len__(self) -> int:
        return sum(segment.count for segment in self._segments.values())

    def __iter__(self) -> Iterator[str]:
        for segment in list(self._segments.values()):
            for index in range(segment.count):
                yield segment.text(index)

    def keep(self, wanted: Callable[[str], bool]) -> None:
        """Drop every entry ``wanted`` refuses, keeping the order."""
        for segment in self._segments.values():
            kept = 0
            for index in shared(range(segment.count)):
                if wanted(segment.text(index)):
                    if kept != index:
                        segment.move(index, kept, segment.sizes[index])
                    kept += 1
            segment.truncate(kept)

    def runs(self, size: int) -> list[tuple[str, int, int]]:
        """A sweep's runs of at most ``size`` entries of one algorithm, in order: ``(algorithm, start, stop)``."""
        return [
            (algorithm, start, min(segment.count, start + size))
            for algorithm, segment in self._segments.items()
            for start in range(0, segment.count, size)
        ]

    def texts(self, algorithm: str, start: int, stop: int) -> list[str]:
        """The entries of a run, as text."""
        segment = self._segments[algorithm]
        return [segment.text(index) for index in shared(range(start, stop))]

    def settle(self, algorithm: str, start: int, texts: list[str], gone: Mapping[str, int]) -> list[str]:
        """Keep of a run (its ``texts``) only those in ``gone``, with the size each freed; return the others.

        Runs are settled in order: the entries kept move down, in place, and the last run's settling
        drops the rest.
        """
        segment = self._segments[algorithm]
        if start == 0:
            segment.kept = 0
        left = []
        kept = segment.kept
        for index, text in enumerate(shared(texts), start):
            size = gone.get(text)
            if size is None:
                left.append(text)
            else:
                segment.move(index, kept, size)
                kept += 1
        segment.kept = kept
        if start + len(texts) == segment.count:
            segment.truncate(kept)
        return left

    def take_sorted(self) -> tuple[PackedDigests, int]:
        """The distinct entries as a sorted :class:`PackedDigests`, and the sum of their sizes (each counted once),
        leaving this empty (their bytes move, no copy is kept)."""
        parts: list[tuple[str, bytes | bytearray | tuple[str, ...], int]] = []
        total = 0
        for segment in self._segments.values():
            if segment.width:
                packed, segment.packed = segment.packed, bytearray()
                sizes, segment.sizes = segment.sizes, array("q")
                data, freed = _sort_packed(packed, sizes, segment.width)
                parts.append((segment.prefix, data, segment.width))
            else:
                texts: list[str] = []
                freed = 0
                for text, size in sorted(zip(segment.texts, segment.sizes, strict=True)):
                    if not texts or texts[-1] != text:  # a name listed twice is one blob
                        texts.append(text)
                        freed += size
                parts.append((segment.prefix, tuple(texts), 0))
            total += freed
            segment.truncate(0)
        return PackedDigests._from_parts(parts), total


_SIZE: Final = 8  # a record's size field, big-endian, after its digest while sorting


def _sort_packed(data: bytearray, sizes: array[int], width: int) -> tuple[bytearray, int]:
    """Sort fixed-width records, consuming ``data`` and ``sizes``, dropping repeated records: the sorted distinct
    records and the sum of their sizes. Bucketed by first byte, so that the transient objects are those of one
    bucket, and at most about twice the records' bytes (with their sizes) are held."""
    count = len(sizes)
    buckets = [bytearray() for _ in range(256 if count > 4096 else 1)]
    spread = len(buckets) > 1
    with memoryview(data) as view:
        for n, at in enumerate(shared(range(0, count * width, width))):
            bucket = buckets[data[at] if spread else 0]
            bucket += view[at : at + width]
            bucket += sizes[n].to_bytes(_SIZE, "big")
    del data[:]
    del sizes[:]
    out = bytearray()
    total = 0
    record = width + _SIZE
    for n, bucket in enumerate(buckets):
        share_gil()
        previous = b""
        for item in sorted(bytes(bucket[i : i + record]) for i in range(0, len(bucket), record)):
            digest = item[:width]
            if digest != previous:  # a name listed twice is one blob
                out += digest
                total += int.from_bytes(item[width:], "big")
                previous = digest
        buckets[n] = bytearray()
    return out, total


class PackedDigests(Sequence[Digest]):
    """A sorted, immutable ``Sequence[Digest]`` of distinct digests, held as packed raw bytes (32 per ``sha256``).

    The type of :attr:`GCResult.removed`. It compares equal to the sorted ``tuple`` of the same
    digests (and to an equal ``PackedDigests``) and hashes like it; it indexes, iterates, slices
    (to a ``tuple``) and counts as a ``Sequence``; ``in`` and :meth:`index` search in O(log n).
    It is not a ``tuple``: no ``+``, ``*`` or ``<`` with tuples. Items are :class:`Digest`
    objects made on access.
    """

    __slots__ = ("_counts", "_hash", "_parts", "_starts")

    _parts: tuple[tuple[str, bytes | bytearray | tuple[str, ...], int], ...]

    def __init__(self, digests: Sequence[Digest | str] = ()) -> None:
        candidates = Candidates()
        texts = sorted({str(Digest(d)) for d in digests})
        candidates.add(texts, dict.fromkeys(texts, 0))
        self._set(candidates.take_sorted()[0]._parts)

    @classmethod
    def _from_parts(cls, parts: list[tuple[str, bytes | bytearray | tuple[str, ...], int]]) -> PackedDigests:
        self = cls.__new__(cls)
        # parts sorted by "algorithm:": for two algorithms, that prefix alone orders their digests as text
        self._set(tuple(sorted(parts, key=lambda part: part[0])))
        return self

    def _set(self, parts: tuple[tuple[str, bytes | bytearray | tuple[str, ...], int], ...]) -> None:
        self._parts = tuple(part for part in parts if len(part[1]))
        counts = [len(data) // width if width else len(data) for _, data, width in self._parts]
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        self._counts = tuple(counts)
        self._starts = tuple(starts)
        self._hash: int | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def _item(self, part: int, index: int) -> Digest:
        prefix, data, width = self._parts[part]
        if width:
            at = index * width
            return Digest._trusted(prefix + data[at : at + width].hex())  # type: ignore[union-attr]
        return Digest._trusted(data[index])  # type: ignore[arg-type]

    @overload
    def __getitem__(self, index: int) -> Digest: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Digest, ...]: ...
    def __getitem__(self, index: int | slice) -> Digest | tuple[Digest, ...]:
        if isinstance(index, slice):
            return tuple(self[n] for n in range(*index.indices(len(self))))
        index = operator.index(index)  # TypeError for "x", 1.0 or None, as a tuple's
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("PackedDigests index out of range")
        part = bisect.bisect_right(self._starts, index) - 1
        return self._item(part, index - self._starts[part])

    def __iter__(self) -> Iterator[Digest]:
        for part, count in enumerate(self._counts):
            for index in range(count):
                yield self._item(part, index)

    def __reversed__(self) -> Iterator[Digest]:
        for part in reversed(range(len(self._parts))):
            for index in reversed(range(self._counts[part])):
                yield self._item(part, index)

    def _find(self, value: object) -> int:
        """The position of ``value``, or -1."""
        if not isinstance(value, str):
            return -1
        algorithm, colon, encoded = value.partition(":")
        prefix = algorithm + colon
        for part, (head, data, width) in enumerate(self._parts):
            if head != prefix:
                continue
            start = self._starts[part]
            if not width:
                at = bisect.bisect_left(data, value)
                return start + at if at < len(data) and data[at] == value else -1
            if len(encoded) != 2 * width or encoded != encoded.lower():
                return -1
            try:
                key = bytes.fromhex(encoded)
            except ValueError:
                return -1
            low, high = 0, self._counts[part]
            while low < high:
                middle = (low + high) // 2
                if data[middle * width : middle * width + width] < key:  # type: ignore[operator]
                    low = middle + 1
                else:
                    high = middle
            if low < self._counts[part] and data[low * width : low * width + width] == key:
                return start + low
            return -1
        return -1

    def __contains__(self, value: object) -> bool:
        return self._find(value) >= 0

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """The position of ``value``; ``ValueError`` if it is not there (between ``start`` and ``stop``)."""
        at = self._find(value)
        low, high, _ = slice(start, stop).indices(len(self))
        if at < 0 or not low <= at < high:
            raise ValueError(f"{value!r} is not in PackedDigests")
        return at

    def count(self, value: Any) -> int:
        """1 if ``value`` is here, else 0 (the digests are distinct)."""
        return 1 if self._find(value) >= 0 else 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedDigests):
            return self._parts == other._parts
        if isinstance(other, tuple):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))
        return self._hash

    def __repr__(self) -> str:
        return f"PackedDigests({list(map(str, self))!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedDigests._from_parts, (list(self._parts),))
