"""The DisTrO codec: tensor ⇄ top-k of its chunked DCT (:class:`SparseResult`) ⇄ bytes.

``DCTCodec(chunk).encode(t, topk)`` keeps, in every DCT tile of ``t`` (see
:mod:`psyche.distro.dct`), the coefficients of largest magnitude: ``topk`` of a
full ``chunk × chunk`` tile, and of a smaller 2-D tile (a dimension ``chunk`` does
not divide) as many as keep the same density, at least one (:func:`kept_per_tile`);
a 1-D tile keeps ``topk`` (all of them when it is smaller). ``decode(results, shape)`` scatters every
result's coefficients back into the tile grid, averages each coefficient over
the results that chose it, and applies the inverse DCT. ``decode(..., weights=w)``
makes that a weighted mean (result ``i`` counts ``w[i]`` times; :func:`vote_weights`
is the rule ``w`` must follow).

Wire form of one result (``SparseResult.to_bytes``), version 2::

    u8 version (=2) | u8 flags (bit 0: one_bit) | u8 dtype (1 f32, 2 bf16, 3 f16)
    uvarint chunk | uvarint topk | uvarint ndim | uvarint dim × ndim
    body (SparseResult.body, whose size the header fixes: ResultLayout.body_size):
    index block  : every tile's sorted kept positions, ceil(log2 C(n, k)) bits a tile
                   (:mod:`psyche.distro.indexcode`), zero-padded to a byte
    value block  : one_bit → one sign bit per kept coefficient (1 = negative), zero-padded;
                   else the values, little-endian, in the recorded dtype

(Version 1 kept ``min(topk, n)`` in every tile whatever its size.) A receiver that
already knows a result's :class:`ResultLayout` reads the body alone
(:meth:`SparseResult.from_body`): a peer's payload sends no headers
(:mod:`psyche.distro.payload`).

``from_bytes`` accepts exactly the bytes ``to_bytes`` produces (the encoding is
canonical) and raises ``ValueError`` naming the problem for anything else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from psyche.distro import dct, indexcode

WIRE_VERSION = 2
_FLAG_ONE_BIT = 0x01
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_NUMPY_VIEW = {torch.float32: "<f4", torch.bfloat16: "<i2", torch.float16: "<f2"}
_MAX_NDIM = 8
_MAX_NUMEL = 1 << 40  # sanity bound on a header's claimed tensor size
_MIN_VOTE = 1e-30  # smallest weight / largest in a weighted decode (float32's normal range ends at 1.2e-38)


def kept_per_tile(grid: dct.TileGrid, chunk: int, topk: int) -> int:
    """Coefficients a result keeps in each tile of ``grid`` (cut with ``chunk``) for ``topk``.

    A 1-D tile keeps ``min(topk, n)``. A 2-D tile keeps ``topk`` per ``chunk × chunk``
    coefficients, rounded half up, at least 1 and at most the tile: a tensor whose
    dimensions ``chunk`` does not divide is cut into smaller tiles, and keeping ``topk``
    in each would send more per parameter than the rest of the model (a 352-wide MLP
    in 44 × 64 tiles, 45 % more).

    >>> kept_per_tile(dct.tile_grid((128, 128), 64), 64, 8), kept_per_tile(dct.tile_grid((352, 128), 64), 64, 8)
    (8, 6)
    """
    n = grid.tile_numel
    if len(grid.tile) == 1:
        return min(topk, n)
    full = chunk * chunk
    return max(1, min(n, (2 * topk * n + full) // (2 * full)))


@dataclass(frozen=True)
class ResultLayout:
    """What fixes the form of one parameter's result: everything but its coefficients.

    Every peer of a run derives the same layouts from the model and the optimizer
    (:meth:`psyche.distro.DisTrO.result_layouts`), so a payload need not carry them.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunk: int
    topk: int
    one_bit: bool

    # Cached: a payload is read with the same layouts every step, and each is asked for
    # its tiling and sizes several times per result.
    @functools.cached_property
    def grid(self) -> dct.TileGrid:
        """The tiling the coefficients live in."""
        return dct.tile_grid(self.shape, self.chunk)

    @functools.cached_property
    def kept(self) -> int:
        """Coefficients kept per tile (:func:`kept_per_tile`)."""
        return kept_per_tile(self.grid, self.chunk, self.topk)

    @functools.cached_property
    def index_size(self) -> int:
        """Bytes of the body's index block."""
        return indexcode.packed_size(self.grid.num_tiles, self.grid.tile_numel, self.kept)

    def header(self) -> bytes:
        """The header of :meth:`SparseResult.to_bytes` for a result of this layout."""
        out = bytearray([WIRE_VERSION, _FLAG_ONE_BIT if self.one_bit else 0, _DTYPE_CODES[self.dtype]])
        for v in (self.chunk, self.topk, len(self.shape), *self.shape):
            _put_uvarint(out, v)
        return bytes(out)

    @functools.cached_property
    def body_size(self) -> int:
        """Bytes of :meth:`SparseResult.body` for this layout."""
        values = self.grid.num_tiles * self.kept
        return self.index_size + ((values + 7) // 8 if self.one_bit else values * self.dtype.itemsize)


@dataclass(frozen=True, eq=False)
class SparseResult:
    """One tensor's top-k DCT coefficients, as sent by one peer.

    ``indices`` ``(T, k)`` int64: positions inside each tile, strictly increasing per
    row; ``values`` ``(T, k)`` in ``dtype``: the coefficients (``±1`` when
    ``one_bit``). ``k`` is :func:`kept_per_tile`; ``T`` and the tile size follow from
    ``shape`` and ``chunk`` (:func:`psyche.distro.dct.tile_grid`).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunk: int
    topk: int
    one_bit: bool
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def grid(self) -> dct.TileGrid:
        """The tiling this result's coefficients live in."""
        return dct.tile_grid(self.shape, self.chunk)

    def to_one_bit(self) -> SparseResult:
        """The same coefficients with only their signs kept (``+0.0`` → ``+1``, ``-0.0`` → ``-1``)."""
        signs = torch.where(torch.signbit(self.values), -1.0, 1.0).to(self.dtype)
        return SparseResult(self.shape, self.dtype, self.chunk, self.topk, True, self.indices, signs)

    @property
    def layout(self) -> ResultLayout:
        """Everything of this result but its coefficients."""
        return ResultLayout(self.shape, self.dtype, self.chunk, self.topk, self.one_bit)

    def to_bytes(self) -> bytes:
        """The canonical wire form: a header, then :meth:`body` (see the module docstring)."""
        return self.layout.header() + self.body()

    def body(self) -> bytes:
        """The coefficients alone (index block, value block): :attr:`layout` says how to read them back."""
        grid = self.grid
        idx = self.indices.detach().cpu().numpy()
        index_block = indexcode.pack(idx, grid.tile_numel)
        vals = self.values.detach().cpu()
        if self.one_bit:
            bits = torch.signbit(vals).numpy().reshape(-1).astype(np.uint8)
            value_block = np.packbits(bits, bitorder="little").tobytes()
        else:
            vals = vals.to(self.dtype).contiguous()
            if self.dtype == torch.bfloat16:
                vals = vals.view(torch.int16)
            value_block = vals.numpy().astype(_NUMPY_VIEW[self.dtype], copy=False).tobytes()
        return index_block + value_block

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SparseResult:
        """Parse :meth:`to_bytes` output; ``ValueError`` saying what is wrong for anything else."""
        view = memoryview(bytes(data))
        header = read_header(view)
        return cls.from_body(view[header.size:], header.layout)

    @classmethod
    def from_body(cls, data: bytes | bytearray | memoryview, layout: ResultLayout) -> SparseResult:
        """Parse :meth:`body` output of a result of ``layout``; ``ValueError`` saying what is
        wrong for anything else (a size other than ``layout.body_size`` included)."""
        try:
            return _parse_body(memoryview(bytes(data)), layout)
        except ValueError:
            raise
        except Exception as exc:  # a bug-shaped failure on hostile bytes is still bad input
            raise ValueError(f"malformed SparseResult: {type(exc).__name__}: {exc}") from exc


def _put_uvarint(buf: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"cannot encode negative {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            buf.append(byte | 0x80)
        else:
            buf.append(byte)
            return


def _get_uvarint(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise ValueError(f"truncated header: {what} runs past the end")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ValueError(f"non-canonical varint for {what}")
            return value, pos + i + 1
    raise ValueError(f"varint for {what} is longer than 10 bytes")


@dataclass(frozen=True)
class ResultHeader:
    """What the header of a result's wire form says, read without looking at its body."""

    layout: ResultLayout
    size: int
    """Bytes of the header: the body starts there."""


def read_header(data: bytes | bytearray | memoryview) -> ResultHeader:
    """The header of :meth:`SparseResult.to_bytes` output; ``ValueError`` naming what is malformed.

    Cheap whatever the bytes claim (it allocates nothing by the claimed size), so a
    receiver can compare the shape, chunk and topk with the ones it expects before
    the body is decoded: tiling a hostile shape or building the index table of a
    hostile ``(chunk, topk)`` is what costs (see :func:`psyche.distro.payload.decode_payload`).
    """
    data = memoryview(data)
    if len(data) < 3:
        raise ValueError(f"SparseResult too short: {len(data)} bytes")
    version, flags, code = data[0], data[1], data[2]
    if version != WIRE_VERSION:
        raise ValueError(f"unsupported SparseResult version {version} (this build reads {WIRE_VERSION})")
    if flags & ~_FLAG_ONE_BIT:
        raise ValueError(f"unknown flag bits 0x{flags:02x}")
    if code not in _CODE_DTYPES:
        raise ValueError(f"unknown dtype code {code}")
    pos = 3
    chunk, pos = _get_uvarint(data, pos, "chunk")
    topk, pos = _get_uvarint(data, pos, "topk")
    ndim, pos = _get_uvarint(data, pos, "ndim")
    if chunk < 1 or topk < 1:
        raise ValueError(f"chunk and topk must be >= 1, got chunk={chunk}, topk={topk}")
    if ndim > _MAX_NDIM:
        raise ValueError(f"ndim {ndim} exceeds {_MAX_NDIM}")
    shape: list[int] = []
    for i in range(ndim):
        d, pos = _get_uvarint(data, pos, f"dim {i}")
        if d < 1:
            raise ValueError(f"dim {i} is {d}; empty tensors are not sent")
        shape.append(d)
        if math.prod(shape) > _MAX_NUMEL:
            raise ValueError(f"shape {shape} exceeds {_MAX_NUMEL} elements")
    layout = ResultLayout(tuple(shape), _CODE_DTYPES[code], chunk, topk, bool(flags & _FLAG_ONE_BIT))
    return ResultHeader(layout, pos)


def _parse_body(data: memoryview, layout: ResultLayout) -> SparseResult:
    shape, dtype, chunk, topk, one_bit = layout.shape, layout.dtype, layout.chunk, layout.topk, layout.one_bit
    grid = layout.grid
    n, t, k, index_size = grid.tile_numel, grid.num_tiles, layout.kept, layout.index_size
    if len(data) != layout.body_size:
        raise ValueError(f"body is {len(data)} bytes, expected {layout.body_size} "
                         f"for shape {shape}, chunk {chunk}, topk {topk}")
    positions = indexcode.unpack(data[:index_size], t, n, k)
    raw = np.frombuffer(data[index_size:], dtype=np.uint8)
    if one_bit:
        bits = np.unpackbits(raw, bitorder="little")
        if bits[t * k :].any():
            raise ValueError("non-zero padding bits after the sign bits")
        values = torch.from_numpy(1.0 - 2.0 * bits[: t * k].astype(np.float32)).to(dtype)
    else:
        arr = raw.view(_NUMPY_VIEW[dtype]).astype(_NUMPY_VIEW[dtype][1:], copy=True)
        values = torch.from_numpy(arr)
        if dtype == torch.bfloat16:
            values = values.view(torch.bfloat16)
        if not torch.isfinite(values).all():
            raise ValueError("non-finite coefficient value")
    return SparseResult(
        shape=shape, dtype=dtype, chunk=chunk, topk=topk, one_bit=one_bit,
        indices=torch.from_numpy(positions), values=values.reshape(t, k),
    )


def vote_weights(weights: Sequence[float] | None, peers: int) -> list[float]:
    """Each of ``peers`` results' vote in a weighted :meth:`DCTCodec.decode`, scaled so the largest is 1.0.

    ``None`` gives every result the vote 1.0 (the plain mean). Otherwise ``weights``
    must hold one finite number > 0 per result, none below ``1e-30`` of the largest,
    else ``ValueError`` naming the rule broken; only their ratios matter. Deterministic: the same weights give the same
    floats. Dividing by the largest rather than by the sum keeps equal weights at
    exactly 1.0, so they decode bit-identically to ``None``.

    >>> vote_weights([5, 5, 2], 3)
    [1.0, 1.0, 0.4]
    >>> vote_weights(None, 2)
    [1.0, 1.0]
    """
    if weights is None:
        return [1.0] * peers
    ws = [float(w) for w in weights]
    if len(ws) != peers:
        raise ValueError(f"weights: need one per result ({peers}), got {len(ws)}")
    for i, w in enumerate(ws):
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"weights[{i}] is {w}; every weight must be finite and > 0")
    top = max(ws, default=1.0)
    votes = [w / top for w in ws]
    # Votes are summed in float32; a far smaller one would vanish there (and a count of 0 is "unchosen").
    if votes and min(votes) < _MIN_VOTE:
        raise ValueError(f"weights span {top / min(ws):.3g}x; "
                         f"the smallest must be at least {_MIN_VOTE:g} of the largest")
    return votes


class DCTCodec:
    """Chunked-DCT top-k codec with a fixed target ``chunk`` (see the module docstring).

    >>> codec = DCTCodec(chunk=64)
    >>> r = codec.encode(torch.randn(256, 128), topk=8)
    >>> codec.decode([r], (256, 128)).shape
    torch.Size([256, 128])
    """

    def __init__(self, chunk: int = 64) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk

    def encode(self, t: torch.Tensor, topk: int, one_bit: bool = False) -> SparseResult:
        """Keep the largest-magnitude DCT coefficients of every tile of ``t``: ``topk`` of a
        ``chunk × chunk`` tile (:func:`kept_per_tile` for other tiles).

        Values are stored in ``t``'s dtype (float32, bfloat16 or float16), or only
        their signs when ``one_bit``. Deterministic for a given input on CPU.
        """
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot encode dtype {t.dtype}; use float32, bfloat16 or float16")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        grid = dct.tile_grid(t.shape, self.chunk)
        coeffs = dct.forward(t, grid)  # (T, n) float32
        k = kept_per_tile(grid, self.chunk, topk)
        if k == grid.tile_numel:
            idx = torch.arange(k, device=coeffs.device).expand(grid.num_tiles, k).contiguous()
        else:
            idx = coeffs.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (T, k)
        vals = coeffs.gather(1, idx).to(t.dtype)
        result = SparseResult(tuple(t.shape), t.dtype, self.chunk, topk, False, idx, vals)
        return result.to_one_bit() if one_bit else result

    def decode(
        self,
        results: list[SparseResult],
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype = torch.float32,
        *,
        weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """The inverse DCT of the per-coefficient mean over ``results`` (zeros for none).

        With ``weights`` the mean is weighted: a coefficient is
        ``Σ wᵢ·vᵢ / Σ wᵢ`` over the results ``i`` that chose it (:func:`vote_weights`
        checks and scales ``weights``; ``ValueError`` for a bad one). ``None`` and
        equal weights give the plain mean, bit for bit. Every result must describe
        a tensor of ``shape`` cut with this codec's chunk; ``ValueError`` otherwise.
        Results are summed in list order, so equal lists give bit-identical tensors.
        """
        votes = vote_weights(weights, len(results))
        shape = tuple(int(d) for d in shape)
        grid = dct.tile_grid(shape, self.chunk)
        for i, r in enumerate(results):
            if r.shape != shape:
                raise ValueError(f"result {i} is for shape {r.shape}, expected {shape}")
            if r.chunk != self.chunk:
                raise ValueError(f"result {i} uses chunk {r.chunk}, this codec {self.chunk}")
        if not results:
            return torch.zeros(shape, dtype=dtype)
        device = results[0].values.device
        sums = torch.zeros(grid.num_tiles, grid.tile_numel, device=device)
        counts = torch.zeros_like(sums)
        for r, vote in zip(results, votes):
            idx = r.indices.to(device)  # (T, k)
            values = r.values.to(device, torch.float32)
            if vote != 1.0:  # (× 1.0 would be exact too; skipping it spares a copy)
                values = values * vote
            sums.scatter_add_(1, idx, values)
            counts.scatter_add_(1, idx, torch.full_like(idx, vote, dtype=torch.float32))
        # (T, n): unchosen coefficients (count 0, sum 0) stay 0. A chosen one's count is a
        # sum of votes, so it is at least the smallest vote and the clamp leaves it alone
        # (for None the smallest vote is 1.0: the plain mean's own clamp).
        mean = sums / counts.clamp_min(min(votes))
        return dct.inverse(mean, grid).to(dtype)
