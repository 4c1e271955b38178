"""Verified results: who checks whom, the verdict rules, and a run condemning a cheat by consensus.

The pure rules (:mod:`psyche.coordinator.verification`) are checked with hypothesis;
the run is played with the coordinator swarm, whose witnesses send the scores an
honest verifier would give each trainer's results (or, for a liar, the lowest score
for everyone).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from psyche.coordinator import (
    ClientState,
    Coordinator,
    CoordinatorSettings,
    InvalidInstruction,
    RunState,
    Witness,
    current_round,
    member,
    points,
    replay,
)
from psyche.coordinator import queries as q
from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.verification import (
    ALLOWANCE,
    CONDEMN_AT,
    MIN_TRAINERS,
    NO_SCORE,
    assignments,
    condemned,
    round_score,
    suspicion_after,
    to_wire,
    verdicts_needed,
    verifiers_of,
)
from psyche.testing.coordinator_swarm import Swarm, client_key

AUTH = b"\xaa" * 32


@given(n=st.integers(1, 64), w=st.integers(0, 64), v=st.integers(0, 8), p=st.integers(0, 63))
def test_verifiers_are_distinct_witnesses_other_than_the_trainer(n, w, v, p):
    p %= n
    w = min(w, n)
    got = verifiers_of(p, n, w, v)
    assert p not in got and len(set(got)) == len(got)
    assert all(0 <= x < w for x in got)
    assert len(got) == (min(v, w - (1 if p < w else 0)) if n >= MIN_TRAINERS else 0)
    table = assignments(n, w, v)
    assert all((p in table[x]) for x in got)  # each verifier lists it among its checks
    assert sum(len(x) for x in table.values()) == sum(len(verifiers_of(t, n, w, v)) for t in range(n))


@given(n=st.integers(1, 300), w=st.integers(0, 300), v=st.integers(0, 8), p=st.integers(0, 299))
def test_verifiers_are_the_first_witnesses_met_going_round_from_the_trainer(n, w, v, p):
    """The rule as first written, one position at a time, against the closed form that replaced it."""
    p %= n
    walk = [q for q in ((p + k) % n for k in range(1, n)) if q < w][:v] if n >= MIN_TRAINERS else []
    assert verifiers_of(p, n, w, v) == walk


@given(scores=st.lists(st.integers(NO_SCORE, 2**15 - 1), max_size=8), v=st.integers(1, 8))
def test_a_round_score_is_low_only_when_a_majority_of_at_least_two_say_so(scores, v):
    got = round_score(scores, v)
    given_ = [x for x in scores if x != NO_SCORE]
    need = verdicts_needed(v)
    if len(given_) < need:
        assert got is None
        return
    assert got is not None
    # At least `need` verifiers scored at most it, and at least len - need + 1 scored at least it.
    assert sum(1 for x in given_ if x <= got) >= need >= 2
    assert sum(1 for x in given_ if x >= got) >= len(given_) - need + 1


def test_one_verifier_can_neither_condemn_an_honest_result_nor_save_a_bad_one():
    lie_low, lie_high = NO_SCORE + 1, 2**15 - 1
    assert round_score([lie_low, 500, 480], 3) == 480   # a liar's low score is outvoted
    assert round_score([lie_high, 0, -20], 3) == 0      # and so is a liar's high one
    assert round_score([lie_low, 500], 2) == 500        # with two verifiers, both must say low
    assert round_score([lie_low], 3) is None            # one score alone never judges


@given(scores=st.lists(st.integers(-5000, 5000), max_size=30))
def test_suspicion_is_a_one_sided_cusum(scores):
    s = 0
    for x in scores:
        nxt = suspicion_after(s, x)
        assert nxt <= 0 and nxt == min(0, s + x - ALLOWANCE)
        s = nxt
    assert not condemned(0) and condemned(-CONDEMN_AT)


def test_wire_scores_are_clamped_and_nan_is_no_score():
    assert to_wire(float("nan")) == NO_SCORE
    assert to_wire(1e9) == 2**15 - 1 and to_wire(-1e9) == NO_SCORE + 1
    assert to_wire(5.004) == 500


# --- a run -------------------------------------------------------------------------------


def swarm_of(n: int, **cfg) -> Swarm:
    settings = dict(total_steps=30, init_min_clients=n, min_clients=2, global_batch_size_start=8 * n,
                    global_batch_size_end=8 * n, epoch_time=10_000, max_round_train_time=30, round_witness_time=5,
                    cooldown_time=2, warmup_time=20)
    settings.update(cfg)
    swarm = Swarm(Coordinator.new("verify", CoordinatorSettings(**settings), authority=AUTH, now=0))
    swarm.join(range(n))
    return swarm


def play_until_step(swarm: Swarm, step: int) -> None:
    swarm.run_until(lambda c: c.state.step > step or c.state.run_state in (RunState.Cooldown, RunState.Finished))


def test_a_result_that_fails_verification_is_condemned_applied_by_nobody_and_its_trainer_dropped():
    swarm = swarm_of(6)
    play_until_step(swarm, 2)
    s = swarm.coord.state
    assert all(c.state is ClientState.Healthy and c.suspicion == 0 for c in s.clients)
    # From step 3 on, client 4's results hold nothing of its own data (a copy, other data): ~0.
    swarm.scores[4] = 0
    cheat = client_key(4)
    condemned_at = None
    for step in range(3, 12):
        play_until_step(swarm, step)
        m = member(swarm.coord.state, cheat)
        if m.state is not ClientState.Healthy:
            condemned_at = step
            break
    assert condemned_at is not None and condemned_at - 3 <= 3, "excluded within 3 steps of its first bad result"
    s = swarm.coord.state
    m = member(s, cheat)
    assert m.state is ClientState.Dropped and m.condemned_step == condemned_at and m.tokens == 0
    # That round's result is witnessed (delivered) but applied by nobody; the honest ones are applied.
    assert cheat in q.witnessed_trainers(s, condemned_at)
    assert q.condemned_trainers(s, condemned_at) == [cheat]
    assert cheat not in q.applied_trainers(s, condemned_at)
    assert len(q.applied_trainers(s, condemned_at)) == 5
    # Its batch waits to be trained again by someone else.
    r = q.round_for_step(s, condemned_at)
    mine = next(b for b in q.round_batches(s, condemned_at) if b.client == cheat)
    assert any((p.start, p.end) == (mine.start, mine.end) for p in s.requeued) or \
        any((t.start, t.end) == (mine.start, mine.end) for t in q.current_round(s).taken)
    assert r.condemned and swarm.coord.state.stats[-1].condemned in (0, 1)
    # The run goes on, and at the epoch's end the cheat earns nothing.
    swarm.run_until(lambda c: c.state.run_state is RunState.Finished or c.state.epoch >= 1)
    assert points(swarm.coord.state).get(cheat, 0) == 0
    # Every host rebuilds the same verdicts from the log.
    again = Coordinator.new("verify", swarm.coord.state.settings, authority=AUTH, now=0)
    assert not any(replay(again, swarm.log)) and again.digest() == swarm.coord.digest()


def test_a_harmful_result_is_condemned_in_its_first_round():
    swarm = swarm_of(6)
    play_until_step(swarm, 2)
    swarm.scores[1] = -2000  # negated or random signs: far below every honest score
    play_until_step(swarm, 3)
    m = member(swarm.coord.state, client_key(1))
    assert m.state is ClientState.Dropped and m.condemned_step == 3


def test_a_lying_verifier_condemns_nobody():
    swarm = swarm_of(6)
    swarm.liars.add(2)
    play_until_step(swarm, 20)
    s = swarm.coord.state
    assert all(c.state is ClientState.Healthy and c.condemned_step == 0 for c in s.clients)
    assert all(not r.condemned for r in s.rounds)


def test_verification_off_and_runs_too_small_to_judge_condemn_nobody():
    for swarm in (swarm_of(6, verifiers=0), swarm_of(4)):
        swarm.scores[1] = -2000
        play_until_step(swarm, 6)
        assert member(swarm.coord.state, client_key(1)).state is ClientState.Healthy


def test_a_witness_report_with_the_wrong_number_of_scores_is_refused():
    swarm = swarm_of(5)
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain)
    s = swarm.coord.state
    r = current_round(s)
    w = s.clients[r.trainers[0]].id
    checks = q.verification_checks(s, w)
    assert len(checks) == 3
    empty = BloomFilter.for_items([]).to_bytes()
    bad = Witness(step=r.step, participant_bloom=empty, broadcast_bloom=empty, broadcast_merkle=bytes(32), loss=1.0,
                  tokens_per_sec=1.0, bandwidth_bytes=0, scores=[0, 0])
    err = swarm.coord.apply(bad, w, swarm.now, bytes(32))
    assert isinstance(err, InvalidInstruction) and "scores" in str(err)
