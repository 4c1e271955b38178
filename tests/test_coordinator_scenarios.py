"""Whole runs played against the coordinator by honest (and some dishonest) simulated clients."""

from __future__ import annotations

import hashlib

import pytest

from psyche.config import parse_config
from psyche.coordinator import (
    BloomFilter,
    Checkpoint,
    ClientState,
    Coordinator,
    CoordinatorSettings,
    DuplicateCheckpoint,
    DuplicateWitness,
    FalseAccusation,
    Halted,
    HealthCheck,
    InvalidInstruction,
    InvalidRunState,
    Join,
    NotACheckpointer,
    NotAMember,
    NotAWitness,
    Pause,
    Resume,
    RunState,
    StaleStep,
    Tick,
    Unauthorized,
    WarmupWitness,
    Withdraw,
    Witness,
    accusable_trainers,
    assignment_for,
    consensus,
    current_round,
    is_witness,
    lr_warmup_window,
    member,
    model_source,
    phase_deadline,
    points,
    role_proof,
    round_batches,
    round_trainers,
    round_witnesses,
    time_left,
    verify_role_proof,
    witnessed_trainers,
)
from psyche.coordinator.log import apply_entry, replay
from psyche.testing.coordinator_swarm import Swarm, client_key, result_commitment

AUTH = b"\xaa" * 32
SEED = bytes(32)


def settings(**over) -> CoordinatorSettings:
    base = dict(warmup_time=10, cooldown_time=5, max_round_train_time=10, round_witness_time=2, epoch_time=12,
                total_steps=20, init_min_clients=3, min_clients=2, witness_nodes=0, global_batch_size_start=12,
                global_batch_size_end=12, global_batch_size_warmup_tokens=0, waiting_for_members_extra_time=2,
                cold_start_warmup_steps=0, epoch_reward=900, checkpointers=1, seq_len=8)
    base.update(over)
    return CoordinatorSettings(**base)


def new_swarm(n: int = 3, **over) -> Swarm:
    swarm = Swarm(Coordinator.new("test-run", settings(**over), authority=AUTH, now=0))
    swarm.join(range(n))
    return swarm


def state_is(*states: RunState):
    return lambda c: c.state.run_state in states


def refused_unchanged(swarm: Swarm, instr, signer: bytes, expected: type) -> None:
    """Apply ``instr``; it must be refused with ``expected`` and leave the state bytes as they were."""
    before = swarm.coord.to_bytes()
    err = swarm.coord.apply(instr, signer, swarm.now, SEED)
    assert isinstance(err, expected), f"expected {expected.__name__}, got {err!r}"
    assert swarm.coord.to_bytes() == before
    assert err.message  # every refusal says what was wrong


def all_intervals(swarm: Swarm) -> list[tuple[int, int]]:
    """Replay the log and collect every round's batch intervals as they were handed out."""
    coord = Coordinator.new("test-run", swarm.coord.state.settings, authority=AUTH, now=0)
    seen: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for entry in swarm.log:
        assert apply_entry(coord, entry).error is None
        r = current_round(coord.state)
        if r is not None:
            seen[(coord.state.epoch, r.step)] = [(b.start, b.end) for b in round_batches(coord.state, r.step)]
    return [iv for ivs in seen.values() for iv in ivs]


def test_witness_window_ends_once_every_witness_reported():
    # All three witness (witness_nodes=0): the round goes on at the first tick after the
    # last report, not after round_witness_time.
    swarm = new_swarm(3, round_witness_time=5)
    swarm.run_until(state_is(RunState.RoundTrain))
    step = swarm.coord.state.step
    swarm.act()  # everyone witnesses
    assert swarm.coord.state.run_state is RunState.RoundWitness
    swarm.tick()  # no time has passed
    assert swarm.coord.state.run_state is RunState.RoundTrain and swarm.coord.state.step == step + 1
    # With one witness silent, the quorum (2 of 3) ends RoundTrain early but the window waits for it.
    swarm.offline.add(2)
    swarm.act()
    assert swarm.coord.state.run_state is RunState.RoundWitness
    for _ in range(4):
        swarm.advance(1)
        assert swarm.coord.state.run_state is RunState.RoundWitness, "still waiting for the third witness"
    swarm.advance(1)
    assert swarm.coord.state.step == step + 2


