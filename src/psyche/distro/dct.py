"""Chunked orthonormal DCT-II: a tensor ⇄ a grid of equally sized DCT tiles.

How a tensor is cut (the same rule on every peer, so tiles line up):

- each dimension ``d`` is cut into chunks of ``largest_divisor_at_most(d, chunk)``
  (for a prime ``d > chunk`` that is 1: tiles of size 1, which the codec keeps whole);
- a 1-D tensor (or a 0-D one, seen as length 1) uses 1-D chunks;
- a 2-D tensor uses ``h × w`` tiles with the DCT on both axes; a tensor with more
  dimensions is first flattened to 2-D on its trailing dimension, ``(prod(lead), last)``.

Every tile of one tensor has the same size, so the coefficients of a whole tensor
are one ``(T, n)`` matrix: ``T`` tiles, ``n = h·w`` coefficients each, in row-major
order inside the tile. The transforms are batched matmuls over all tiles at once
with DCT matrices computed once per size. Everything here is pure and
deterministic on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (1 when ``n`` is a prime above it).

    Both must be positive; raises ``ValueError`` otherwise.
    """
    if n < 1 or limit < 1:
        raise ValueError(f"need n >= 1 and limit >= 1, got n={n}, limit={limit}")
    if limit >= n:
        return n
    # Divisors pair up as d * e = n around sqrt(n), so at most about 2·sqrt(n) candidates are
    # tried whatever ``limit`` is (a peer's header chooses both: counting down from a limit
    # just under a large prime would take as many steps as the prime).
    root = math.isqrt(n)
    if limit > root:
        # A divisor d in (root, limit] is n // e for e = n // d in [ceil(n / limit), root]:
        # the smallest such e gives the largest d.
        for e in range(-(-n // limit), root + 1):
            if n % e == 0:
                return n // e
        limit = root
    for d in range(limit, 0, -1):
        if n % d == 0:
            return d
    return 1  # unreachable: 1 divides everything


@dataclass(frozen=True)
class TileGrid:
    """How one tensor shape is cut into DCT tiles.

    ``matrix`` is the 1-D ``(n,)`` or 2-D ``(R, C)`` view the tensor is handled as;
    ``tile`` is ``(h,)`` or ``(h, w)``.
    """

    shape: tuple[int, ...]
    matrix: tuple[int, ...]
    tile: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        """How many tiles cover the tensor."""
        return math.prod(m // t for m, t in zip(self.matrix, self.tile))

    @property
    def tile_numel(self) -> int:
        """Coefficients per tile (``h`` or ``h·w``)."""
        return math.prod(self.tile)

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.matrix)


def tile_grid(shape: tuple[int, ...] | torch.Size, chunk: int) -> TileGrid:
    """The tiling of a tensor of ``shape`` for a target ``chunk``; ``ValueError`` for empty shapes."""
    shape = tuple(int(d) for d in shape)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if any(d < 1 for d in shape):
        raise ValueError(f"cannot tile an empty tensor of shape {shape}")
    if len(shape) <= 1:
        matrix: tuple[int, ...] = (shape[0] if shape else 1,)
    else:
        matrix = (math.prod(shape[:-1]), shape[-1])
    tile = tuple(largest_divisor_at_most(d, chunk) for d in matrix)
    return TileGrid(shape=shape, matrix=matrix, tile=tile)


@lru_cache(maxsize=64)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    # Computed in float64 then rounded once, so every peer holds the same bits.
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(torch.float32)


_device_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def dct_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (float32, ``n × n``): ``coeffs = D @ x``, ``x = D.T @ coeffs``."""
    device = torch.device(device)
    if device.type == "cpu":
        return _dct_matrix_cpu(n)
    key = (n, device)
    if key not in _device_cache:
        _device_cache[key] = _dct_matrix_cpu(n).to(device)
    return _device_cache[key]


def forward(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """DCT coefficients of ``x`` tile by tile, as float32 ``(T, n)``.

    ``x`` must have ``grid.shape``; it is computed in float32 whatever its dtype.
    """
    x = x.detach().to(torch.float32).reshape(grid.matrix)
    if len(grid.tile) == 1:
        (h,) = grid.tile
        d = dct_matrix(h, x.device)
        return x.reshape(-1, h) @ d.T  # (T, h)
    (r, c), (h, w) = grid.matrix, grid.tile
    dh, dw = dct_matrix(h, x.device), dct_matrix(w, x.device)
    y = x.reshape(r, c // w, w) @ dw.T  # (R, C/w, w): DCT along the columns of each tile
    y = y.reshape(r // h, h, c) # (R/h, h, C)
    y = torch.matmul(dh, y)  # (R/h, h, C): DCT along the rows
    y = y.reshape(r // h, h, c // w, w).permute(0, 2, 1, 3)  # (R/h, C/w, h, w)
    return y.reshape(-1, h * w)  # (T, h·w)


def inverse(coeffs: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """The tensor (float32, ``grid.shape``) whose tile coefficients are ``coeffs`` ``(T, n)``."""
    coeffs = coeffs.to(torch.float32)
    if len(grid.tile) == 1:
        (h,) = grid.tile
        d = dct_matrix(h, coeffs.device)
        return (coeffs.reshape(-1, h) @ d).reshape(grid.shape)
    (r, c), (h, w) = grid.matrix, grid.tile
    dh, dw = dct_matrix(h, coeffs.device), dct_matrix(w, coeffs.device)
    y = coeffs.reshape(r // h, c // w, h, w).permute(0, 2, 1, 3)  # (R/h, h, C/w, w)
    y = torch.matmul(dh.T, y.reshape(r // h, h, c))  # (R/h, h, C): inverse along rows
    y = y.reshape(r, c // w, w) @ dw  # (R, C/w, w): inverse along columns
    return y.reshape(grid.shape)
