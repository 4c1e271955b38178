"""Fuzzing every decoder that reads bytes from the network (issue 17, "Fuzz every surface").

Each decoder gets random bytes and mutations of valid encodings built with the matching
encoder: bit flips, byte changes, truncations, extensions, deletions, duplications,
splices with other valid encodings, and headers that claim far more than follows (a
msgpack array of 2**32-1 items, a varint of 2**63, deep nesting). It must decode or
raise its documented error, nothing else (no IndexError, KeyError, struct.error,
OverflowError, MemoryError or RecursionError), and where a decoded value goes on
(an instruction to the coordinator, a signed request to its host, a peer's envelope to
gossip) it must be refused or applied cleanly there too. The DisTrO payload, whose
headers choose shapes and index tables, is also held to a tracemalloc bound.

The surfaces, each with its documented error:

- coordinator instructions (``decode_instruction``: ``ValueError``), then ``Coordinator.apply``
  (a ``CoordinatorError`` returned, never raised); coordinator states (``decode_state``) and
  the Bloom filters inside witness reports (``ValueError``);
- the server's signed request envelope (``open_request``: ``ValueError``, and nothing it accepts
  differs from what was signed) and its report bodies (``decode_report``: ``ValueError``);
- the client's reading of the server's answers (``ServerLedger``: ``InstructionRefused`` /
  ``LedgerUnavailable`` for refusals, ``ValueError`` for a body that is not a state or JSON;
  a malformed message on the state feed is dropped and counted);
- P2P envelopes, messages, frames and manifests (``msgspec.DecodeError``, ``ValueError`` for a
  manifest's sizes), gossip admission (never raises: every envelope gets one verdict);
- DisTrO payloads and results (``ValueError``), with bounded memory;
- Solana instruction data, genesis, return data and run accounts (``ValueError``) and their
  replay (an ``Outcome``, or ``ReplayError`` for an entry the program could not have recorded).

Sizes: ``EXAMPLES`` per test (``PSYCHE_FULL=1`` ten times as many), derandomized so a failure
reproduces; the file takes about 20 s on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from solders.pubkey import Pubkey
from solders.signature import Signature

from psyche.coordinator import BloomFilter, Coordinator, CoordinatorError, CoordinatorSettings, HealthCheck, Join
from psyche.coordinator import Pause, Resume, RunState, Tick, Withdraw, decode_instruction, encode_instruction
from psyche.coordinator.state import decode_state, encode_state
from psyche.distro import DCTCodec, ResultLayout, decode_payload, encode_payload
from psyche.distro.codec import SparseResult, _put_uvarint
from psyche.identity import Identity
from psyche.ledger.base import InstructionRefused, LedgerError, LedgerUnavailable
from psyche.ledger.envelope import SignedRequest, open_request, sign_request
from psyche.ledger.remote import ServerLedger
from psyche.ledger.server import decode_report
from psyche.ledger.solana.chain import ChainTx, TopInstruction
from psyche.ledger.solana.replay import Outcome, ReplayError, RunReplay
from psyche.ledger.solana.wire import (
    DEFAULT_PROGRAM_ID,
    RunAccount,
    create_run_data,
    decode_genesis,
    encode_genesis,
    parse_envelope,
    parse_return_data,
    run_address,
    submit_data,
)
from psyche.p2p.gossip import Gossip
from psyche.p2p.model import RawTensor, build_manifest, decode_manifest
from psyche.p2p.wire import (
    DataHeader,
    Finished,
    GetBlob,
    GetManifest,
    GetPart,
    Heartbeat,
    Push,
    PushAck,
    ResultCommitment,
    SignedMessage,
    decode_envelope,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
    frame_length,
)
from psyche.testing.coordinator_swarm import Swarm, client_key
from tests.fuzzing import decodes_or_refuses, fuzzed

EXAMPLES = 3000 if os.environ.get("PSYCHE_FULL") == "1" else 300
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
"""Every test here: a fixed number of examples from a fixed seed (a failure reproduces as is)."""

RUN = "fuzz-run"
AUTH = b"\xaa" * 32

# --- valid encodings --------------------------------------------------------------------------


@functools.cache
def swarm_run() -> tuple[list[bytes], list[bytes], bytes]:
    """Instruction bodies and states of a small honest run, and a mid-round state to apply to."""
    coord = Coordinator.new(RUN, CoordinatorSettings(
        warmup_time=10, cooldown_time=5, max_round_train_time=10, round_witness_time=2, epoch_time=30,
        total_steps=6, init_min_clients=3, min_clients=2, witness_nodes=2, global_batch_size_start=12,
        global_batch_size_end=12, waiting_for_members_extra_time=2, checkpointers=1, seq_len=8), authority=AUTH, now=0)
    swarm = Swarm(coord)
    states = [coord.to_bytes()]
    swarm.join(range(4))
    mid_round = b""
    while swarm.coord.state.run_state is not RunState.Finished and swarm.now < 400:
        swarm.act()
        swarm.advance(1)
        states.append(swarm.coord.to_bytes())
        if swarm.coord.state.step == 3 and swarm.coord.state.run_state is RunState.RoundTrain and not mid_round:
            mid_round = swarm.coord.to_bytes()
    assert mid_round, "the swarm never reached step 3"
    bodies = {e.body for e in swarm.log}
    bodies |= {encode_instruction(i) for i in (Pause(), Resume(), Withdraw(), Tick(), Join(p2p_address="x" * 300),
                                               HealthCheck(step=2, accused=[client_key(1), client_key(2)]))}
    return sorted(bodies), sorted(set(states)), mid_round


# --- coordinator: instructions, states, Bloom filters -----------------------------------------


@fuzz
@given(st.data())
def test_instructions_decode_or_raise_value_error_and_apply_cleanly(data):
    bodies, _, mid_round = swarm_run()
    _, raw = fuzzed(data, bodies)
    instr = decodes_or_refuses(decode_instruction, raw, ValueError)
    if instr is None:
        return
    assert decode_instruction(encode_instruction(instr)) == instr
    # What decodes reaches the coordinator: it refuses (returned, state untouched) or applies.
    coord = Coordinator.from_bytes(mid_round)
    signer = data.draw(st.sampled_from([client_key(0), client_key(1), client_key(9), AUTH]), label="signer")
    err = coord.apply(instr, signer, 200, bytes(32))
    if err is not None:
        assert isinstance(err, CoordinatorError) and coord.to_bytes() == mid_round


@fuzz
@given(st.data())
def test_states_decode_or_raise_value_error(data):
    _, states, _ = swarm_run()
    _, raw = fuzzed(data, states)
    state = decodes_or_refuses(decode_state, raw, ValueError)
    if state is not None:
        assert decode_state(encode_state(state)) == state


@fuzz
@given(st.data())
def test_bloom_filters_decode_or_raise_value_error(data):
    corpus = [BloomFilter.for_items([bytes([i]) * 32 for i in range(n)]).to_bytes() for n in (0, 1, 5, 40)]
    _, raw = fuzzed(data, corpus)
    bloom = decodes_or_refuses(BloomFilter.from_bytes, raw, ValueError)
    if bloom is not None:
        assert BloomFilter.from_bytes(bloom.to_bytes()) == bloom


# --- the server's signed requests and report bodies ------------------------------------------

SIGNER = Identity(bytes(range(32)))


@functools.cache
def signed_requests() -> list[bytes]:
    bodies, _, _ = swarm_run()
    out = [sign_request(SIGNER, RUN, "instruction", body, nonce=1_700_000_000_000_000 + i)
           for i, body in enumerate(bodies[:6])]
    out.append(sign_request(SIGNER, RUN, "report", json.dumps({"step": 3, "loss": 2.5}).encode(), nonce=7))
    return out


@fuzz
@given(st.data())
def test_signed_requests_open_or_raise_value_error_and_cannot_be_forged(data):
    _, raw = fuzzed(data, signed_requests())
    kind = data.draw(st.sampled_from(["instruction", "report"]), label="kind")
    req = decodes_or_refuses(lambda b: open_request(b, run_id=RUN, kind=kind), raw, ValueError)
    if req is not None:
        # Only what the signer signed opens: a mutation may re-encode a request or splice in
        # another whole one, never change what is signed.
        assert req in [msgspec.msgpack.decode(b, type=SignedRequest) for b in signed_requests()]


@fuzz
@given(st.data())
def test_report_bodies_decode_or_raise_value_error(data):
    corpus = [json.dumps(r).encode() for r in ({"step": 3, "loss": 2.5, "tokens": 4096}, {"step": 0}, {"step": 2**62})]
    _, raw = fuzzed(data, corpus)
    report = decodes_or_refuses(decode_report, raw, ValueError)
    if report is not None:
        assert isinstance(report, dict) and 0 <= report["step"] < 2**63


# --- the client reading the server's answers --------------------------------------------------


def ledger_answering(status: int, body: bytes) -> ServerLedger:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    return ServerLedger("http://coordinator.test", RUN, SIGNER, transport=transport)


async def _ask(ledger: ServerLedger, what: str) -> Any:
    try:
        if what == "submit":
            return await ledger.submit(Tick())
        if what == "state":
            return await ledger.state()
        return await ledger.status()
    finally:
        await ledger.close()


@fuzz
@given(st.data())
def test_client_reads_any_answer_as_a_result_or_a_named_error(data):
    _, states, _ = swarm_run()
    refusal = json.dumps({"error": "NotAMember", "message": "only members"}).encode()
    _, body = fuzzed(data, [refusal, states[-1], b'{"run_id": "fuzz-run", "step": 3}'])
    # (A 429 is not among them: the client waits it out and asks again, by design.)
    status = data.draw(st.sampled_from([200, 200, 400, 403, 404, 408, 409, 413, 422, 500, 503]), label="status")
    what = data.draw(st.sampled_from(["submit", "state", "status"]), label="call")
    try:
        got = asyncio.run(_ask(ledger_answering(status, body), what))
    except LedgerError as exc:
        assert status != 200
        assert isinstance(exc, LedgerUnavailable if status >= 500 else InstructionRefused)
    except ValueError as exc:  # a 200 whose body is not a state (state) or not JSON (status)
        assert status == 200 and what != "submit" and str(exc)
    else:
        assert status == 200
        if what == "state":
            assert isinstance(got, Coordinator)


def test_a_malformed_state_on_the_feed_is_dropped_and_the_feed_opened_again():
    import websockets.asyncio.server

    from psyche.localports import free_port

    from psyche.ledger import remote

    _, states, _ = swarm_run()
    state = states[-1]
    # The feed's wire form: the state's bytes, zlib-compressed where the client inflates them.
    good = zlib.compress(state) if hasattr(remote, "inflate") else state
    flipped = bytearray(good)
    flipped[0] ^= 0xFF  # the msgpack array's header, or zlib's
    garbage = [b"\x00garbage", good[: len(good) // 2], bytes(flipped), b"\xdd\xff\xff\xff\xff"]

    async def main() -> Coordinator:
        sent = iter(garbage)

        async def feed(ws: Any) -> None:
            await ws.send(next(sent, good))  # one garbage message per connection, then the state
            await ws.wait_closed()

        port = free_port()
        async with websockets.asyncio.server.serve(feed, "127.0.0.1", port):
            ledger = ServerLedger(f"http://127.0.0.1:{port}", RUN, SIGNER)
            try:
                watch = ledger.watch()
                coord = await asyncio.wait_for(anext(watch), 20)
                await watch.aclose()
            finally:
                await ledger.close()
            assert ledger.malformed_states == len(garbage)
            return coord

    assert asyncio.run(main()).to_bytes() == state


# --- P2P: envelopes, messages, frames, manifests, gossip admission ----------------------------

PEERS = [Identity(bytes([i + 1]) * 32) for i in range(3)]
P2P_MESSAGES = [
    ResultCommitment(run_id=RUN, step=4, batch_start=0, batch_end=12, blob_hash=bytes(range(32)), size=4096),
    Finished(run_id=RUN, step=4, phase="witness"),
    Heartbeat(run_id=RUN, step=5),
]
ENVELOPES = [SignedMessage.create(PEERS[i % 3], m).encode() for i, m in enumerate(P2P_MESSAGES)]
FRAMES = [encode_frame(f)[4:] for f in (Push(ENVELOPES), PushAck(3), GetBlob(bytes(32), 1 << 20), GetManifest(),
                                        GetPart(bytes(32), "tensor", "w", 2), DataHeader("ok", 99), DataHeader("missing"))]
MANIFESTS = [build_manifest({"w": RawTensor("F32", (4, 8), bytes(128)), "b": RawTensor("BF16", (3,), bytes(6))},
                            {"config.json": b"{}"}, part_size=part).encode() for part in (16, 1000)]
P2P_DECODE_ERRORS = msgspec.DecodeError  # msgspec.ValidationError is one


@fuzz
@given(st.data())
def test_p2p_envelopes_and_messages_decode_or_raise_decode_error(data):
    _, raw = fuzzed(data, ENVELOPES + [encode_message(m) for m in P2P_MESSAGES])
    env = decodes_or_refuses(decode_envelope, raw, P2P_DECODE_ERRORS)
    if env is not None:
        decodes_or_refuses(decode_message, env.body, P2P_DECODE_ERRORS)
    decodes_or_refuses(decode_message, raw, P2P_DECODE_ERRORS)


@fuzz
@given(st.data())
def test_p2p_frames_and_manifests_decode_or_raise_their_errors(data):
    _, raw = fuzzed(data, FRAMES + MANIFESTS)
    frame = decodes_or_refuses(decode_frame, raw, P2P_DECODE_ERRORS)
    if frame is not None:
        assert decode_frame(encode_frame(frame)[4:]) == frame
    decodes_or_refuses(decode_manifest, raw, (P2P_DECODE_ERRORS, ValueError))
    n = decodes_or_refuses(frame_length, raw[:4], ValueError)
    assert n is None or 0 <= n <= 16 << 20


@fuzz
@given(st.data())
def test_gossip_admits_or_drops_every_envelope_and_never_raises(data):
    gossip = Gossip(local_id=PEERS[0].public_key, run_id=RUN)
    gossip.set_members({p.public_key for p in PEERS}, now=0.0)
    _, raw = fuzzed(data, ENVELOPES)
    verdict = gossip.receive(raw, from_peer=PEERS[1].public_key, now=1.0)
    assert sum(gossip.counters.values()) == 1  # one verdict, counted
    if verdict.delivery is not None:  # only what a sender signed gets through
        assert verdict.delivery.message in P2P_MESSAGES


# --- DisTrO payloads ---------------------------------------------------------------------------

SHAPES = [(16, 24), (40,), (3, 5, 7), (2,)]
CODECS = [(8, 3), (8, 3), (4, 2), (8, 3)]
VARIANTS = ((False, torch.float32), (True, torch.float32), (False, torch.bfloat16))


def layouts(one_bit: bool, dtype: torch.dtype) -> list[ResultLayout]:
    return [ResultLayout(shape, dtype, chunk, topk, one_bit) for shape, (chunk, topk) in zip(SHAPES, CODECS)]


@functools.cache
def payloads() -> list[bytes]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for one_bit, dtype in VARIANTS:
        results = [DCTCodec(chunk).encode(torch.randn(shape, generator=gen).to(dtype), topk, one_bit=one_bit)
                   for shape, (chunk, topk) in zip(SHAPES, CODECS)]
        out.append(encode_payload(results))
    return out


def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak Python and numpy memory (tracemalloc) while ``fn`` runs, whatever it raises."""
    tracemalloc.start()
    try:
        fn()
    except ValueError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


