"""Swap-or-not shuffle: a seeded permutation where one element's position is cheap to check.

Each of ``ROUNDS`` rounds picks a pivot from the seed and pairs every index
``x`` with ``pivot - x (mod n)``; a seed-derived bit at the larger of the two
decides whether the pair swaps. The result is a permutation of ``range(n)``,
and the position of a single index costs ``2 * ROUNDS`` sha256 calls, so anyone
can verify a claimed committee role without shuffling the whole list (the
construction of Hoang, Morris and Rogaway, as used for committees by Ethereum
and the original Psyche).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

ROUNDS = 90
"""Swap-or-not rounds (the usual choice for committees)."""


def _round_key(seed: bytes, r: int) -> bytes:
    return seed + r.to_bytes(1, "little")


def _pivot(seed: bytes, r: int, count: int) -> int:
    return int.from_bytes(hashlib.sha256(_round_key(seed, r)).digest()[:8], "little") % count


def _bit(seed: bytes, r: int, position: int) -> int:
    source = hashlib.sha256(_round_key(seed, r) + (position // 256).to_bytes(4, "little")).digest()
    return (source[(position % 256) // 8] >> (position % 8)) & 1


def shuffled_position(index: int, count: int, seed: bytes) -> int:
    """Where ``index`` lands in the seeded permutation of ``range(count)``.

    >>> sorted(shuffled_position(i, 5, bytes(32)) for i in range(5))
    [0, 1, 2, 3, 4]
    """
    if not 0 <= index < count:
        raise ValueError(f"index {index} out of range for {count} elements")
    x = index
    for r in range(ROUNDS):
        flip = (_pivot(seed, r, count) + count - x) % count
        if _bit(seed, r, max(x, flip)):
            x = flip
    return x


@lru_cache(maxsize=64)
def shuffled_positions(count: int, seed: bytes) -> tuple[int, ...]:
    """``shuffled_position(i, count, seed)`` for every ``i``, computed in one pass.

    Each round's pivot and bit string are hashed once and shared by all indices,
    so the whole permutation costs about ``ROUNDS * (1 + count/256)`` hashes.
    """
    if count <= 0:
        return ()
    blocks = (count + 255) // 256
    xs = list(range(count))
    for r in range(ROUNDS):
        key = _round_key(seed, r)
        pivot = _pivot(seed, r, count)
        bits = int.from_bytes(
            b"".join(hashlib.sha256(key + b.to_bytes(4, "little")).digest() for b in range(blocks)), "little")
        for i, x in enumerate(xs):
            flip = (pivot + count - x) % count
            if (bits >> (x if x > flip else flip)) & 1:
                xs[i] = flip
    return tuple(xs)