def test_three_clients_run_to_completion_over_several_epochs():
    swarm = new_swarm(3, warmup_time=2, cooldown_time=2, max_round_train_time=4, epoch_time=8)
    swarm.run_until(state_is(RunState.Finished))
    s = swarm.coord.state
    assert s.step == 21  # steps 1..20 trained
    assert s.epoch >= 3  # epoch_time 8s, rounds of 1s: several epochs
    # Honest clients were never refused.
    assert swarm.refused == []
    # Every epoch paid its reward to the three healthy clients by accepted tokens: as they are
    # equally fast, near equally (a share is whole samples), and all of it but rounding.
    paid = sorted(points(s).values())
    assert 900 * s.epoch - 3 * s.epoch <= sum(paid) <= 900 * s.epoch
    assert paid[0] >= 0.8 * paid[-1]
    # Every sample index was handed out at most once, and they are contiguous from 0.
    intervals = sorted(all_intervals(swarm))
    assert intervals[0][0] == 0
    for (a0, a1), (b0, b1) in zip(intervals, intervals[1:]):
        assert a1 == b0
    assert intervals[-1][1] == s.next_data_index == 20 * 12
    # One checkpoint per epoch, the last one of the final step.
    assert [c.epoch for c in s.checkpoints] == list(range(s.epoch))
    assert s.checkpoints[-1].step == 20
    assert s.stats[-1].step == 20 and s.stats[-1].reports == 3
    # Anyone replaying the log gets the same state.
    other = Coordinator.new("test-run", s.settings, authority=AUTH, now=0)
    assert all(e is None for e in replay(other, swarm.log))
    assert other.digest() == swarm.coord.digest()
    # Finished is final.
    refused_unchanged(swarm, Tick(), bytes(32), Halted)
    refused_unchanged(swarm, Join(p2p_address="x"), client_key(9), Halted)


def test_silent_trainer_is_accused_rechecked_dropped_and_unpaid():
    swarm = new_swarm(4, init_min_clients=4, epoch_time=200, total_steps=6)
    swarm.silent.add(3)
    silent = client_key(3)
    swarm.run_until(state_is(RunState.RoundTrain))
    # Play round 1 by hand with everyone's results except the silent one.
    swarm.act()
    swarm.run_until(lambda c: c.state.step == 2)
    s = swarm.coord.state
    assert accusable_trainers(s, 1) == [silent]
    assert silent not in witnessed_trainers(s, 1)
    accuser = client_key(0)
    # False accusations are refused, and a batch with one false entry is refused whole.
    refused_unchanged(swarm, HealthCheck(step=1, accused=[client_key(1)]), accuser, FalseAccusation)
    refused_unchanged(swarm, HealthCheck(step=1, accused=[silent, client_key(1)]), accuser, FalseAccusation)
    # Accusing a round that is still collecting reports is refused.
    refused_unchanged(swarm, HealthCheck(step=2, accused=[silent]), accuser, InvalidRunState)
    # Only healthy members may accuse.
    refused_unchanged(swarm, HealthCheck(step=1, accused=[silent]), client_key(8), NotAMember)
    assert swarm.submit(HealthCheck(step=1, accused=[silent]), accuser) is None
    s = swarm.coord.state
    dropped = member(s, silent)
    assert dropped.state is ClientState.Dropped
    # It still belongs to the current round (leaves at its end), then gets no more batches.
    assert silent in round_trainers(s)
    swarm.run_until(lambda c: c.state.step == 3 and c.state.run_state is RunState.RoundTrain)
    assert silent not in round_trainers(swarm.coord.state)
    assert assignment_for(swarm.coord.state, silent) is None
    swarm.run_until(state_is(RunState.Finished))
    pts = points(swarm.coord.state)
    assert pts[silent] == 0
    assert all(pts[client_key(i)] > 200 for i in range(3)) and sum(pts.values()) >= 900 - 3