PAYLOAD_PEAK = 1 << 20
"""What decoding any of these payloads (a few hundred bytes) may take at its peak: 1 MiB."""


@fuzz
@given(st.data())
def test_payloads_decode_or_raise_value_error_in_bounded_memory(data):
    corpus = payloads()
    variant = data.draw(st.integers(0, len(VARIANTS) - 1))
    expected = layouts(*VARIANTS[variant])
    decode_payload(corpus[variant], expected)  # index tables cached before measuring
    _, raw = fuzzed(data, corpus)
    results = decodes_or_refuses(lambda b: decode_payload(b, expected), raw, ValueError)
    if results is not None:
        assert encode_payload(results) == raw  # anything accepted is canonical
    assert _peak_bytes(lambda: decode_payload(raw, expected)) < PAYLOAD_PEAK


@fuzz
@given(st.data())
def test_results_decode_or_raise_value_error(data):
    blobs = [r.to_bytes() for p, v in zip(payloads(), VARIANTS) for r in decode_payload(p, layouts(*v))]
    _, raw = fuzzed(data, blobs)
    result = decodes_or_refuses(SparseResult.from_bytes, raw, ValueError)
    if result is not None:
        assert result.to_bytes() == raw


def _result_header(chunk: int, topk: int, shape: list[int], body: bytes = b"") -> bytes:
    out = bytearray([2, 0, 1])  # version 2, not one-bit, float32
    for v in (chunk, topk, len(shape), *shape):
        _put_uvarint(out, v)
    return bytes(out) + body


