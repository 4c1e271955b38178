"""DisTrO codec: chunking, DCT, top-k, index packing and the wire form (property tests)."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psyche.distro import DCTCodec, SparseResult, dct, indexcode
from psyche.distro.codec import kept_per_tile

# Tiny tensors: intra-op threads only add barrier waits on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(min_value=1, max_value=150)
shapes = st.one_of(
    st.tuples(dims),
    st.tuples(dims, dims),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40)),
)


def ref_dct_matrix(n):
    """Orthonormal DCT-II from the textbook formula, float64, written independently of the package."""
    out = np.zeros((n, n))
    for k in range(n):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        for i in range(n):
            out[k, i] = scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return out


def ref_tiles(x, chunk):
    """(tile slices, h, w) of x viewed as 1-D or 2-D, by the chunking rule in the issue."""
    if x.ndim <= 1:
        m = x.reshape(-1, 1).T  # (1, n): a 1-D tensor is one row of 1-D chunks
        h, w = 1, dct.largest_divisor_at_most(m.shape[1], chunk)
    else:
        m = x.reshape(-1, x.shape[-1])
        h = dct.largest_divisor_at_most(m.shape[0], chunk)
        w = dct.largest_divisor_at_most(m.shape[1], chunk)
    return m, h, w


def ref_filtered(x, chunk, kept):
    """Inverse DCT of the DCT of x keeping, per tile (row-major order), the positions in ``kept``."""
    m, h, w = ref_tiles(x.astype(np.float64), chunk)
    dh, dw = ref_dct_matrix(h), ref_dct_matrix(w)
    out = np.zeros_like(m)
    coeffs_all = []
    tile = 0
    for a in range(0, m.shape[0], h):
        for b in range(0, m.shape[1], w):
            c = dh @ m[a : a + h, b : b + w] @ dw.T
            coeffs_all.append(c.reshape(-1))
            mask = np.zeros(h * w, dtype=bool)
            mask[kept[tile]] = True
            out[a : a + h, b : b + w] = dh.T @ np.where(mask.reshape(h, w), c, 0.0) @ dw
            tile += 1
    return out.reshape(x.shape), np.array(coeffs_all)


@pytest.mark.parametrize(("n", "limit", "want"), [(12, 5, 4), (100, 26, 25), (97, 64, 1), (64, 64, 64), (1, 64, 1), (3, 64, 3)])
def test_largest_divisor(n, limit, want):
    assert dct.largest_divisor_at_most(n, limit) == want


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 70), topk=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_decode_of_one_result_is_filtered_idct(shape, chunk, topk, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    codec = DCTCodec(chunk)
    r = codec.encode(x, topk)
    got = codec.decode([r], shape)
    want, coeffs = ref_filtered(x.numpy(), chunk, r.indices.numpy())
    assert got.shape == x.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)
    # The kept positions really are a top-k by magnitude (up to float ties).
    n = coeffs.shape[1]
    k = kept_per_tile(r.grid, chunk, topk)
    assert r.indices.shape == (coeffs.shape[0], k)
    assert (np.diff(r.indices.numpy(), axis=1) > 0).all()
    mags = np.abs(coeffs)
    kept = np.zeros_like(mags, dtype=bool)
    np.put_along_axis(kept, r.indices.numpy(), True, axis=1)
    if k < n:
        assert (mags[kept].reshape(-1, k).min(1) >= np.where(kept, -np.inf, mags).max(1) - 1e-5).all()


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_keeping_everything_reconstructs(shape, chunk, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    codec = DCTCodec(chunk)
    r = codec.encode(x, topk=10**6)  # topk larger than any tile: keep all
    assert r.indices.shape[1] == r.grid.tile_numel
    torch.testing.assert_close(codec.decode([r], shape), x, atol=2e-5, rtol=1e-4)


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 70), topk=st.integers(1, 80))
def test_smaller_tiles_keep_the_density_of_a_full_one(shape, chunk, topk):
    grid = dct.tile_grid(shape, chunk)
    n, k = grid.tile_numel, kept_per_tile(grid, chunk, topk)
    assert 1 <= k <= n
    if len(grid.tile) == 1 or n == chunk * chunk:
        assert k == min(topk, n)  # 1-D tiles and full tiles keep topk
    else:
        # Within half a coefficient of topk per chunk² (unless held up by the floor of one, or the tile).
        assert abs(k - topk * n / chunk**2) <= 0.5 or k == 1 or k == n


def test_a_dimension_the_chunk_does_not_divide_costs_about_the_same_per_parameter():
    # 352 = 8 · 44: 44 × 64 tiles. Keeping 8 in each sent 45 % more per parameter than 64 × 64 tiles.
    full = DCTCodec(64).encode(torch.randn(384, 128), 8, one_bit=True)
    cut = DCTCodec(64).encode(torch.randn(352, 128), 8, one_bit=True)
    assert cut.grid.tile == (44, 64) and cut.indices.shape == (16, 6)
    assert len(cut.body()) / (352 * 128) < 1.1 * len(full.body()) / (384 * 128)  # (6 of 2,816 is 9 % denser)


def test_prime_dims_use_size_one_tiles():
    codec = DCTCodec(64)
    x = torch.randn(67, 71)
    r = codec.encode(x, topk=8)
    assert r.grid.tile == (1, 1) and r.indices.shape == (67 * 71, 1)
    torch.testing.assert_close(codec.decode([r], x.shape), x)


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 70), topk=st.integers(1, 80), one_bit=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_bytes_round_trip(shape, chunk, topk, one_bit, dtype, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    r = DCTCodec(chunk).encode(x, topk, one_bit=one_bit)
    assert r.dtype == dtype and r.values.dtype == dtype
    blob = r.to_bytes()
    back = SparseResult.from_bytes(blob)
    assert (back.shape, back.dtype, back.chunk, back.topk, back.one_bit) == (r.shape, r.dtype, r.chunk, r.topk, r.one_bit)
    assert torch.equal(back.indices, r.indices)
    assert torch.equal(back.values, r.values)
    assert back.to_bytes() == blob
    if one_bit:
        assert set(back.values.float().unique().tolist()) <= {-1.0, 1.0}


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 70), topk=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_bf16_decode_matches_filtered_idct_of_rounded_values(shape, chunk, topk, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    codec = DCTCodec(chunk)
    r = codec.encode(x, topk)
    got = codec.decode([r], shape, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    full = codec.encode(x, 10**6)  # float32 coefficients of the bf16 input, all kept
    dense = torch.zeros(r.grid.num_tiles, r.grid.tile_numel)
    dense.scatter_(1, r.indices, r.values.float())
    want = dct.inverse(dense, r.grid).to(torch.bfloat16)
    torch.testing.assert_close(got, want)
    assert full.indices.shape[1] == r.grid.tile_numel


def two_overlapping_results():
    """Two hand-made results over one 8-coefficient tile: a chose 0 and 3, b chose 3 and 5."""
    shape = (8,)
    mk = lambda idx, val: SparseResult(shape, torch.float32, 8, 2, False, torch.tensor([idx]), torch.tensor([val]))
    return shape, dct.tile_grid(shape, 8), mk([0, 3], [2.0, 4.0]), mk([3, 5], [8.0, -1.0])


def test_decode_is_mean_per_coefficient_over_results_that_chose_it():
    shape, grid, a, b = two_overlapping_results()
    got = DCTCodec(8).decode([a, b], shape)
    coeffs = torch.zeros(1, 8)
    coeffs[0, 0], coeffs[0, 3], coeffs[0, 5] = 2.0, 6.0, -1.0  # 3 chosen twice: mean; 0 and 5 once
    torch.testing.assert_close(got, dct.inverse(coeffs, grid))


def plain_mean_decode(results, shape, chunk):
    """The unweighted decode as it was before ``weights`` existed, written out as the oracle."""
    grid = dct.tile_grid(shape, chunk)
    sums = torch.zeros(grid.num_tiles, grid.tile_numel)
    counts = torch.zeros_like(sums)
    for r in results:
        sums.scatter_add_(1, r.indices, r.values.float())
        counts.scatter_add_(1, r.indices, torch.ones_like(r.indices, dtype=torch.float32))
    return dct.inverse(sums / counts.clamp_min(1.0), grid)


@SETTINGS
@given(shape=shapes, chunk=st.integers(1, 16), topk=st.integers(1, 6), peers=st.integers(1, 4),
       one_bit=st.booleans(), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_decode_without_or_with_equal_weights_is_the_plain_mean_bit_for_bit(shape, chunk, topk, peers, one_bit,
                                                                             seed, scale):
    """Equal weights of any scale are bit-identical to None (vote_weights scales them to exactly 1.0)."""
    g = torch.Generator().manual_seed(seed)
    codec = DCTCodec(chunk)
    results = [codec.encode(torch.randn(shape, generator=g), topk, one_bit=one_bit) for _ in range(peers)]
    want = plain_mean_decode(results, shape, chunk)
    assert torch.equal(codec.decode(results, shape), want)
    assert torch.equal(codec.decode(results, shape, weights=None), want)
    assert torch.equal(codec.decode(results, shape, weights=[scale] * peers), want)


def test_decode_with_weights_is_the_weighted_mean_over_results_that_chose_it():
    shape, grid, a, b = two_overlapping_results()
    got = DCTCodec(8).decode([a, b], shape, weights=[6, 2])  # only the ratio 3:1 matters
    coeffs = torch.zeros(1, 8)
    # 3 chosen by both: (3·4 + 1·8) / 4; 0 and 5 chosen by one result keep its value, however light.
    coeffs[0, 0], coeffs[0, 3], coeffs[0, 5] = 2.0, 5.0, -1.0
    torch.testing.assert_close(got, dct.inverse(coeffs, grid))


@pytest.mark.parametrize(("weights", "message"), [
    ([1.0], r"need one per result \(2\), got 1"),
    ([1.0, 0.0], r"weights\[1\] is 0.0; every weight must be finite and > 0"),
    ([-1.0, 1.0], r"weights\[0\] is -1.0"),
    ([1.0, math.nan], r"weights\[1\] is nan"),
    ([math.inf, 1.0], r"weights\[0\] is inf"),
    ([1e20, 1e-20], r"weights span 1e\+40x; the smallest must be at least 1e-30 of the largest"),
])
def test_decode_rejects_bad_weights_naming_the_rule(weights, message):
    r = DCTCodec(8).encode(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match=message):
        DCTCodec(8).decode([r, r], (8, 8), weights=weights)


def test_decode_rejects_mismatched_shape_and_chunk():
    r = DCTCodec(64).encode(torch.randn(64, 64), 8)
    with pytest.raises(ValueError, match="shape"):
        DCTCodec(64).decode([r], (32, 128))
    with pytest.raises(ValueError, match="chunk"):
        DCTCodec(32).decode([r], (64, 64))


def test_default_setting_beats_three_thousandths_of_a_byte_per_param():
    x = torch.randn(1024, 512)
    blob = DCTCodec(64).encode(x, topk=8, one_bit=True).to_bytes()
    # 81 index bits + 8 sign bits per 4096-coefficient tile (Psyche: 8·16 + 8).
    assert len(blob) / x.numel() < 0.00275


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 2), (7, 3), (9, 9), (10, 4), (12, 11)])
def test_index_code_is_exact_over_every_subset(n, k):
    subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
    blob = indexcode.pack(subsets, n)
    assert len(blob) == indexcode.packed_size(len(subsets), n, k)
    assert indexcode.bits_per_tile(n, k) == (math.comb(n, k) - 1).bit_length()
    np.testing.assert_array_equal(indexcode.unpack(blob, len(subsets), n, k), subsets)


@SETTINGS
@given(n=st.sampled_from([64, 100, 4096, 5000, 300_000]), k=st.integers(1, 40), t=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_index_code_round_trips_random_subsets(n, k, t, seed):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    pos = np.sort(np.stack([rng.choice(n, k, replace=False) for _ in range(t)]), axis=1)
    np.testing.assert_array_equal(indexcode.unpack(indexcode.pack(pos, n), t, n, k), pos)


def test_index_code_rejects_rank_out_of_range():
    # C(7, 3) = 35 subsets fit in 6 bits; the code 63 names none of them.
    with pytest.raises(ValueError, match="out of range"):
        indexcode.unpack(bytes([63]), 1, 7, 3)
    with pytest.raises(ValueError, match="padding"):
        indexcode.unpack(bytes([0b1000_0000]), 1, 7, 3)


def _valid_blobs():
    out = []
    for shape, one_bit, dtype in [((64, 64), True, torch.float32), ((130,), False, torch.float32),
                                  ((6, 10, 7), False, torch.bfloat16), ((3,), True, torch.float16)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        out.append(DCTCodec(8).encode(x, 3, one_bit=one_bit).to_bytes())
    return out


VALID = _valid_blobs()


def _parse_or_value_error(blob):
    try:
        r = SparseResult.from_bytes(blob)
    except ValueError as exc:
        assert str(exc)  # says what is wrong
        return None
    assert r.to_bytes() == bytes(blob)  # anything accepted is canonical
    return r


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_only_raise_value_error(blob):
    _parse_or_value_error(blob)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(VALID) - 1), data=st.data())
def test_mutated_blobs_only_raise_value_error(which, data):
    blob = bytearray(VALID[which])
    action = data.draw(st.sampled_from(["flip", "truncate", "extend", "header"]))
    if action == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif action == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(0, min(8, len(blob) - 1)))
        blob[i] = data.draw(st.integers(0, 255))
    _parse_or_value_error(bytes(blob))


@pytest.mark.parametrize(("blob", "message"), [
    (b"", "too short"),
    (bytes([9, 0, 1]), "version"),
    (bytes([2, 4, 1]), "flag"),
    (bytes([2, 0, 7]), "dtype"),
    (bytes([2, 0, 1, 0x80]), "truncated"),
    (bytes([2, 0, 1, 8, 3, 1, 0]), "dim 0"),
    (VALID[0][:-1], "expected"),
])
def test_malformed_bytes_name_the_problem(blob, message):
    with pytest.raises(ValueError, match=message):
        SparseResult.from_bytes(blob)


def test_non_finite_values_rejected():
    r = DCTCodec(8).encode(torch.randn(16), 2)
    bad = SparseResult(r.shape, r.dtype, r.chunk, r.topk, False, r.indices, torch.full_like(r.values, float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        SparseResult.from_bytes(bad.to_bytes())
