"""Speed-aware shares: the cut rule's properties, and the run learning speeds from witnessed deliveries.

The pure rules (:mod:`psyche.coordinator.shares`) are checked with hypothesis;
the learning is played with the coordinator swarm, whose witnesses report when
each result arrived at each trainer's simulated speed.
"""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from psyche.coordinator import (
    ClientState,
    Coordinator,
    CoordinatorSettings,
    Round,
    RunState,
    Witness,
    batch_split,
    current_round,
    member,
    points,
    round_batches,
)
from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.shares import (
    SHARE_CEILING_MULTIPLE,
    SHARE_FLOOR_DIVISOR,
    Piece,
    allocate,
    delivery_ms,
    measured,
    plan_round,
    share_weights,
)
from psyche.testing.coordinator_swarm import Swarm, client_key, result_commitment

AUTH = b"\xaa" * 32


def bounds(total: int, n: int) -> tuple[int, int]:
    return max(1, total // (SHARE_FLOOR_DIVISOR * n)), min(total, -(-SHARE_CEILING_MULTIPLE * total // n))


@given(total=st.integers(0, 5000), weights=st.lists(st.integers(1, 10**6), min_size=1, max_size=40))
def test_allocate_covers_the_total_within_floor_and_ceiling(total, weights):
    sizes = allocate(total, weights)
    assert sum(sizes) == total and len(sizes) == len(weights)
    n = len(weights)
    if total <= n:
        assert sorted(sizes, reverse=True) == sizes and set(sizes) <= {0, 1}
        return
    lo, hi = bounds(total, n)
    assert all(lo <= x <= hi for x in sizes)
    # More weight never gets fewer samples (beyond the one a rounding tie may give).
    for a in range(n):
        for b in range(n):
            if weights[a] > weights[b]:
                assert sizes[a] >= sizes[b] - 1
    assert allocate(total, weights) == sizes  # deterministic


@given(total=st.integers(50, 5000), k=st.integers(1, 6), n=st.integers(2, 12))
def test_allocate_is_proportional_when_no_bound_binds(total, k, n):
    # Weights 1..n within a factor of 4 of each other when n is small: compare to the exact cut.
    weights = [k + (i % 3) for i in range(n)]
    sizes = allocate(total, weights)
    wsum = sum(weights)
    assert all(abs(x - total * w / wsum) < 1 for x, w in zip(sizes, weights))


def test_a_never_measured_trainer_starts_below_everyone_measured():
    assert share_weights([0, 0]) == [1, 1]
    assert share_weights([400, 300, 0]) == [400, 300, 150]
    sizes = allocate(16, share_weights([400, 400, 0]))
    assert sizes[2] < min(sizes[:2])


pieces = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 20)), max_size=6).map(
    lambda xs: [Piece(s, s + size) for s, size in xs])


@given(total=st.integers(1, 200), estimates=st.lists(st.integers(0, 10**5), min_size=1, max_size=12), queue=pieces,
       speed_aware=st.booleans())
def test_plan_takes_pieces_whole_and_covers_the_batch(total, estimates, queue, speed_aware):
    plan = plan_round(total, estimates, queue, speed_aware=speed_aware)
    n = len(estimates)
    assert len(plan.sizes) == n
    # Pieces come from the front of the queue, whole, one per position, never all positions
    # (unless alone), and the fresh part is what is left of the batch.
    taken = [Piece(t.start, t.end) for t in plan.taken]
    assert taken == queue[: len(taken)]
    assert len({t.position for t in plan.taken}) == len(plan.taken) <= max(1, n - 1)
    assert all(plan.sizes[t.position] == t.end - t.start for t in plan.taken)
    assert plan.fresh >= 0
    if not plan.taken:
        assert sum(plan.sizes) == total
    else:
        assert sum(plan.sizes) == total or n == 1
    # Not taking the next piece means it did not fit (or the positions ran out).
    if len(taken) < len(queue):
        nxt = queue[len(taken)]
        assert len(taken) == max(1, n - 1) or nxt.size > total - sum(p.size for p in taken)
    # The round built from the plan tiles: fresh samples contiguous from data_index, pieces as given.
    r = Round(height=0, step=1, data_index=10**7, batch_size=sum(plan.sizes), random_seed=bytes(32), started_at=0,
              trainers=list(range(n)), witnesses=0, sizes=plan.sizes, taken=plan.taken)
    split = batch_split(r)
    fresh = sorted((s, e) for _, s, e in split if s >= 10**7)
    assert sum(e - s for s, e in fresh) == plan.fresh
    assert all(a[1] == b[0] for a, b in zip(fresh, fresh[1:]))
    assert sorted((s, e) for _, s, e in split if s < 10**7) == sorted((p.start, p.end) for p in taken)