def test_falling_below_min_clients_ends_the_epoch_and_waits_for_members():
    swarm = new_swarm(3, epoch_time=500, total_steps=50)
    swarm.run_until(lambda c: c.state.step == 3 and c.state.run_state is RunState.RoundTrain)
    assert swarm.submit(Withdraw(), client_key(1)) is None
    assert swarm.submit(Withdraw(), client_key(2)) is None
    swarm.offline |= {1, 2}
    swarm.run_until(state_is(RunState.Cooldown))
    assert swarm.coord.state.step == 4  # the round finished, then the epoch ended
    swarm.run_until(state_is(RunState.WaitingForMembers))
    s = swarm.coord.state
    assert [c.id for c in s.clients] == [client_key(0)]  # the healthy member is carried over
    pts = points(s)
    assert pts[client_key(0)] == 900 and pts[client_key(1)] == 0 and pts[client_key(2)] == 0
    # Nothing starts with one client...
    for _ in range(30):
        swarm.advance(1)
    assert swarm.coord.state.run_state is RunState.WaitingForMembers
    assert phase_deadline(swarm.coord.state) is None
    # ...until enough join again; then the extra wait, then warmup.
    swarm.offline -= {1}
    swarm.join([1, 5])
    s = swarm.coord.state
    assert s.ready_since == swarm.now and time_left(s, swarm.now) == 2
    swarm.run_until(state_is(RunState.Warmup))
    assert {c.id for c in swarm.coord.state.clients} == {client_key(i) for i in (0, 1, 5)}
    assert swarm.coord.state.carried == 1 and model_source(swarm.coord.state) == "p2p"


def test_pause_and_resume_with_cold_start():
    swarm = new_swarm(3, epoch_time=500, total_steps=12, cold_start_warmup_steps=3)
    swarm.run_until(lambda c: c.state.step == 4 and c.state.run_state is RunState.RoundTrain)
    refused_unchanged(swarm, Pause(), client_key(0), Unauthorized)
    assert swarm.submit(Pause(), AUTH) is None
    assert swarm.coord.state.pause_pending
    refused_unchanged(swarm, Pause(), AUTH, InvalidRunState)
    refused_unchanged(swarm, Resume(), AUTH, InvalidRunState)
    swarm.run_until(state_is(RunState.Cooldown))
    assert swarm.coord.state.step == 5  # the round in flight finished first
    swarm.run_until(state_is(RunState.Paused))
    s = swarm.coord.state
    assert not s.pause_pending
    assert all(c.state is ClientState.Withdrawn for c in s.clients)
    paid = sorted(points(s).values())  # the epoch completed: paid, by accepted tokens
    assert paid[0] > 0 and 900 - 3 <= sum(paid) <= 900
    refused_unchanged(swarm, Tick(), bytes(32), Halted)
    refused_unchanged(swarm, Witness(step=5, participant_bloom=BloomFilter.for_items([]).to_bytes(),
                                     broadcast_bloom=BloomFilter.for_items([]).to_bytes(), broadcast_merkle=bytes(32),
                                     loss=1.0, tokens_per_sec=1.0, bandwidth_bytes=1), client_key(0), Halted)
    refused_unchanged(swarm, Resume(), client_key(0), Unauthorized)
    swarm.now += 100
    assert swarm.submit(Resume(), AUTH) is None
    s = swarm.coord.state
    assert s.run_state is RunState.WaitingForMembers
    assert s.cold_start_step == 5 and lr_warmup_window(s) == (5, 8)
    assert s.clients == [] and model_source(s) == "checkpoint"
    # Everyone joins again, and the run goes on from step 5 to the end.
    swarm.join(range(3))
    swarm.run_until(state_is(RunState.RoundTrain))
    assert current_round(swarm.coord.state).step == 5
    swarm.run_until(state_is(RunState.Finished))
    assert swarm.coord.state.step == 13


def test_pause_while_waiting_is_immediate():
    swarm = new_swarm(1)
    assert swarm.submit(Pause(), AUTH) is None
    s = swarm.coord.state
    assert s.run_state is RunState.Paused and s.pending == [client_key(0)]
    # Joins while paused wait for the resume.
    swarm.join([1, 2])
    assert swarm.submit(Resume(), AUTH) is None
    swarm.run_until(state_is(RunState.Warmup))
    assert len(swarm.coord.state.clients) == 3