PRIME = 1_099_511_627_689  # the largest prime below 2**40


def test_a_payload_for_other_layouts_is_refused_before_its_bodies_are_read():
    # A payload sends no shapes: one made for another model, or another (chunk, topk), or a
    # hostile one, is told apart by its layout tag, and nothing is sized by its bytes.
    payload = payloads()[0]
    mine = layouts(False, torch.float32)
    for other in ([ResultLayout((1 << 20, 1 << 20), torch.float32, 64, 8, False)] + mine[1:],
                  mine[:3], [ResultLayout(SHAPES[0], torch.float32, 8, 4, False)] + mine[1:],
                  layouts(True, torch.float32)):
        with pytest.raises(ValueError, match="other parameters or codec settings"):
            decode_payload(payload, other)
        assert _peak_bytes(lambda: decode_payload(payload, other)) < PAYLOAD_PEAK
    with pytest.raises(ValueError, match="version 1"):
        decode_payload(b"PDP\x01" + payload[4:], mine)  # the format before headers were dropped


@pytest.mark.parametrize(("blob", "message"), [
    (_result_header(64, 8, [1 << 21, 1 << 20]), "exceeds"),  # more than 2**40 elements
    (_result_header(64, 8, [1 << 20, 1 << 20]), "body is 0 bytes"),  # 2**40 elements claimed by 11 bytes
])
def test_hostile_result_headers_are_refused_cheaply(blob, message):
    with pytest.raises(ValueError, match=message):
        SparseResult.from_bytes(blob)
    assert _peak_bytes(lambda: SparseResult.from_bytes(blob)) < PAYLOAD_PEAK