def test_even_rule_ignores_speeds():
    assert plan_round(12, [9000, 9000, 1000], [], speed_aware=False).sizes == [4, 4, 4]
    assert plan_round(14, [9000, 9000, 3000], [], speed_aware=True).sizes == [6, 6, 2]


def test_delivery_is_the_upper_median_and_measured_moves_half_way():
    # One witness saying its friend was fast does not make it fast.
    assert delivery_ms([[500], [520], [3]], 1)[0] == 500
    assert delivery_ms([[0], [0]], 1)[0] is None
    assert delivery_ms([[], [40]], 1)[0] == 40
    assert measured(0, 3000, 1000) == 3000
    assert measured(3000, 1000, 1000) == 2000


# --- the run learns --------------------------------------------------------------


def speed_swarm(n: int, **kw) -> Swarm:
    cfg = dict(init_min_clients=n, min_clients=1, warmup_time=2, cooldown_time=2, max_round_train_time=6,
               round_witness_time=1, epoch_time=10_000, total_steps=60, global_batch_size_start=28,
               global_batch_size_end=28, epoch_reward=7000, checkpointers=0, seq_len=64)
    cfg.update(kw)
    swarm = Swarm(Coordinator.new("shares", CoordinatorSettings(**cfg), authority=AUTH, now=0))
    swarm.join(range(n))
    return swarm


def shares_by_client(swarm: Swarm) -> dict[int, int]:
    s = swarm.coord.state
    keys = {client_key(i): i for i in swarm.joined}
    return {keys[b.client]: b.end - b.start for b in round_batches(s)}


def play_rounds(swarm: Swarm, rounds: int) -> list[dict[int, int]]:
    """Play ``rounds`` more rounds; the shares of each, by client."""
    out = []
    for _ in range(rounds):
        step = swarm.coord.state.step
        swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain and c.state.step == step)
        out.append(shares_by_client(swarm))
        swarm.run_until(lambda c: c.state.step > step)
    return out


def round_time_ms(swarm: Swarm, shares: dict[int, int]) -> int:
    """When the round's last result arrives at the swarm's simulated speeds."""
    return max(swarm.arrival_ms(i, n) for i, n in shares.items())


def test_shares_follow_speed_and_rounds_stop_waiting_for_the_slowest():
    swarm = speed_swarm(3)
    swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    history = play_rounds(swarm, 6)
    assert history[0] == {0: 10, 1: 9, 2: 9} or sorted(history[0].values()) == [9, 9, 10]  # nothing known yet
    last = history[-1]
    assert last == {0: 12, 1: 12, 2: 4}  # 3 : 3 : 1
    equal = round_time_ms(swarm, history[0])
    ideal = 28 * 64 * 1000 / 7000
    assert round_time_ms(swarm, last) <= 1.05 * ideal < equal / 2
    s = swarm.coord.state
    est = [member(s, client_key(i)).throughput for i in range(3)]
    assert [round(e, -2) for e in est] == [3000, 3000, 1000]


def test_a_node_slowed_mid_run_loses_share_within_a_few_rounds():
    swarm = speed_swarm(3)
    swarm.speeds = {0: 2000.0, 1: 2000.0, 2: 2000.0}
    before = play_rounds(swarm, 4)[-1]
    assert max(before.values()) - min(before.values()) <= 1
    swarm.speeds[2] = 500.0  # its CPU quota is cut
    after = play_rounds(swarm, 4)
    assert after[1][2] < before[2]  # the first round after the cut is measured, the next shrinks
    assert after[-1][2] <= 4  # 1/9 of 28 is 3.1: within a few rounds it is near its new fair share
    assert round_time_ms(swarm, after[-1]) < 0.6 * round_time_ms(swarm, after[0])


