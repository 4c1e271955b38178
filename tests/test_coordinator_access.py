"""Who may join (issue 17): gated runs and their grants, and an open run under a flood of fresh keys.

The rules are :mod:`psyche.coordinator.access`'s; these scenarios play them on the pure
coordinator with the honest :class:`~psyche.testing.coordinator_swarm.Swarm` (the server and
Solana hosts replay the same coordinator: tests/test_server.py and tests/test_solana.py check
the gate there too).
"""

from __future__ import annotations

import pytest

from psyche.coordinator import (
    MAX_ACCOUNTS,
    Authorize,
    ClientState,
    Coordinator,
    CoordinatorSettings,
    Delegate,
    InvalidInstruction,
    InvalidRunState,
    Join,
    NotAMember,
    Revoke,
    RunFull,
    RunState,
    Unauthorized,
    member,
    points,
)
from psyche.coordinator import access
from psyche.coordinator.log import replay
from psyche.testing.coordinator_swarm import Swarm, client_key

AUTH = b"\xaa" * 32
SEED = bytes(32)


def new_swarm(**over) -> Swarm:
    cfg = dict(warmup_time=2, cooldown_time=2, max_round_train_time=4, round_witness_time=1, epoch_time=12,
               total_steps=60, init_min_clients=4, min_clients=2, global_batch_size_start=8,
               global_batch_size_end=8, seq_len=4, waiting_for_members_extra_time=0)
    cfg.update(over)
    return Swarm(Coordinator.new("access", CoordinatorSettings(**cfg), authority=AUTH, now=0))


def refused_unchanged(swarm: Swarm, instr, signer: bytes, expected: type) -> str:
    before = swarm.coord.to_bytes()
    err = swarm.coord.apply(instr, signer, swarm.now, SEED)
    assert isinstance(err, expected), f"expected {expected.__name__}, got {err!r}"
    assert swarm.coord.to_bytes() == before
    return err.message


def training(coord: Coordinator) -> bool:
    return coord.state.run_state in (RunState.RoundTrain, RunState.RoundWitness)


# --- gated runs ---------------------------------------------------------------------------------


def test_a_gated_run_admits_granted_keys_only():
    swarm = new_swarm(access="gated")
    message = refused_unchanged(swarm, Join(p2p_address="t"), client_key(0), Unauthorized)
    assert "gated" in message and "psyche authorize" in message
    for i in range(4):
        assert swarm.submit(Authorize(key=client_key(i)), AUTH) is None
    swarm.join(range(4))
    assert swarm.refused == [] and len(swarm.coord.state.pending) == 4
    # A member may not grant; nor may anyone in an open run.
    refused_unchanged(swarm, Authorize(key=client_key(9)), client_key(0), Unauthorized)
    open_run = new_swarm()
    refused_unchanged(open_run, Authorize(key=client_key(9)), AUTH, InvalidRunState)
    swarm.run_until(lambda c: c.state.step > 3)
    assert {member(swarm.coord.state, client_key(i)).state for i in range(4)} == {ClientState.Healthy}
    # The log replays to the same state on any host (the server and Solana hosts do just that).
    other = Coordinator.new("access", swarm.coord.state.settings, authority=AUTH, now=0)
    assert all(e is None for e in replay(other, swarm.log)) and other.digest() == swarm.coord.digest()


def test_grants_expire_and_an_authorizer_grants_only_for_its_own_term():
    swarm = new_swarm(access="gated")
    swarm.now = 10
    deputy, newcomer, other = client_key(20), client_key(21), client_key(22)
    refused_unchanged(swarm, Delegate(key=deputy, expires_at=100), client_key(0), Unauthorized)
    assert swarm.submit(Delegate(key=deputy, expires_at=100), AUTH) is None
    # An authorizer's grants must end, and no later than its delegation.
    refused_unchanged(swarm, Authorize(key=newcomer), deputy, Unauthorized)
    refused_unchanged(swarm, Authorize(key=newcomer, expires_at=101), deputy, Unauthorized)
    refused_unchanged(swarm, Authorize(key=newcomer, expires_at=swarm.now), deputy, InvalidInstruction)
    assert swarm.submit(Authorize(key=newcomer, expires_at=50), deputy) is None
    assert swarm.submit(Authorize(key=other, expires_at=100), deputy) is None
    assert swarm.submit(Join(p2p_address="n"), newcomer) is None
    # Past its term a grant no longer lets anyone in...
    swarm.now = 50
    refused_unchanged(swarm, Join(p2p_address="o"), client_key(23), Unauthorized)
    assert swarm.submit(Join(p2p_address="o"), other) is None
    swarm.now = 60
    refused_unchanged(swarm, Join(p2p_address="n"), newcomer, Unauthorized)
    # ... and a key whose grant lapsed while it waited is not admitted to the epoch.
    assert access.admitted(swarm.coord.state, [], swarm.now) == [other]
    # Past the deputy's own term, it grants nothing.
    swarm.now = 100
    refused_unchanged(swarm, Authorize(key=client_key(24), expires_at=150), deputy, Unauthorized)


