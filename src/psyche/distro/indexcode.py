"""Packing the kept positions of each DCT tile into the fewest bits.

A tile of ``n`` coefficients keeps ``k`` of them. Their positions, sorted, are one
of ``C(n, k)`` subsets, so ``ceil(log2 C(n, k))`` bits name them exactly: the
*combinatorial number system* ranks ``p_0 < p_1 < … < p_{k-1}`` as
``Σ_i C(p_i, i + 1)``. For a 64×64 tile and top-8 that is 81 bits per
tile (Psyche's u16 per index spends 128); for the default 32×32 tile and top-2, 19.

Ranks of real tiles are ~80-bit numbers, so they are held as little-endian limbs
of 32 bits in int64 numpy arrays and every step is vectorized over all tiles of a
tensor. When the binomial table would be too large (very large tiles or ``k``) a
plain fixed-width code of ``ceil(log2 n)`` bits per position is used instead; the
choice is a pure function of ``(n, k)``, so both sides agree without a flag.

The stream is ``T`` codes of ``bits_per_tile(n, k)`` bits, least significant bit
first, zero-padded to a whole byte. Decoding validates everything: an
out-of-range rank, unsorted or out-of-range positions, a wrong length or non-zero
padding raise ``ValueError``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_LIMB = 32
_MASK = (1 << _LIMB) - 1
# Above this many table limbs the fixed-width code is used: the table would cost
# more memory (and, for a hostile header, more work) than the bits it saves.
_MAX_TABLE_LIMBS = 1 << 22


def _combinatorial(n: int, k: int) -> bool:
    # An upper estimate of the limbs per entry from log2 C(n, j) <= n bits; the
    # lgamma form avoids building a huge integer just to decide.
    log2_max = max(_log2_comb(n, j) for j in {k, min(k, n // 2)})
    limbs = int(log2_max) // _LIMB + 2
    return n * (k + 1) * limbs <= _MAX_TABLE_LIMBS


def _log2_comb(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def bits_per_tile(n: int, k: int) -> int:
    """Bits that name ``k`` sorted positions among ``n`` (0 when all or none are kept)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k in (0, n):
        return 0
    if _combinatorial(n, k):
        return (math.comb(n, k) - 1).bit_length()
    return k * (n - 1).bit_length()


def packed_size(num_tiles: int, n: int, k: int) -> int:
    """Bytes of the packed positions of ``num_tiles`` tiles."""
    return (num_tiles * bits_per_tile(n, k) + 7) // 8