def test_a_trainer_delivering_late_loses_share_and_a_missed_batch_goes_to_the_queue():
    swarm = speed_swarm(3)
    swarm.speeds = {0: 2000.0, 1: 2000.0, 2: 2000.0}
    play_rounds(swarm, 3)
    swarm.speeds[2] = 300.0  # from now on its results arrive late
    shares = play_rounds(swarm, 4)
    assert shares[-1][2] < shares[0][2] and shares[-1][2] <= 3
    # A round in which its result never reaches the witnesses in time: the batch goes back to the
    # queue, its estimate halves, and the run goes on (the next round trains the piece).
    step = swarm.coord.state.step
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain and c.state.step == step)
    missed = next(b for b in round_batches(swarm.coord.state) if b.client == client_key(2))
    before = member(swarm.coord.state, client_key(2)).throughput
    swarm.silent.add(2)
    swarm.run_until(lambda c: c.state.step > step)
    s = swarm.coord.state
    assert member(s, client_key(2)).throughput == before // 2
    r = current_round(s)
    assert r is not None and [(t.start, t.end) for t in r.taken] == [(missed.start, missed.end)]
    assert s.requeued == []
    assert r.step == step + 1  # the run did not stall


def test_a_boastful_witness_report_changes_nothing():
    """The tokens_per_sec a witness reports about itself is shown, never used for shares."""
    a, b = speed_swarm(3), speed_swarm(3)
    for swarm in (a, b):
        swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    play_rounds(a, 3)
    # In b, client 2 (slow) sends its witness reports with a boast instead of the honest figure.
    for _ in range(3):
        step = b.coord.state.step
        b.run_until(lambda c: c.state.run_state is RunState.RoundTrain and c.state.step == step)
        s = b.coord.state
        r = current_round(s)
        assert r is not None
        batches = round_batches(s)
        received = [(x.client, result_commitment(r.step, x.client, x.start, x.end)) for x in batches]
        arrivals = [b.arrival_ms(i, x.end - x.start)
                    for idx in r.trainers for i in [next(k for k in range(3) if client_key(k) == s.clients[idx].id)]
                    for x in [next(y for y in batches if y.client == s.clients[idx].id)]]
        boast = Witness(step=r.step, participant_bloom=BloomFilter.for_items([c for c, _ in received]).to_bytes(),
                        broadcast_bloom=BloomFilter.for_items([h for _, h in received]).to_bytes(),
                        broadcast_merkle=bytes(32), loss=2.0 + 1.0 / r.step, tokens_per_sec=1e12,
                        bandwidth_bytes=4096, arrivals_ms=arrivals)
        assert b.submit(boast, client_key(2)) is None
        b.run_until(lambda c: c.state.step > step)
    assert [c.throughput for c in a.coord.state.clients] == [c.throughput for c in b.coord.state.clients]


def test_a_lying_witness_cannot_speed_up_a_slow_friend():
    swarm = speed_swarm(3)
    swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    original = swarm.submit

    def lie(instr, signer):
        if isinstance(instr, Witness) and signer == client_key(0) and instr.arrivals_ms:
            s = swarm.coord.state
            r = current_round(s)
            pos = [s.clients[i].id for i in r.trainers].index(client_key(2))
            fake = list(instr.arrivals_ms)
            fake[pos] = 1
            instr = msgspec.structs.replace(instr, arrivals_ms=fake)
        return original(instr, signer)

    swarm.submit = lie  # type: ignore[method-assign]
    last = play_rounds(swarm, 6)[-1]
    assert last[2] <= 5  # still about a seventh of 28


def test_points_follow_accepted_tokens():
    swarm = speed_swarm(3, total_steps=12)
    swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    trained: dict[int, int] = {0: 0, 1: 0, 2: 0}
    for shares in play_rounds(swarm, 12):
        for i, n in shares.items():
            trained[i] += n
    swarm.run_until(lambda c: c.state.run_state is RunState.Finished)
    pts = points(swarm.coord.state)
    total = sum(trained.values())
    for i in range(3):
        assert pts[client_key(i)] == 7000 * trained[i] // total
    assert pts[client_key(2)] < pts[client_key(0)] / 2


def test_estimates_carry_into_the_next_epoch_for_members_who_stay():
    swarm = speed_swarm(3, epoch_time=12, total_steps=40)
    swarm.speeds = {0: 3000.0, 1: 3000.0, 2: 1000.0}
    swarm.run_until(lambda c: c.state.epoch == 1 and c.state.run_state is RunState.RoundTrain)
    s = swarm.coord.state
    assert all(c.state is ClientState.Healthy and c.throughput > 0 for c in s.clients)
    assert shares_by_client(swarm)[2] <= 5  # the first round of the new epoch already knows