def test_revoking_a_member_ejects_it_at_the_end_of_the_round_without_points():
    swarm = new_swarm(access="gated")
    for i in range(5):
        swarm.submit(Authorize(key=client_key(i)), AUTH)
    swarm.join(range(5))
    swarm.run_until(lambda c: training(c) and c.state.step >= 3)
    deputy = client_key(30)
    swarm.submit(Delegate(key=deputy), AUTH)
    assert swarm.submit(Revoke(key=client_key(4)), deputy) is None
    assert member(swarm.coord.state, client_key(4)).state is ClientState.Ejected
    refused_unchanged(swarm, Join(p2p_address="again"), client_key(4), Unauthorized)
    # Only the authority takes back a delegation; a revoked deputy grants nothing.
    refused_unchanged(swarm, Revoke(key=client_key(99)), AUTH, NotAMember)
    assert swarm.submit(Revoke(key=deputy), AUTH) is None
    refused_unchanged(swarm, Authorize(key=client_key(5), expires_at=swarm.now + 10), deputy, Unauthorized)
    epoch = swarm.coord.state.epoch
    swarm.run_until(lambda c: c.state.epoch > epoch and training(c))
    s = swarm.coord.state
    assert member(s, client_key(4)) is None
    assert points(s)[client_key(4)] == 0 and all(points(s)[client_key(i)] > 0 for i in range(4))


# --- an open run under a flood ------------------------------------------------------------------


def flood(swarm: Swarm, keys: range) -> None:
    """Fresh keys join and never act again (as a flooder's keys would)."""
    for k in keys:
        assert swarm.submit(Join(p2p_address=f"flood-{k}"), client_key(k)) is None


def test_a_flood_of_fresh_keys_displaces_no_member_and_lets_a_newcomer_in():
    swarm = new_swarm()
    swarm.join(range(4))
    swarm.run_until(lambda c: c.state.epoch == 1 and training(c))
    members = [c.id for c in swarm.coord.state.clients]
    earned = points(swarm.coord.state)
    assert all(earned[m] > 0 for m in members)
    flood(swarm, range(1000, 2000))  # 1,000 fresh keys, never answered again
    s = swarm.coord.state
    assert len(s.pending) == access.MAX_PENDING and len(s.accounts) <= MAX_ACCOUNTS
    assert [c.id for c in s.clients] == members
    assert all(c.state is ClientState.Healthy for c in s.clients)
    newcomer = client_key(50)
    swarm.join([50])  # an honest newcomer, after the flood
    assert newcomer in swarm.coord.state.pending
    epoch = s.epoch
    swarm.run_until(lambda c: c.state.epoch > epoch and training(c))
    s = swarm.coord.state
    ids = [c.id for c in s.clients]
    # Every training member is carried into the next epoch, the newcomer is in, and fresh
    # keys came in bounded numbers: the members and the newcomer keep the run training.
    assert ids[:4] == members and newcomer in ids
    assert len(ids) <= 4 + access.MIN_NEWCOMERS
    assert s.pending == []  # the flood's joins were good for that epoch only
    step = s.step
    swarm.run_until(lambda c: c.state.step >= step + 6)
    s = swarm.coord.state
    assert all(member(s, k).state is ClientState.Healthy for k in [*members, newcomer])
    flooders = [c for c in s.clients if c.id not in (*members, newcomer)]
    assert flooders and all(c.state is ClientState.Dropped for c in flooders)
    # Every member's points survived the flood, and the accounts stayed within their bound.
    assert all(points(s)[m] >= earned[m] for m in members) and len(s.accounts) <= MAX_ACCOUNTS


def test_idle_accounts_that_never_earned_are_recycled_but_earned_ones_never():
    swarm = new_swarm()
    swarm.join(range(4))
    swarm.run_until(lambda c: c.state.epoch == 1 and training(c))
    flood(swarm, range(1000, 1000 + MAX_ACCOUNTS + 200))  # more fresh keys than accounts
    s = swarm.coord.state
    assert len(s.accounts) == MAX_ACCOUNTS
    held = {a.id for a in s.accounts}
    assert all(client_key(i) in held for i in range(4))  # members' accounts (with points) stay
    assert client_key(1000) not in held  # the first fresh key, idle longest, was recycled
    assert set(s.pending) <= held


def test_a_waiting_list_of_contributors_refuses_rather_than_evicts():
    swarm = new_swarm()
    flood(swarm, range(1000, 1000 + access.MAX_PENDING))
    for a in swarm.coord.state.accounts:
        a.points = 1  # as if every waiting key had earned points before
    message = refused_unchanged(swarm, Join(p2p_address="late"), client_key(7), RunFull)
    assert "earned points" in message


def test_an_open_run_takes_no_grants_and_keys_must_be_32_bytes():
    swarm = new_swarm(access="gated")
    refused_unchanged(swarm, Authorize(key=b"short"), AUTH, InvalidInstruction)
    refused_unchanged(swarm, Authorize(key=client_key(1), expires_at=-1), AUTH, InvalidInstruction)
    refused_unchanged(swarm, Delegate(key=AUTH), AUTH, InvalidInstruction)


@pytest.mark.parametrize("limit, what", [(access.MAX_AUTHORIZERS, "authorizers")])
def test_delegations_are_bounded(limit, what):
    swarm = new_swarm(access="gated")
    for i in range(limit):
        assert swarm.submit(Delegate(key=client_key(100 + i)), AUTH) is None
    message = refused_unchanged(swarm, Delegate(key=client_key(999)), AUTH, RunFull)
    assert what in message