class _Table:
    """Binomials ``C(c, j)`` for ``c < n``, ``j <= k`` as limbs, plus float copies for search."""

    def __init__(self, n: int, k: int) -> None:
        top = max(math.comb(n, k), max(math.comb(n - 1, j) for j in range(k + 1)))
        self.limbs = max(1, (top.bit_length() + _LIMB - 1) // _LIMB)
        nbytes = 4 * self.limbs
        rows = []
        for j in range(k + 1):
            blob = b"".join(math.comb(c, j).to_bytes(nbytes, "little") for c in range(n))
            rows.append(np.frombuffer(blob, dtype="<u4").reshape(n, self.limbs))
        self.exact = np.stack(rows).astype(np.int64)  # (k+1, n, L)
        self.approx = np.stack([
            np.array([float(math.comb(c, j)) for c in range(n)], dtype=np.float64) for j in range(k + 1)
        ])  # (k+1, n)
        self.bound = _to_limbs(math.comb(n, k), self.limbs)  # (L,): ranks must be below this
        # When every value fits in 63 bits, one int64 per value allows an exact searchsorted.
        self.fits64 = top < (1 << 63)
        if self.fits64:
            weights = np.array([1 << (_LIMB * i) for i in range(self.limbs)], dtype=np.int64)
            self.exact64 = (self.exact * weights).sum(axis=2)  # (k+1, n)


@lru_cache(maxsize=32)
def _table(n: int, k: int) -> _Table:
    return _Table(n, k)


def _to_limbs(value: int, limbs: int) -> np.ndarray:
    return np.array([(value >> (_LIMB * i)) & _MASK for i in range(limbs)], dtype=np.int64)


def _less_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``a <= b`` for limb arrays ``(T, L)`` (``b`` may broadcast)."""
    # Lexicographic from the least significant limb up: a higher limb overrides.
    result = a[:, 0] <= b[..., 0]
    for i in range(1, a.shape[1]):
        x, y = a[:, i], b[..., i]
        result = (x < y) | ((x == y) & result)
    return result


def _carry(x: np.ndarray) -> np.ndarray:
    """Normalise limbs that may over- or underflow 32 bits (in place, returns ``x``)."""
    for i in range(x.shape[1] - 1):
        x[:, i + 1] += x[:, i] >> _LIMB  # arithmetic shift: a borrow is a negative carry
        x[:, i] &= _MASK
    return x


def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    """The low ``width`` bits of each row of uint32 limbs ``(T, L)`` as a bit matrix ``(T, width)``."""
    raw = np.ascontiguousarray(values.astype("<u4")).view(np.uint8)  # (T, 4L)
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :width]


def _from_bits(bits: np.ndarray, limbs: int) -> np.ndarray:
    """Inverse of :func:`_bits_of`: bit matrix ``(T, width)`` → int64 limbs ``(T, L)``."""
    padded = np.zeros((bits.shape[0], _LIMB * limbs), dtype=np.uint8)
    padded[:, : bits.shape[1]] = bits
    raw = np.packbits(padded, axis=1, bitorder="little")  # (T, 4L)
    return np.ascontiguousarray(raw).view("<u4").astype(np.int64)


def pack(positions: np.ndarray, n: int) -> bytes:
    """Pack ``positions`` ``(T, k)`` — each row strictly increasing, in ``[0, n)`` — into bytes.

    The caller guarantees the rows are valid (they come from a top-k); the output
    is canonical: equal inputs give equal bytes.
    """
    t, k = positions.shape
    width = bits_per_tile(n, k)
    if width == 0 or t == 0:
        return b""
    positions = positions.astype(np.int64, copy=False)
    if _combinatorial(n, k):
        table = _table(n, k)
        # rank = Σ_i C(p_i, i+1): gather (T, k, L) limbs, sum, carry.
        terms = table.exact[np.arange(1, k + 1)[None, :], positions]  # (T, k, L)
        codes = _carry(terms.sum(axis=1))  # (T, L)
        bits = _bits_of(codes, width)
    else:
        bits = _bits_of(positions.reshape(-1, 1), (n - 1).bit_length()).reshape(t, width)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes | memoryview, num_tiles: int, n: int, k: int) -> np.ndarray:
    """Positions ``(num_tiles, k)`` (int64, rows strictly increasing) from :func:`pack`'s bytes.

    Raises ``ValueError`` naming the problem for a wrong length, non-zero padding,
    a rank ``>= C(n, k)`` or invalid positions.
    """
    width = bits_per_tile(n, k)
    expected = packed_size(num_tiles, n, k)
    if len(data) != expected:
        raise ValueError(f"index block is {len(data)} bytes, expected {expected}")
    if k == n:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (num_tiles, n)).copy()
    if width == 0 or num_tiles == 0:
        return np.zeros((num_tiles, k), dtype=np.int64)
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if stream[num_tiles * width :].any():
        raise ValueError("non-zero padding bits after the index codes")
    bits = stream[: num_tiles * width].reshape(num_tiles, width)
    if not _combinatorial(n, k):
        positions = _from_bits(bits.reshape(-1, width // k), 1)[:, 0].reshape(num_tiles, k)
        if (positions >= n).any() or (np.diff(positions, axis=1) <= 0).any():
            raise ValueError("index positions out of range or not strictly increasing")
        return positions
    table = _table(n, k)
    codes = _from_bits(bits, table.limbs)  # (T, L)
    over = _less_equal(np.broadcast_to(table.bound, codes.shape), codes)  # C(n, k) <= code
    if over.any():
        raise ValueError(f"index code of tile {int(np.argmax(over))} is out of range for C({n}, {k})")
    return _unrank(codes, table, n, k)


def _unrank(codes: np.ndarray, table: _Table, n: int, k: int) -> np.ndarray:
    # Greedy: for j = k … 1 the position p_{j-1} is the largest c with C(c, j) <= rest.
    t = codes.shape[0]
    positions = np.empty((t, k), dtype=np.int64)
    if table.fits64:
        weights = np.array([1 << (_LIMB * i) for i in range(table.limbs)], dtype=np.int64)
        rest64 = codes @ weights  # (T,)
        for j in range(k, 0, -1):
            c = np.searchsorted(table.exact64[j], rest64, side="right") - 1
            positions[:, j - 1] = c
            rest64 = rest64 - table.exact64[j][c]
        return positions
    rest = codes.copy()
    scale = float(1 << _LIMB) ** np.arange(table.limbs)
    for j in range(k, 0, -1):
        exact = table.exact[j]  # (n, L)
        c = np.searchsorted(table.approx[j], rest.astype(np.float64) @ scale, side="right") - 1
        c = np.clip(c, j - 1, n - 1)
        # The float search can be off by one either way; fix it exactly.
        while True:
            up = (c + 1 <= n - 1) & _less_equal(exact[np.minimum(c + 1, n - 1)], rest)
            down = ~_less_equal(exact[c], rest)
            if not (up.any() or down.any()):
                break
            c = c + up - down
        positions[:, j - 1] = c
        rest = _carry(rest - exact[c])
    return positions
