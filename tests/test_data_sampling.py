"""Sample index → slot: a keyed permutation per epoch (pure arithmetic)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psyche.data.errors import SampleIndexError
from psyche.data.sampling import num_slots, permute, sample_slot


@settings(max_examples=60)
@given(st.integers(1, 700), st.integers(0, 2**64 - 1))
def test_permute_is_a_bijection(n, key):
    image = [permute(i, n, key=key) for i in range(n)]
    assert sorted(image) == list(range(n))


@given(st.integers(2, 500), st.integers(-(2**70), 2**70))
def test_every_epoch_visits_every_slot_once(slots, seed):
    for epoch in range(2):
        got = sorted(sample_slot(epoch * slots + i, slots=slots, shuffle_seed=seed, repeat=True) for i in range(slots))
        assert got == list(range(slots))


def test_different_seeds_and_epochs_give_different_orders():
    order = lambda seed, epoch: [sample_slot(epoch * 500 + i, slots=500, shuffle_seed=seed, repeat=True) for i in range(500)]
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) == order(0, 0)
    # consecutive indices do not read consecutive text
    o = order(0, 0)
    assert sum(abs(a - b) == 1 for a, b in zip(o, o[1:])) < 25


def test_num_slots_leaves_room_for_the_target_token():
    assert num_slots(129, 128) == 1
    assert num_slots(128, 128) == 0
    assert num_slots(1 + 128 * 7, 128) == 7


def test_index_out_of_range_is_named():
    with pytest.raises(SampleIndexError, match="sample index 10 is out of range"):
        sample_slot(10, slots=10, shuffle_seed=0, repeat=False)
    with pytest.raises(SampleIndexError):
        sample_slot(-1, slots=10, shuffle_seed=0, repeat=True)
    with pytest.raises(SampleIndexError, match="no complete sample"):
        sample_slot(0, slots=0, shuffle_seed=0, repeat=True)