def test_a_result_with_a_prime_dimension_just_above_its_chunk_is_refused_quickly():
    # Without a payload around it: tiling a 2**40-ish prime with a chunk just below it took
    # ~2**40 steps to find the divisor 1; now about 2·sqrt(n).
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="body is 0 bytes"):
        SparseResult.from_bytes(_result_header(PRIME - 1, 1, [PRIME]))
    assert time.perf_counter() - t0 < 5


# --- Solana: instruction data, genesis, return data, accounts, replay -------------------------

SOLANA_SIGNER = Pubkey(bytes(range(1, 33)))


@functools.cache
def solana_corpus() -> tuple[bytes, list[bytes], list[bytes]]:
    """A create-run instruction's data, submit instructions' data, and genesis payloads."""
    bodies, _, _ = swarm_run()
    settings_ = CoordinatorSettings(init_min_clients=2, total_steps=5, seq_len=8)
    genesis = [encode_genesis(settings_, "ab" * 32), encode_genesis(CoordinatorSettings(), "")]
    create = create_run_data(RUN, genesis[0], lamports=10**9)
    address = run_address(RUN)[0]
    return create, [submit_data(address, b) for b in bodies[:8]], genesis


def _tx(data: bytes, n: int) -> ChainTx:
    address = run_address(RUN)[0]
    return ChainTx(Signature(bytes([n]) * 64), n, 1_000 + n, False, None,
                   [TopInstruction(DEFAULT_PROGRAM_ID, [SOLANA_SIGNER, address], data)], None, None, 5000, 300)


