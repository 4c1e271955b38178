"""Sans-io parts of psyche.p2p: wire formats, signatures, gossip admission and forwarding, blob checks, manifests."""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psyche.p2p.blobs import BlobCheckError, BlobReceiver, BlobStore
from psyche.p2p.gossip import Gossip
from psyche.identity import Identity, IdentityError
from psyche.p2p.model import RawTensor, build_manifest, choose_manifest, decode_manifest
from psyche.p2p.wire import (
    DataHeader,
    Finished,
    GetBlob,
    Heartbeat,
    Push,
    ResultCommitment,
    SignedMessage,
    content_hash,
    decode_envelope,
    decode_frame,
    encode_frame,
    frame_length,
)

KEYS = [Identity(bytes([i + 1]) * 32) for i in range(6)]
RUN = "run-a"

steps = st.integers(min_value=0, max_value=2**40)
messages = st.one_of(
    st.builds(ResultCommitment, run_id=st.text(max_size=20), step=steps, batch_start=steps, batch_end=steps,
              blob_hash=st.binary(min_size=32, max_size=32), size=steps),
    st.builds(Finished, run_id=st.text(max_size=20), step=steps, phase=st.sampled_from(["warmup", "round", "witness"])),
    st.builds(Heartbeat, run_id=st.text(max_size=20), step=steps),
)


@given(messages, st.integers(0, len(KEYS) - 1))
def test_envelope_roundtrip_and_signature(msg, k):
    env = SignedMessage.create(KEYS[k], msg)
    back = decode_envelope(env.encode())
    assert back == env and back.verify() and back.message() == msg and back.sender == KEYS[k].public_key


@given(messages, st.data())
def test_any_single_byte_change_breaks_signature_or_decoding(msg, data):
    raw = bytearray(SignedMessage.create(KEYS[0], msg).encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        env = decode_envelope(bytes(raw))
    except Exception:
        return  # malformed: fine
    # decoded: either it is no longer signed correctly, or it is the same message
    if env.verify():
        assert env.sender == KEYS[0].public_key and env.message() == msg


@given(st.one_of(
    st.builds(Push, st.lists(st.binary(max_size=300), max_size=5)),
    st.builds(GetBlob, st.binary(min_size=32, max_size=32), st.integers(0, 2**40)),
    st.builds(DataHeader, st.sampled_from(["ok", "missing", "refused"]), st.integers(0, 2**40)),
))
def test_frames_roundtrip(frame):
    raw = encode_frame(frame)
    assert decode_frame(raw[4:]) == frame and frame_length(raw[:4]) == len(raw) - 4


def test_frame_length_limit():
    with pytest.raises(ValueError, match="exceeds"):
        frame_length((100).to_bytes(4, "big"), max_frame=99)


def _gossip(i: int, members: list[int], **kw) -> Gossip:
    g = Gossip(local_id=KEYS[i].public_key, run_id=RUN, resend_interval=1.0, **kw)
    g.set_members({KEYS[j].public_key for j in members if j != i}, now=0.0)
    return g


def _env(i: int, msg) -> bytes:
    return SignedMessage.create(KEYS[i], msg).encode()


def test_admission_reasons_are_counted():
    g = _gossip(0, [0, 1, 2])
    g.set_step(10)
    p1 = KEYS[1].public_key
    ok = _env(1, Heartbeat(run_id=RUN, step=10))
    assert g.receive(ok, from_peer=p1, now=0).delivery is not None
    assert g.receive(ok, from_peer=p1, now=0).dropped == "duplicate"
    assert g.receive(ok, from_peer=KEYS[5].public_key, now=0).dropped == "non_member"
    assert g.receive(_env(5, Heartbeat(run_id=RUN, step=10)), from_peer=p1, now=0).dropped == "non_member"
    assert g.receive(b"\x93garbage", from_peer=p1, now=0).dropped == "malformed"
    assert g.receive(_env(1, Heartbeat(run_id="other", step=10)), from_peer=p1, now=0).dropped == "wrong_run"
    assert g.receive(_env(1, Heartbeat(run_id=RUN, step=7)), from_peer=p1, now=0).dropped == "replay"
    assert g.receive(_env(1, Heartbeat(run_id=RUN, step=13)), from_peer=p1, now=0).dropped == "replay"
    env = SignedMessage.create(KEYS[1], Heartbeat(run_id=RUN, step=11))
    forged = SignedMessage(env.v, env.sender, env.body, bytes(64)).encode()
    assert g.receive(forged, from_peer=p1, now=0).dropped == "bad_signature"
    c = g.counters
    assert (c["duplicate"], c["non_member"], c["malformed"], c["wrong_run"], c["replay"], c["bad_signature"]) == (1, 2, 1, 1, 2, 1)


def test_message_seen_in_old_step_is_a_replay_after_the_window_moves():
    g = _gossip(0, [0, 1])
    g.set_step(1)
    raw = _env(1, Finished(run_id=RUN, step=1, phase="round"))
    assert g.receive(raw, from_peer=KEYS[1].public_key, now=0).delivery is not None
    g.set_step(5)
    assert g.receive(raw, from_peer=KEYS[1].public_key, now=0).dropped == "replay"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 6), blocked=st.sets(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=8),
       origin=st.integers(0, 5), fanout=st.sampled_from([None]))
