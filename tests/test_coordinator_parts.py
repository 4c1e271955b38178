"""The coordinator's building blocks: quorum, shuffle, Bloom filters, wire form, settings, deadlines."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psyche.coordinator import (
    BloomFilter,
    Checkpoint,
    Coordinator,
    CoordinatorSettings,
    HealthCheck,
    Join,
    Pause,
    Resume,
    RunState,
    Tick,
    WarmupWitness,
    Withdraw,
    Witness,
    decode_instruction,
    encode_instruction,
    phase_deadline,
    quorum,
    settings_problems,
    time_left,
)
from psyche.coordinator.bloom import count_members
from psyche.coordinator.shuffle import shuffled_position, shuffled_positions

# --- quorum ---


def test_quorum_small_cases_and_two_thirds():
    assert [quorum(n) for n in (1, 2, 3)] == [1, 2, 2]
    for n in range(4, 300):
        assert quorum(n) == (2 * n) // 3
    with pytest.raises(ValueError):
        quorum(0)


# --- shuffle ---


@given(count=st.integers(1, 600), seed=st.binary(min_size=32, max_size=32))
@settings(max_examples=40, deadline=None)
def test_shuffle_is_a_permutation_and_single_index_agrees(count, seed):
    positions = shuffled_positions(count, seed)
    assert sorted(positions) == list(range(count))
    for i in {0, count - 1, count // 2}:
        assert shuffled_position(i, count, seed) == positions[i]


def test_shuffle_depends_on_seed_and_is_stable():
    a = shuffled_positions(50, bytes(32))
    b = shuffled_positions(50, b"\x01" * 32)
    assert a != b
    # Pinned values: a change here changes every committee on every machine.
    assert list(shuffled_positions(8, hashlib.sha256(b"pin").digest())) == [0, 5, 6, 4, 3, 2, 1, 7]
    with pytest.raises(ValueError):
        shuffled_position(5, 5, bytes(32))


# --- Bloom filters ---


@given(items=st.lists(st.binary(min_size=32, max_size=32), max_size=300, unique=True))
@settings(max_examples=40, deadline=None)
def test_bloom_has_no_false_negatives_and_roundtrips(items):
    f = BloomFilter.for_items(items)
    assert all(x in f for x in items)
    g = BloomFilter.from_bytes(f.to_bytes())
    assert g == f and all(x in g for x in items)
    assert len(f.to_bytes()) <= 5 + 4096


@given(items=st.lists(st.binary(min_size=1, max_size=40), max_size=30, unique=True),
       sets=st.lists(st.tuples(st.lists(st.integers(0, 29), max_size=30), st.sampled_from([0.01, 0.2, 1e-4])),
                     max_size=8))
def test_count_members_is_the_sum_of_memberships(items, sets):
    # Some filters repeat (as honest witnesses' do), some differ in content and size.
    filters = [BloomFilter.for_items([items[i] for i in chosen if i < len(items)], rate) for chosen, rate in sets]
    filters += filters[:2]
    probes = items + [b"absent-" + bytes([i]) for i in range(5)]
    assert count_members(filters, probes) == {x: sum(x in f for f in filters) for x in probes}


def test_bloom_false_positive_rate_is_low_and_deterministic():
    members = [hashlib.sha256(b"m%d" % i).digest() for i in range(256)]
    f = BloomFilter.for_items(members)
    probes = [hashlib.sha256(b"p%d" % i).digest() for i in range(20000)]
    fp = sum(1 for p in probes if p in f) / len(probes)
    assert fp < 0.03  # sized for 1%
    assert len(f.to_bytes()) < 400  # fits a Solana transaction twice over
    # Same items, same bytes, regardless of insertion order.
    assert BloomFilter.for_items(reversed(members)).to_bytes() == f.to_bytes()
    assert BloomFilter.for_items(members, fp_rate=1e-4).to_bytes() != f.to_bytes()
    # Pinned wire bytes: k=8, m=24, then the bits.
    assert BloomFilter.for_items([b"a", b"b"]).to_bytes().hex() == "0818000000b55eeb"


@pytest.mark.parametrize("data", [b"", b"\x01\x08\x00\x00", b"\x00\x08\x00\x00\x00\x00", b"\x03\x08\x00\x00\x00",
                                  b"\x03\x04\x00\x00\x00\x00", b"\x03\x0c\x00\x00\x00\xff\xff",
                                  b"\x03\xff\xff\xff\x00\x00"])
def test_bloom_rejects_malformed_bytes(data):
    with pytest.raises(ValueError):
        BloomFilter.from_bytes(data)


# --- instruction wire form ---

ALL = [
    Join(p2p_address="ticket"), Tick(), WarmupWitness(),
    Witness(step=3, participant_bloom=BloomFilter.for_items([b"a"]).to_bytes(), broadcast_bloom=b"", broadcast_merkle=bytes(32),
            loss=2.5, tokens_per_sec=100.0, bandwidth_bytes=7),
    HealthCheck(step=2, accused=[b"\x01" * 32]),
    Checkpoint(step=4, location="hf://org/repo", sha256=b"\x02" * 32), Pause(), Resume(), Withdraw(),
]


@pytest.mark.parametrize("instr", ALL, ids=lambda i: type(i).__name__)
def test_instructions_roundtrip(instr):
    data = encode_instruction(instr)
    assert data[0] == 1
    assert decode_instruction(data) == instr


@pytest.mark.parametrize("data", [
    b"", b"\x02" + encode_instruction(Tick())[1:], b"\x01\xc1", b"\x01" + msgspec.msgpack.encode(["nope"]),
    b"\x01" + msgspec.msgpack.encode(["join", "x" * 1025]),
    b"\x01" + msgspec.msgpack.encode(["health_check", 1, []]),
    b"\x01" + msgspec.msgpack.encode(["checkpoint", 1, "loc", b"short"]),
    b"\x01" + msgspec.msgpack.encode(["witness", -1, b"", b"", bytes(32), 1.0, 1.0, 1]),
])
def test_malformed_instruction_bytes_raise_value_error(data):
    with pytest.raises(ValueError):
        decode_instruction(data)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_decoding_random_bytes_raises_only_value_error(data):
    try:
        instr = decode_instruction(data)
    except ValueError:
        return
    assert encode_instruction(instr)  # whatever decodes re-encodes


def test_encode_rejects_non_instructions():
    with pytest.raises(TypeError):
        encode_instruction("tick")  # type: ignore[arg-type]


# --- settings and deadlines ---


def test_batch_size_ramp_is_integer_and_monotone():
    s = CoordinatorSettings(global_batch_size_start=4, global_batch_size_end=16, global_batch_size_warmup_tokens=1000,
                            seq_len=10)
    sizes = [s.batch_size_at(t) for t in range(0, 1200, 10)]
    assert sizes[0] == 4 and sizes[-1] == 16 and sizes == sorted(sizes)
    assert s.batch_size_at(500) == 10
    assert CoordinatorSettings().batch_size_at(0) == CoordinatorSettings().global_batch_size_end


def test_settings_problems_name_fields():
    bad = CoordinatorSettings(warmup_time=700, epoch_time=600, min_clients=3, init_min_clients=2, witness_nodes=40,
                              global_batch_size_start=32, global_batch_size_end=16, checkpointers=9, seq_len=0)
    text = "\n".join(settings_problems(bad))
    for needle in ("warmup_time must be < epoch_time", "min_clients must be <= init_min_clients",
                   "witness_nodes must be <= 32", "global_batch_size_start must be <= global_batch_size_end",
                   "checkpointers must be <= min_clients", "seq_len must be > 0"):
        assert needle in text
    assert settings_problems(CoordinatorSettings()) == []


def test_phase_deadlines_follow_the_settings():
    s = CoordinatorSettings(warmup_time=7, waiting_for_members_extra_time=3)
    c = Coordinator.new("d", s, authority=bytes(32), now=100)
    assert phase_deadline(c.state) is None
    assert c.apply(Join(p2p_address="t"), b"\x01" * 32, 105, bytes(32)) is None
    assert phase_deadline(c.state) == 108 and time_left(c.state, 106) == 2 and time_left(c.state, 200) == 0
    assert c.apply(Tick(), bytes(32), 108, bytes(32)) is None
    assert c.state.run_state is RunState.Warmup
    assert phase_deadline(c.state) == 115


def test_shipped_configs_build_a_coordinator_and_config_caps_clients():
    from pathlib import Path

    from psyche.config import ConfigError, load_config, parse_config

    for path in sorted((Path(__file__).resolve().parents[1] / "config").glob("*.toml")):
        cfg = load_config(path)
        c = Coordinator.new(cfg.run_id, cfg, authority=bytes(32), now=0)
        assert c.state.settings.seq_len == cfg.model.seq_len
        assert c.state.settings.total_steps == cfg.coordinator.total_steps
    with pytest.raises(ConfigError, match="init_min_clients must be <= 256"):
        parse_config({"name": "big", "coordinator": {"init_min_clients": 300, "global_batch_size_start": 300,
                                                     "global_batch_size_end": 300}})


@pytest.mark.parametrize("module", ["bloom", "instructions", "machine", "queries", "shares", "shuffle"])
def test_docstring_examples_hold(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"psyche.coordinator.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_coordinator_imports_no_torch_or_pydantic():
    import subprocess
    import sys

    code = ("import sys, psyche.coordinator, psyche.testing.coordinator_swarm; "
            "bad = [m for m in ('torch', 'pydantic', 'numpy', 'psyche.config') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=64, unique=True), st.data())
def test_exact_bloom_has_no_false_positive_over_its_universe(universe, data):
    members = data.draw(st.lists(st.sampled_from(universe), unique=True))
    f = BloomFilter.exact_for(members, universe)
    assert all(m in f for m in members)
    assert not any(u in f for u in universe if u not in members)
    assert BloomFilter.from_bytes(f.to_bytes()) == f
