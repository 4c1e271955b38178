"""The Solana ledger host on an in-process chain (LiteSVM): program, replay, ledger."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.transaction import Transaction

from psyche.coordinator import (
    Coordinator,
    CoordinatorSettings,
    Join,
    Pause,
    RunState,
    Witness,
    encode_instruction,
    replay,
)
from psyche.ledger.base import InstructionRefused
from psyche.ledger.solana.build import build_program
from psyche.ledger.solana.chain import ChainRefused, SvmChain
from psyche.ledger.solana.ledger import RunSync, SolanaLedger, create_run, send_instruction
from psyche.ledger.solana.sbf_link import LinkError, link
from psyche.ledger.solana.wire import (
    DEFAULT_PROGRAM_ID,
    KIND_CREATE_RUN,
    KIND_SUBMIT,
    PROGRAM_ERRORS,
    create_run_data,
    parse_envelope,
    run_address,
    submit_data,
    submit_instruction,
)
from psyche.testing.solana_swarm import ChainSwarm

FAST = CoordinatorSettings(warmup_time=2, cooldown_time=1, max_round_train_time=3, round_witness_time=1,
                           epoch_time=1000, total_steps=3, init_min_clients=3, min_clients=3,
                           waiting_for_members_extra_time=1)


def run(coro):
    return asyncio.run(coro)


# -- wire format and linker (pure) ---------------------------------------------

run_ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)


@given(run_id=run_ids, genesis=st.binary(max_size=200), lamports=st.integers(0, 2**64 - 1))
def test_create_run_envelope_roundtrips(run_id: str, genesis: bytes, lamports: int) -> None:
    env = parse_envelope(create_run_data(run_id, genesis, lamports=lamports))
    assert (env.kind, env.run_id, env.payload) == (KIND_CREATE_RUN, run_id, genesis)
    assert env.run == bytes(run_address(run_id)[0])


@given(payload=st.binary(max_size=300))
def test_submit_envelope_roundtrips(payload: bytes) -> None:
    address = run_address("r")[0]
    env = parse_envelope(submit_data(address, payload))
    assert (env.kind, env.run, env.payload) == (KIND_SUBMIT, bytes(address), payload)


@given(data=st.binary(max_size=36))
def test_short_envelopes_do_not_parse(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_envelope(data)


def test_linker_refuses_what_it_cannot_place() -> None:
    with pytest.raises(LinkError):
        link(b"not an elf" + bytes(100))
    elf = build_program().read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[18] == 247  # EM_BPF


# -- the program ------------------------------------------------------------------

@pytest.fixture
def world():
    chain = SvmChain()
    authority, member, stranger = Keypair(), Keypair(), Keypair()
    for kp in (authority, member, stranger):
        run(chain.airdrop(kp.pubkey(), 10**10))
    run(create_run(chain, authority, "run-b", FAST, config_digest="cfg"))
    return chain, authority, member, stranger


def _send(chain, kp, ix, **kw):
    return run(send_instruction(chain, kp, ix, **kw))


@pytest.mark.parametrize("data,code", [
    (b"PSY", 3),                       # shorter than the envelope
    (b"XSY\x01\x01" + bytes(32), 4),   # bad magic
    (b"PSY\x01\x07" + bytes(32), 5),   # unknown kind
    (b"PSY\x01\x01" + bytes(32), 6),   # names another run account
])
def test_program_rejects_malformed_data(world, data: bytes, code: int) -> None:
    chain, _, member, _ = world
    address = run_address("run-b")[0]
    ix = Instruction(DEFAULT_PROGRAM_ID, data, [AccountMeta(member.pubkey(), True, False), AccountMeta(address, False, True)])
    with pytest.raises(ChainRefused) as refused:
        _send(chain, member, ix)
    assert refused.value.program_error == code, PROGRAM_ERRORS.get(code)
    # Without preflight it lands, failed: on chain, and ignored by the replay.
    before = RunSync(chain, "run-b")
    run(before.sync())
    sig, _slot, err = _send(chain, member, ix, skip_preflight=True)
    assert err is not None
    after = RunSync(chain, "run-b")
    run(after.sync())
    assert after.replay.outcomes[sig][0].error == "TransactionFailed"
    assert after.replay.coordinator.digest() == before.replay.coordinator.digest()


def test_program_requires_the_participant_signature(world) -> None:
    chain, _, member, stranger = world
    address = run_address("run-b")[0]
    # The stranger pays and signs; the instruction claims the member as participant without its signature.
    ix = Instruction(DEFAULT_PROGRAM_ID, submit_data(address, encode_instruction(Join(p2p_address="x"))),
                     [AccountMeta(member.pubkey(), False, False), AccountMeta(address, False, True)])
    with pytest.raises(ChainRefused) as refused:
        _send(chain, stranger, ix)
    assert refused.value.program_error == 2


def test_run_cannot_be_created_twice(world) -> None:
    chain, _, member, _ = world
    with pytest.raises(InstructionRefused) as refused:
        run(create_run(chain, member, "run-b", FAST))
    assert refused.value.error == "RunExists"


# -- replay: what is confirmed but changes nothing ----------------------------------

def test_invalid_instructions_are_confirmed_and_ignored_by_every_replay(world) -> None:
    chain, authority, member, stranger = world
    run(create_run(chain, authority, "run-a", FAST))
    a_member = SolanaLedger(chain, "run-a", member, auto_tick=False)
    run(a_member.submit(Join(p2p_address="on-a")))
    b_member = SolanaLedger(chain, "run-b", member, auto_tick=False)
    run(b_member.submit(Join(p2p_address="on-b")))
    good = run(b_member.state()).digest()

    b_stranger = SolanaLedger(chain, "run-b", stranger, auto_tick=False)
    # 1. a non-member's instruction (only members and the authority may do this)
    with pytest.raises(InstructionRefused) as refused:
        run(b_stranger.submit(Pause()))
    assert refused.value.error == "Unauthorized"
    witness = Witness(step=1, participant_bloom=b"", broadcast_bloom=b"", broadcast_merkle=bytes(32), loss=1.0,
                      tokens_per_sec=1.0, bandwidth_bytes=0)
    with pytest.raises(InstructionRefused):
        run(b_stranger.submit(witness))
    # 2. a malformed instruction: confirmed on chain, decodes to nothing
    outcomes = run(b_member.submit_payload(b"\x01\xff\x00garbage"))
    assert [o.error for o in outcomes] == ["Malformed"]
    # 3. an instruction replayed from run A: its exact transaction cannot land again, its envelope
    #    does not fit run B's account, and its bytes re-signed into run B are refused there.
    a_tx = next(t for t in a_member.sync.fetched if t.instructions[0].accounts[0] == member.pubkey())
    a_data = a_tx.instructions[0].data
    b_address = run_address("run-b")[0]
    ix = Instruction(DEFAULT_PROGRAM_ID, a_data, [AccountMeta(member.pubkey(), True, False), AccountMeta(b_address, False, True)])
    sig, _slot, err = _send(chain, member, ix, skip_preflight=True)
    assert err is not None and "Custom(6)" in err  # RunMismatch
    outcomes = run(b_member.submit_payload(a_data[37:]))  # run A's Join bytes, re-signed for B: already a member
    assert outcomes[0].instruction == "Join"

    for replay in (RunSync(chain, "run-b"), RunSync(chain, "run-b")):
        assert run(replay.verify()) is True
        coord = replay.replay.coordinator
        assert replay.replay.outcomes[sig][0].error == "TransactionFailed"
        assert coord.is_member(bytes(member.pubkey())) and not coord.is_member(bytes(stranger.pubkey()))
    first, second = RunSync(chain, "run-b"), RunSync(chain, "run-b")
    run(first.sync()), run(second.sync())
    assert first.replay.coordinator.digest() == second.replay.coordinator.digest()
    assert first.replay.coordinator.state.run_state is RunState.WaitingForMembers
    # Only the second Join changed something (the p2p address); the invalid ones left no trace.
    assert good != first.replay.coordinator.digest()


def test_exact_transaction_cannot_be_replayed(world) -> None:
    chain, _, member, _ = world
    tx = Transaction([member], Message([submit_instruction(member.pubkey(), run_address("run-b")[0],
                                                           encode_instruction(Join(p2p_address="x")))],
                                       member.pubkey()), run(chain.latest_blockhash()))
    run(chain.send(tx))
    with pytest.raises(ChainRefused, match="already been processed"):
        run(chain.send(tx))


# -- whole runs --------------------------------------------------------------------

def test_whole_run_through_transactions_and_restart_mid_run() -> None:
    swarm = ChainSwarm("whole", FAST, clients=3)
    swarm.join(range(3))
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundWitness, max_seconds=200)
    chain = SvmChain(swarm.validator, auto_confirm=False)
    # A client restarted mid-run rebuilds the state from the chain alone.
    restarted = SolanaLedger(chain, "whole", swarm_keypair_of(swarm, 0), auto_tick=False)
    assert run(restarted.state()).digest() == swarm.coord.digest()
    swarm.run_until(lambda c: c.state.run_state is RunState.Finished, max_seconds=500)
    assert swarm.coord.state.step > FAST.total_steps
    late = SolanaLedger(chain, "whole", Keypair(), auto_tick=False)
    assert run(late.state()).digest() == swarm.coord.digest() == run(restarted.state()).digest()
    assert run(late.sync.verify()) is True
    applied = [o for outs in late.sync.replay.outcomes.values() for o in outs if o.applied]
    assert {o.instruction for o in applied} >= {"CreateRun", "Join", "WarmupWitness", "Witness", "Tick", "Checkpoint"}
    # The chain's entries (block time, seed from the block hash) replay like any host's log.
    genesis = Coordinator.new("whole", FAST, bytes(swarm.authority.pubkey()), now=1_700_000_000)
    assert all(err is None for err in replay(genesis, swarm.log))
    assert genesis.digest() == swarm.coord.digest()


def swarm_keypair_of(swarm: ChainSwarm, i: int) -> Keypair:
    from psyche.testing.solana_swarm import swarm_keypair

    return swarm_keypair(i)


def test_members_tick_when_a_deadline_passes(world) -> None:
    chain, authority, member, _ = world
    clock = {"t": 1_800_000_000.0}
    chain.validator.clock = lambda: clock["t"]
    chain.validator.end_slot()
    settings = CoordinatorSettings(warmup_time=2, cooldown_time=1, max_round_train_time=3, round_witness_time=1,
                                   epoch_time=1000, total_steps=3, init_min_clients=1, min_clients=1,
                                   waiting_for_members_extra_time=1)
    run(create_run(chain, authority, "ticks", settings))
    ledger = SolanaLedger(chain, "ticks", member, tick_stagger=0.0)
    run(ledger.submit(Join(p2p_address="m")))
    assert run(ledger.state()).state.run_state is RunState.WaitingForMembers
    assert run(ledger.tick_if_due()) is False  # deadline not reached
    clock["t"] += 5
    chain.validator.end_slot()
    chain.validator.end_slot()  # a confirmed block at the new time: the chain's clock moved
    assert run(ledger.tick_if_due()) is True
    assert run(ledger.state()).state.run_state is RunState.Warmup