def test_late_joiner_enters_at_the_next_epoch():
    swarm = new_swarm(3, epoch_time=30, total_steps=40)
    swarm.run_until(lambda c: c.state.step == 3 and c.state.run_state is RunState.RoundTrain)
    late = client_key(7)
    swarm.join([7])
    s = swarm.coord.state
    assert late in s.pending and member(s, late) is None
    assert late not in round_trainers(s) and assignment_for(s, late) is None
    swarm.run_until(lambda c: c.state.epoch == 1 and c.state.run_state is RunState.RoundTrain)
    s = swarm.coord.state
    assert member(s, late) is not None and late not in s.pending
    assert late in round_trainers(s)
    assert assignment_for(s, late) is not None
    # A member re-joining only updates its address.
    assert swarm.submit(Join(p2p_address="new-ticket"), late) is None
    assert member(swarm.coord.state, late).p2p_address == "new-ticket"
    assert late not in swarm.coord.state.pending


def test_forged_and_non_member_instructions_change_nothing():
    swarm = new_swarm(4, init_min_clients=4, witness_nodes=2, epoch_time=200)
    stranger = client_key(50)
    swarm.run_until(state_is(RunState.Warmup))
    s = swarm.coord.state
    non_witness = next(client_key(i) for i in range(4) if s.clients[i].id not in
                       [s.clients[w].id for w in s.warmup_witnesses])
    refused_unchanged(swarm, WarmupWitness(), stranger, NotAMember)
    refused_unchanged(swarm, WarmupWitness(), non_witness, NotAWitness)
    refused_unchanged(swarm, Withdraw(), stranger, NotAMember)
    refused_unchanged(swarm, Checkpoint(step=0, location="x", sha256=bytes(32)), client_key(0), InvalidRunState)
    swarm.run_until(state_is(RunState.RoundTrain))
    s = swarm.coord.state
    r = current_round(s)
    witnesses = round_witnesses(s)
    assert len(witnesses) == 2
    not_witness = next(c.id for c in s.clients if c.id not in witnesses)
    empty = BloomFilter.for_items([]).to_bytes()

    def witness(step=r.step, bloom=empty, merkle=bytes(32), loss=1.0):
        return Witness(step=step, participant_bloom=bloom, broadcast_bloom=empty, broadcast_merkle=merkle, loss=loss,
                       tokens_per_sec=10.0, bandwidth_bytes=5)

    refused_unchanged(swarm, witness(), stranger, NotAMember)
    refused_unchanged(swarm, witness(), not_witness, NotAWitness)
    refused_unchanged(swarm, witness(step=r.step - 1), witnesses[0], StaleStep)
    refused_unchanged(swarm, witness(step=r.step + 1), witnesses[0], InvalidInstruction)
    refused_unchanged(swarm, witness(bloom=b"\x07junk"), witnesses[0], InvalidInstruction)
    refused_unchanged(swarm, witness(merkle=b"short"), witnesses[0], InvalidInstruction)
    refused_unchanged(swarm, witness(loss=float("nan")), witnesses[0], InvalidInstruction)
    refused_unchanged(swarm, Witness(step="1", participant_bloom=empty, broadcast_bloom=empty,  # type: ignore[arg-type]
                                     broadcast_merkle=bytes(32), loss=1.0, tokens_per_sec=1.0, bandwidth_bytes=1),
                      witnesses[0], InvalidInstruction)
    honest = Witness(
        step=r.step, participant_bloom=BloomFilter.for_items([b.client for b in round_batches(s)]).to_bytes(),
        broadcast_bloom=BloomFilter.for_items(
            [result_commitment(r.step, b.client, b.start, b.end) for b in round_batches(s)]).to_bytes(),
        broadcast_merkle=bytes(32), loss=1.0, tokens_per_sec=10.0, bandwidth_bytes=5)
    assert swarm.submit(honest, witnesses[0]) is None
    refused_unchanged(swarm, honest, witnesses[0], DuplicateWitness)
    refused_unchanged(swarm, Pause(), stranger, Unauthorized)
    refused_unchanged(swarm, HealthCheck(step=r.step, accused=[client_key(0)]), stranger, NotAMember)
    refused_unchanged(swarm, Join(p2p_address=""), stranger, InvalidInstruction)
    refused_unchanged(swarm, Join(p2p_address="x" * 1025), stranger, InvalidInstruction)
    # Malformed host arguments are refused too.
    before = swarm.coord.to_bytes()
    assert isinstance(swarm.coord.apply(Tick(), b"short", swarm.now, SEED), InvalidInstruction)
    assert isinstance(swarm.coord.apply(Tick(), stranger, swarm.now, b"seed"), InvalidInstruction)
    assert isinstance(swarm.coord.apply(Tick(), stranger, -1, SEED), InvalidInstruction)
    assert isinstance(swarm.coord.apply("tick", stranger, swarm.now, SEED), InvalidInstruction)  # type: ignore[arg-type]
    assert swarm.coord.to_bytes() == before
    # Cooldown: only the selected checkpointer, once, for the last step.
    swarm.run_until(state_is(RunState.Cooldown))
    s = swarm.coord.state
    ckpt = s.clients[s.checkpointers[0]].id
    other = next(c.id for c in s.clients if c.id != ckpt and c.state is ClientState.Healthy)
    good = Checkpoint(step=s.step - 1, location="hf://x", sha256=hashlib.sha256(b"x").digest())
    refused_unchanged(swarm, good, other, NotACheckpointer)
    refused_unchanged(swarm, Checkpoint(step=s.step - 2, location="x", sha256=bytes(32)), ckpt, StaleStep)
    refused_unchanged(swarm, Checkpoint(step=s.step - 1, location="x", sha256=b"1"), ckpt, InvalidInstruction)
    assert swarm.submit(good, ckpt) is None
    refused_unchanged(swarm, good, ckpt, DuplicateCheckpoint)


