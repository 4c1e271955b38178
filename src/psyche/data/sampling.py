"""Sample index → position in a token file: pure arithmetic, no I/O.

A token file of ``num_tokens`` tokens is cut into ``num_slots = (num_tokens - 1) // seq_len``
sequence slots; slot ``s`` starts at token ``s * seq_len`` and a sample reads
``seq_len + 1`` tokens from there (inputs plus the shifted targets), so neighbouring
slots share one token and no token is wasted.

Sample index ``i`` belongs to epoch ``i // num_slots`` and is mapped onto a slot by a
keyed permutation of ``range(num_slots)`` (a Feistel network with cycle walking, keyed
by ``(shuffle_seed, epoch)``). Consecutive indices therefore land on unrelated text,
each epoch visits every slot exactly once in its own order, and the mapping is a few
integer operations per index: the same on every machine, in any language, with no
permutation table held in memory. An HTTP or data-server provider reuses it unchanged.
"""

from __future__ import annotations

from psyche.data.errors import SampleIndexError

_MASK64 = (1 << 64) - 1
_ROUNDS = 6


def mix64(x: int) -> int:
    """A 64-bit integer hash (the splitmix64 finaliser): a bijection on ``[0, 2**64)``."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def num_slots(num_tokens: int, seq_len: int) -> int:
    """How many ``seq_len + 1``-token samples a file of ``num_tokens`` tokens holds per epoch."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    return max(0, (num_tokens - 1) // seq_len)


def permute(i: int, n: int, *, key: int) -> int:
    """The image of ``i`` under a keyed permutation of ``range(n)``.

    Promises: for fixed ``(n, key)`` the map is a bijection of ``range(n)``; it depends
    on nothing but its arguments.
    """
    if not 0 <= i < n:
        raise ValueError(f"permute: {i} is outside range({n})")
    if n == 1:
        return 0
    # A balanced Feistel network on the smallest even number of bits covering n, so the
    # domain is < 4n and cycle walking (re-applying until the value falls below n)
    # needs fewer than 4 rounds on average. It terminates because i lies on its own cycle.
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    low_mask = (1 << half) - 1
    round_keys = [mix64((key + r) & _MASK64) for r in range(_ROUNDS)]
    x = i
    while True:
        left, right = x >> half, x & low_mask
        for rk in round_keys:
            left, right = right, left ^ (mix64(rk ^ right) & low_mask)
        x = (left << half) | right
        if x < n:
            return x


def epoch_key(shuffle_seed: int, epoch: int) -> int:
    """The permutation key of one epoch of one shuffle seed."""
    return mix64(mix64(shuffle_seed & _MASK64) ^ (epoch & _MASK64))


def sample_slot(index: int, *, slots: int, shuffle_seed: int, repeat: bool) -> int:
    """The slot that sample ``index`` reads.

    With ``repeat=False`` only indices in ``range(slots)`` (one epoch) are valid; with
    ``repeat=True`` any index >= 0 is, and each epoch is shuffled with its own key.
    Raises :class:`SampleIndexError` otherwise.
    """
    if slots <= 0:
        raise SampleIndexError(f"sample {index}: the data holds no complete sample")
    if index < 0 or (not repeat and index >= slots):
        limit = "any index >= 0" if repeat else f"indices 0..{slots - 1}"
        raise SampleIndexError(f"sample index {index} is out of range ({slots} samples per epoch; {limit} are valid)")
    epoch, i = divmod(index, slots)
    return permute(i, slots, key=epoch_key(shuffle_seed, epoch))