@fuzz
@given(st.data())
def test_solana_wire_decoders_raise_value_error_only(data):
    create, submits, genesis = solana_corpus()
    _, raw = fuzzed(data, [create, *submits, *genesis, bytes(40), b"PYRUNS01" + bytes(104)])
    decodes_or_refuses(parse_envelope, raw, ValueError)
    decodes_or_refuses(parse_return_data, raw, ValueError)
    decodes_or_refuses(RunAccount.parse, raw, ValueError)
    g = decodes_or_refuses(decode_genesis, raw, ValueError)
    if g is not None:  # what a create-run would do with it
        decodes_or_refuses(lambda _: Coordinator.new(RUN, g.settings, authority=AUTH, now=0), raw, ValueError)


def test_a_create_run_that_ends_at_its_envelope_is_refused():
    # Found by this file's fuzzing (PSYCHE_FULL=1): an IndexError reading the run id's length.
    with pytest.raises(ValueError, match="ends before its run id"):
        parse_envelope(b"PSY\x01\x00" + bytes(32))


@fuzz
@given(st.data())
def test_replay_of_fuzzed_entries_gives_an_outcome_or_a_replay_error(data):
    create, submits, genesis = solana_corpus()
    replay = RunReplay(RUN)
    if data.draw(st.booleans(), label="created?"):
        assert replay.feed(_tx(create, 1), bytes(32))[0].applied
    _, raw = fuzzed(data, [create, *submits, *(create[:-len(genesis[0])] + g for g in genesis)])
    before = replay.count
    try:
        outcomes = replay.feed(_tx(raw, 2), bytes(32))
    except ReplayError as exc:
        assert "does not parse" in str(exc)
        return
    assert len(outcomes) == 1 and isinstance(outcomes[0], Outcome)
    assert replay.count == before + 1