def test_warmup_starts_early_when_witnesses_ready_and_drops_idle_warmup_witness():
    swarm = new_swarm(3, witness_nodes=2)
    swarm.run_until(state_is(RunState.Warmup))
    start = swarm.now
    swarm.act()  # both warmup witnesses report at once
    assert swarm.coord.state.run_state is RunState.RoundTrain and swarm.now == start
    # Late warmup witness: an expected no-op.
    w = swarm.coord.state.clients[swarm.coord.state.warmup_witnesses[0]].id
    before = swarm.coord.to_bytes()
    assert swarm.coord.apply(WarmupWitness(), w, swarm.now, SEED) is None
    assert swarm.coord.to_bytes() == before

    swarm = new_swarm(4, init_min_clients=4, witness_nodes=2)
    swarm.run_until(state_is(RunState.Warmup))
    s = swarm.coord.state
    idle = s.warmup_witnesses[0]
    swarm.offline.add(next(i for i in range(4) if client_key(i) == s.clients[idle].id))
    swarm.run_until(state_is(RunState.RoundTrain))
    s = swarm.coord.state
    assert swarm.now >= s.epoch_started_at + 10  # waited for the warmup timeout
    assert s.clients[idle].state is ClientState.Dropped
    assert s.clients[idle].id not in round_trainers(s)


def test_idle_round_witness_is_dropped_and_no_reports_withdraws_everyone():
    swarm = new_swarm(4, init_min_clients=4, witness_nodes=2, epoch_time=500, total_steps=30)
    swarm.run_until(state_is(RunState.RoundTrain))
    idle = round_witnesses(swarm.coord.state)[0]
    swarm.offline.add(next(i for i in range(4) if client_key(i) == idle))
    swarm.run_until(lambda c: c.state.step == 2)
    # quorum(2) == 2: one report is not enough, so the epoch ends and the idle witness is out.
    s = swarm.coord.state
    assert s.run_state is RunState.Cooldown
    assert member(s, idle).state is ClientState.Dropped

    swarm = new_swarm(3, epoch_time=500)
    swarm.run_until(state_is(RunState.RoundTrain))
    swarm.offline |= {0, 1, 2}
    swarm.run_until(state_is(RunState.Cooldown))
    assert all(c.state is not ClientState.Healthy for c in swarm.coord.state.clients)
    swarm.run_until(state_is(RunState.WaitingForMembers))
    assert swarm.coord.state.clients == [] and sum(points(swarm.coord.state).values()) == 0


