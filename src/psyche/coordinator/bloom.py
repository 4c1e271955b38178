"""Deterministic Bloom filters that witnesses send to the coordinator.

Items are byte strings (client ids, 32-byte result commitments). Bit positions
come from sha256 of the item (double hashing), never from Python's ``hash``, so
every machine builds and reads the same bits. The wire form is compact:

    byte 0        k, the number of hash functions (1..32)
    bytes 1..4    m, the number of bits, little-endian u32
    bytes 5..     the bit array, ceil(m/8) bytes, bit i = byte i//8, bit i%8

>>> f = BloomFilter.for_items([b"a", b"b"])
>>> b"a" in f, BloomFilter.from_bytes(f.to_bytes()) == f
(True, True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence

MAX_BLOOM_BYTES = 4096
"""Largest filter the coordinator accepts (256 items at 1e-6 false positives fit)."""
MAX_HASHES = 32
DEFAULT_FALSE_POSITIVE_RATE = 0.01
"""1% (as the original): 256 items fit in ~310 bytes, small enough for a Solana transaction."""


def _hashes(item: bytes) -> tuple[int, int]:
    """The two hashes every filter derives an item's bit positions from (one sha256)."""
    d = hashlib.sha256(item).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:16], "little") | 1  # odd: k probes never collapse


def _probes(hashes: tuple[int, int], m: int, k: int) -> Iterator[int]:
    """The ``k`` bit positions of an item with ``hashes`` in a filter of ``m`` bits (double hashing)."""
    h1, h2 = hashes
    return ((h1 + i * h2) % m for i in range(k))


def _positions(item: bytes, m: int, k: int) -> list[int]:
    return list(_probes(_hashes(item), m, k))


class BloomFilter:
    """A set of byte strings with no false negatives and a bounded false-positive rate."""

    __slots__ = ("bits", "k", "m")

    def __init__(self, m: int, k: int, bits: int = 0):
        if not 8 <= m <= 8 * MAX_BLOOM_BYTES:
            raise ValueError(f"bloom size must be 8..{8 * MAX_BLOOM_BYTES} bits (got {m})")
        if not 1 <= k <= MAX_HASHES:
            raise ValueError(f"bloom hash count must be 1..{MAX_HASHES} (got {k})")
        self.m, self.k, self.bits = m, k, bits

    @classmethod
    def with_capacity(cls, items: int, fp_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> BloomFilter:
        """An empty filter sized so ``items`` entries give about ``fp_rate`` false positives."""
        if not 0 < fp_rate < 1:
            raise ValueError(f"fp_rate must be in (0, 1) (got {fp_rate})")
        n = max(1, items)
        m = math.ceil(-n * math.log(fp_rate) / math.log(2) ** 2)
        m = min(max(8, (m + 7) // 8 * 8), 8 * MAX_BLOOM_BYTES)
        k = min(MAX_HASHES, max(1, round(m / n * math.log(2))))
        return cls(m, k)

    @classmethod
    def for_items(cls, items: Iterable[bytes], fp_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> BloomFilter:
        """A filter holding exactly ``items``, sized for their count."""
        items = list(items)
        f = cls.with_capacity(len(items), fp_rate)
        for item in items:
            f.add(item)
        return f

    @classmethod
    def exact_for(cls, items: Iterable[bytes], universe: Iterable[bytes],
                  fp_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> BloomFilter:
        """A filter holding ``items`` that reports no false positive for any other member of
        ``universe`` (the candidates readers will test), or the largest filter if none fits.

        Witnesses know the candidates (the round's trainers, the commitments they heard
        of), and every witness holding the same set builds the same filter: a plain
        1 % false positive would then be shared by all of them and counted as a quorum.
        The filter starts at ``fp_rate`` and doubles until no outsider tests positive.
        """
        items = list(dict.fromkeys(items))
        outsiders = [u for u in dict.fromkeys(universe) if u not in set(items)]
        rate = fp_rate
        while True:
            f = cls.for_items(items, rate)
            if not any(u in f for u in outsiders) or f.m >= 8 * MAX_BLOOM_BYTES:
                return f
            rate /= 4

    def add(self, item: bytes) -> None:
        """Insert ``item``."""
        for p in _positions(item, self.m, self.k):
            self.bits |= 1 << p

    def __contains__(self, item: bytes) -> bool:
        """False means certainly absent; True means present or a false positive."""
        bits = self.bits
        return all((bits >> p) & 1 for p in _positions(item, self.m, self.k))

    def to_bytes(self) -> bytes:
        """The compact wire form (see the module docstring)."""
        return bytes([self.k]) + self.m.to_bytes(4, "little") + self.bits.to_bytes((self.m + 7) // 8, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> BloomFilter:
        """Parse the wire form; raises ``ValueError`` naming what is malformed."""
        if len(data) < 6:
            raise ValueError(f"bloom filter too short ({len(data)} bytes)")
        k, m = data[0], int.from_bytes(data[1:5], "little")
        f = cls(m, k)
        body = data[5:]
        if len(body) != (m + 7) // 8:
            raise ValueError(f"bloom filter of {m} bits needs {(m + 7) // 8} bytes of bits, got {len(body)}")
        bits = int.from_bytes(body, "little")
        if bits >> m:
            raise ValueError("bloom filter has bits set beyond its size")
        f.bits = bits
        return f

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BloomFilter) and (self.m, self.k, self.bits) == (other.m, other.k, other.bits)

    def __repr__(self) -> str:
        return f"BloomFilter(m={self.m}, k={self.k}, set={bin(self.bits).count('1')})"


def count_members(filters: Sequence[BloomFilter], items: Iterable[bytes]) -> dict[bytes, int]:
    """For each of ``items``, how many of ``filters`` contain it: what ``sum(x in f for f in
    filters)`` gives, at one sha256 per item and constant-time bit tests, each distinct filter
    tested once (a round's close asks this of every trainer against every witness's filter).

    >>> a, b = BloomFilter.for_items([b"x", b"y"]), BloomFilter.for_items([b"x"])
    >>> count_members([a, b], [b"x", b"y"])
    {b'x': 2, b'y': 1}
    """
    # Witnesses that saw the same results send the same filter: test each distinct one once.
    distinct: dict[tuple[int, int, int], int] = {}
    for f in filters:
        distinct[(f.m, f.k, f.bits)] = distinct.get((f.m, f.k, f.bits), 0) + 1
    bodies = [(m, k, bits.to_bytes((m + 7) // 8, "little"), n) for (m, k, bits), n in distinct.items()]
    out: dict[bytes, int] = {}
    for item in items:
        h = _hashes(item)
        out[item] = sum(n for m, k, body, n in bodies if all(body[p >> 3] >> (p & 7) & 1 for p in _probes(h, m, k)))
    return out