def test_flood_reaches_every_node_connected_to_the_origin(n, blocked, origin, fanout):
    """Simulate pushes over a network with cut links: every node reachable from the origin
    (in the graph of uncut links) ends up with the message, and re-sends stop once acked."""
    origin %= n
    cut = {frozenset((a % n, b % n)) for a, b in blocked}
    nodes = [_gossip(i, list(range(n)), fanout=fanout) for i in range(n)]
    got = {origin}
    env = SignedMessage.create(KEYS[origin], Heartbeat(run_id=RUN, step=0))
    nodes[origin].originate(env, step=0, now=0.0)
    now = 0.0
    for _ in range(40):
        now += 10.0  # past any backoff
        for i, g in enumerate(nodes):
            for peer, items in g.due(now).items():
                j = next(k for k in range(n) if KEYS[k].public_key == peer)
                if frozenset((i, j)) in cut:
                    continue
                for mid, raw in items:
                    v = nodes[j].receive(raw, from_peer=KEYS[i].public_key, now=now)
                    if v.delivery is not None:
                        got.add(j)
                g.acked(peer, [m for m, _ in items])
    # which nodes can the origin reach?
    reach, frontier = {origin}, [origin]
    while frontier:
        a = frontier.pop()
        for b in range(n):
            if b not in reach and frozenset((a, b)) not in cut:
                reach.add(b)
                frontier.append(b)
    assert got == reach
    # nothing left to send to reachable peers
    for i in reach:
        pend = nodes[i].due(now + 1e6)
        assert all(frozenset((i, next(k for k in range(n) if KEYS[k].public_key == p))) in cut for p in pend)


def test_resend_backoff_and_ack():
    g = _gossip(0, [0, 1])
    env = SignedMessage.create(KEYS[0], Heartbeat(run_id=RUN, step=0))
    g.originate(env, step=0, now=0.0)
    assert len(g.due(0.0)[KEYS[1].public_key]) == 1
    assert g.due(0.5) == {}  # backoff 1.0
    assert len(g.due(1.0)[KEYS[1].public_key]) == 1
    assert g.next_deadline() == 3.0  # then 2.0
    g.acked(KEYS[1].public_key, [env.message_id])
    assert g.due(100.0) == {} and g.pending_count() == 0


def test_new_member_is_owed_window_messages():
    g = _gossip(0, [0, 1])
    env = SignedMessage.create(KEYS[0], Heartbeat(run_id=RUN, step=0))
    g.originate(env, step=0, now=0.0)
    g.acked(KEYS[1].public_key, [env.message_id])
    g.set_members({KEYS[1].public_key, KEYS[2].public_key}, now=5.0)
    assert list(g.due(5.0)) == [KEYS[2].public_key]


@given(st.binary(max_size=5000), st.integers(1, 700))
def test_blob_receiver_accepts_exact_content_in_any_chunking(data, chunk):
    r = BlobReceiver(expected_hash=content_hash(data), size=len(data))
    for i in range(0, len(data), chunk):
        r.feed(data[i : i + chunk])
    assert r.finish() == data


@given(st.binary(min_size=1, max_size=2000), st.data())
def test_blob_receiver_rejects_truncated_oversized_and_corrupt(data, d):
    h = content_hash(data)
    cut = d.draw(st.integers(0, len(data) - 1))
    r = BlobReceiver(expected_hash=h, size=len(data))
    r.feed(data[:cut])
    with pytest.raises(BlobCheckError) as e:
        r.finish()
    assert e.value.reason == "truncated"
    r = BlobReceiver(expected_hash=h, size=len(data))
    with pytest.raises(BlobCheckError) as e:
        r.feed(data + b"x")
    assert e.value.reason == "oversized"
    i = d.draw(st.integers(0, len(data) - 1))
    bad = bytearray(data)
    bad[i] ^= 1
    r = BlobReceiver(expected_hash=h, size=len(data))
    r.feed(bytes(bad))
    with pytest.raises(BlobCheckError) as e:
        r.finish()
    assert e.value.reason == "hash_mismatch"


def test_blob_store_drops_by_step_and_keeps_pinned():
    s = BlobStore()
    old, new, pinned = s.put(b"a", step=1), s.put(b"b", step=3), s.put(b"c", step=None)
    assert s.drop_older_than(3) == 1
    assert old not in s and new in s and pinned in s


@settings(deadline=None, max_examples=30)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=300), max_size=5),
       st.integers(1, 64))