def test_batch_size_ramps_with_tokens_and_indices_continue_across_epochs():
    swarm = new_swarm(3, global_batch_size_start=4, global_batch_size_end=16, global_batch_size_warmup_tokens=8 * 40,
                      warmup_time=3, cooldown_time=2, max_round_train_time=4, epoch_time=8, total_steps=12)
    swarm.run_until(state_is(RunState.Finished))
    sizes = [e - s for s, e in sorted(all_intervals(swarm))]
    s = swarm.coord.state.settings
    # Recompute the expected global batch per step from the ramp.
    idx, expected = 0, []
    for _ in range(12):
        b = s.batch_size_at(idx * s.seq_len)
        expected.append(b)
        idx += b
    assert expected[0] == 4 and expected[-1] == 16 and expected == sorted(expected)
    assert sum(sizes) == sum(expected) == swarm.coord.state.next_data_index
    assert swarm.coord.state.epoch >= 2


def test_roles_are_provable_and_cover_the_batch():
    swarm = new_swarm(7, init_min_clients=7, min_clients=3, witness_nodes=3, global_batch_size_start=20, global_batch_size_end=20,
                      epoch_time=500)
    swarm.run_until(state_is(RunState.RoundTrain))
    s = swarm.coord.state
    r = current_round(s)
    batches = round_batches(s)
    assert [b.client for b in batches] == round_trainers(s)
    assert batches[0].start == r.data_index and batches[-1].end == r.data_index + 20
    assert sorted(b.end - b.start for b in batches) == [2, 3, 3, 3, 3, 3, 3]
    for i in range(7):
        cid = client_key(i)
        proof = role_proof(s, cid)
        assert verify_role_proof(s, cid, proof)
        assert is_witness(s, cid) == (proof.position < r.witnesses)
        assert assignment_for(s, cid) == (batches[proof.position].start, batches[proof.position].end)
        forged = type(proof)(step=proof.step, rank=proof.rank, position=(proof.position + 1) % 7)
        assert not verify_role_proof(s, cid, forged)
        assert not verify_role_proof(s, client_key((i + 1) % 7), proof)
    assert role_proof(s, client_key(99)) is None


def test_consensus_picks_the_commitment_a_quorum_saw():
    swarm = new_swarm(3, witness_nodes=0, epoch_time=500)
    swarm.run_until(state_is(RunState.RoundTrain))
    s = swarm.coord.state
    r = current_round(s)
    batches = round_batches(s)
    honest = {(b.start, b.end): result_commitment(r.step, b.client, b.start, b.end) for b in batches}
    forged = hashlib.sha256(b"forged").digest()
    swarm.run_until(lambda c: c.state.step == 2)
    s = swarm.coord.state
    cands = {iv: [h, forged] for iv, h in honest.items()}
    cands[(999, 1000)] = [forged]
    got = consensus(s, 1, cands)
    assert {iv: got[iv] for iv in honest} == honest
    assert got[(999, 1000)] is None
    with pytest.raises(ValueError):
        consensus(s, 77, cands)


def test_settings_from_run_config_and_bad_settings():
    cfg = parse_config({"name": "x", "coordinator": {"init_min_clients": 2, "min_clients": 2},
                        "model": {"seq_len": 64}})
    c = Coordinator.new("x", cfg, authority=AUTH, now=5)
    assert c.state.settings.seq_len == 64 and c.state.settings.init_min_clients == 2
    assert c.state.run_state is RunState.WaitingForMembers and c.state.state_started_at == 5
    c2 = Coordinator.new("x", cfg.coordinator, authority=AUTH, now=5, seq_len=64)
    assert c2.digest() == c.digest()
    assert Coordinator.new("x", cfg.coordinator, authority=AUTH, now=5).state.settings.seq_len == 128
    with pytest.raises(ValueError, match="witness_nodes must be <= min_clients"):
        Coordinator.new("x", settings(witness_nodes=3), authority=AUTH, now=0)
    with pytest.raises(ValueError, match="authority"):
        Coordinator.new("x", settings(), authority=b"short", now=0)
    paused = Coordinator.new("x", settings(), authority=AUTH, now=0, start_paused=True)
    assert paused.state.run_state is RunState.Paused


def test_state_bytes_roundtrip_and_reject_garbage():
    swarm = new_swarm(3, epoch_time=500)
    swarm.run_until(lambda c: c.state.step == 3)
    c = swarm.coord
    again = Coordinator.from_bytes(c.to_bytes())
    assert again.digest() == c.digest() and again.state == c.state
    assert c.copy().state is not c.state
    with pytest.raises(ValueError):
        Coordinator.from_bytes(b"\x00garbage")
    assert c.is_member(client_key(0)) and not c.is_member(client_key(40))