def test_manifest_roundtrip_and_parts_cover_entries(entries, part_size):
    tensors = {k: RawTensor("U8", (len(v),), v) for k, v in entries.items()}
    m = build_manifest(tensors, {"config.json": b"{}"}, part_size=part_size)
    assert decode_manifest(m.encode()) == m
    covered = {}
    for ref in m.parts():
        src = tensors[ref.name].data if ref.kind == "tensor" else b"{}"
        piece = src[ref.offset : ref.offset + ref.length]
        assert content_hash(piece) == ref.hash
        covered[(ref.kind, ref.name)] = covered.get((ref.kind, ref.name), 0) + ref.length
    assert all(covered.get(("tensor", k), 0) == len(v) for k, v in entries.items())


def test_choose_manifest_majority_and_digest():
    a, b = build_manifest({}, {"f": b"1"}).encode(), build_manifest({}, {"f": b"2"}).encode()
    p = [k.public_key for k in KEYS[:4]]
    data, agree = choose_manifest({p[0]: a, p[1]: a, p[2]: b})
    assert data == a and agree == sorted(p[:2])
    assert choose_manifest({p[0]: a, p[1]: b}) is None  # no strict majority
    assert choose_manifest({p[0]: a}, min_agree=2) is None
    from psyche.p2p.wire import manifest_digest
    assert choose_manifest({p[0]: a, p[1]: b, p[2]: b}, manifest_digest=manifest_digest(a)) == (a, [p[0]])


def test_identity_file(tmp_path):
    path = tmp_path / "k" / "node.key"
    a = Identity.load_or_create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    b = Identity.load_or_create(path)
    assert a.public_key == b.public_key and Identity.verify(a.public_key, b"m", b.sign(b"m"))
    assert not Identity.verify(a.public_key, b"m2", b.sign(b"m"))
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="too open"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="no such key file"):
        Identity.load(tmp_path / "none")


def test_envelope_with_a_version_outside_two_bytes_is_refused_not_raised_on():
    # Found by the property test above: a flipped version byte decoded to -31, and
    # verify() raised OverflowError instead of the envelope being dropped.
    env = SignedMessage.create(KEYS[0], Heartbeat(run_id="", step=119))
    for bad in (-31, 0x10000):
        raw = msgspec.msgpack.encode([bad, env.sender, env.body, env.sig])
        with pytest.raises(msgspec.ValidationError):
            decode_envelope(raw)


# --- rate limits -------------------------------------------------------------------


@given(rate=st.floats(1e3, 1e8), sizes=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=60),
       gaps=st.lists(st.floats(0, 2.0), min_size=60, max_size=60))
def test_rate_limit_never_lets_more_than_rate_times_time_plus_burst(rate, sizes, gaps):
    from psyche.p2p.ratelimit import RateLimit

    lim = RateLimit(rate)
    now, moves = 0.0, []  # (time asked, time the bytes may move, bytes)
    for n, gap in zip(sizes, gaps):
        now += gap
        asked = now
        wait = lim.reserve(n, now)
        assert wait >= 0
        now += wait  # the caller waits, then moves the bytes
        moves.append((asked, now, n))
    # from any request on, what moved by any later time is at most a full bucket plus the rate since
    for i, (start, _, _) in enumerate(moves):
        for _, end, _ in moves[i:]:
            moved = sum(n for _, t, n in moves[i:] if t <= end)
            assert moved <= lim.burst + rate * (end - start) + 1e-6 * rate


def test_rate_limit_off_and_changes():
    from psyche.p2p.ratelimit import RateLimit

    lim = RateLimit(None)
    assert lim.reserve(10**9, 0.0) == 0.0
    lim.set_rate(1000.0)
    assert lim.reserve(int(lim.burst) + 1000, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="> 0"):
        lim.set_rate(0)


@pytest.mark.parametrize("text,want", [("500000", 5e5), ("500K", 5e5), ("2.5M", 2.5e6), ("10MB/s", 1e7),
                                       ("1MiB/s", 1 << 20), ("1 gbps", 1e9), ("64kib", 65536)])
def test_parse_rate(text, want):
    from psyche.p2p.ratelimit import parse_rate

    assert parse_rate(text) == want


@pytest.mark.parametrize("text", ["", "fast", "-1M", "0", "1T", "5 Mbit/s"])
def test_parse_rate_refuses_with_the_accepted_forms(text):
    from psyche.p2p.ratelimit import parse_rate

    with pytest.raises(ValueError, match="e.g. 500K"):
        parse_rate(text)


def test_blob_receiver_into_final_place():
    data = os.urandom(10_000)
    place = bytearray(10_000)
    r = BlobReceiver(expected_hash=content_hash(data), size=len(data), into=memoryview(place))
    for i in range(0, len(data), 3000):
        r.feed(data[i : i + 3000])
    assert bytes(r.finish()) == data and bytes(place) == data
    with pytest.raises(ValueError, match="exactly"):
        BlobReceiver(expected_hash=None, size=5, into=bytearray(4))
    with pytest.raises(ValueError, match="writable"):
        BlobReceiver(expected_hash=None, size=4, into=memoryview(b"abcd"))
