"""psyche.p2p between separate processes over iroh on loopback (each worker is `python -m psyche.testing.p2p_worker`)."""

from __future__ import annotations

import random

import iroh
import pytest

from psyche.testing.p2p_worker import WorkerProcess, close_all, connect_all, start_workers, wait_until

pytestmark = pytest.mark.e2e
RUN = "e2e-run"


def _dead_address(peer_id: bytes) -> str:
    """A ticket with ``peer_id``'s id but a port nobody listens on: the link looks cut."""
    addr = iroh.EndpointAddr(iroh.EndpointId.from_bytes(peer_id), None, ["127.0.0.1:9"])
    return str(iroh.EndpointTicket.from_addr(addr))


@pytest.fixture
def workers(request):
    started: list[WorkerProcess] = []

    def start(n: int, **kw) -> list[WorkerProcess]:
        ws = start_workers(n, RUN, **kw)
        started.extend(ws)
        return ws

    yield start
    close_all(started)


def test_round_all_messages_and_blobs_delivered_with_a_cut_link(workers):
    """6 processes: each commits a result blob and broadcasts commitment + finished; nodes 0 and 1
    cannot reach each other, so their messages must be forwarded. Every node gets every message,
    fetches every blob and verifies it; then a joiner fetches a model from three providers."""
    ws = workers(6)
    a, b = ws[0].id, ws[1].id
    connect_all(ws, step=3, overrides={(0, 1): _dead_address(b), (1, 0): _dead_address(a)})
    size = 200_000
    hashes = []
    for i, w in enumerate(ws):
        h = w.call("publish", seed=100 + i, size=size)["hash"]
        hashes.append(h)
        w.call("broadcast", kind="commit", step=3, blob_hash=h, size=size, batch_start=4 * i, batch_end=4 * i + 4)
        w.call("broadcast", kind="finished", step=3, phase="round")
    n = len(ws)

    def everyone_has_all():
        got = [w.call("received")["messages"] for w in ws]
        return all(len(m) >= 2 * (n - 1) for m in got) and got

    got = wait_until(everyone_has_all, 30, "all messages")
    for i, msgs in enumerate(got):
        commits = {(m["sender"], m["blob_hash"]) for m in msgs if m["type"] == "ResultCommitment"}
        assert commits == {(ws[j].id.hex(), hashes[j]) for j in range(n) if j != i}
        assert {m["sender"] for m in msgs if m["type"] == "Finished"} == {ws[j].id.hex() for j in range(n) if j != i}
        assert len(msgs) == 2 * (n - 1)  # de-duplicated
    # every node fetches every other node's blob (publisher first, then anyone who may have it)
    rids = []
    for i, w in enumerate(ws):
        items = []
        for j in range(n):
            if j != i:
                others = [ws[k].id.hex() for k in range(n) if k not in (i, j)]
                random.Random(i * 10 + j).shuffle(others)
                items.append({"hash": hashes[j], "size": size, "providers": [ws[j].id.hex(), *others]})
        rids.append(w.send("fetch_many", items=items, timeout=60))
    for w, rid in zip(ws, rids):
        res = w.result(rid, 90)["results"]
        assert all(r["fetched"] and r["size"] == size for r in res), res
    for w in ws:
        c = w.call("counters")["counters"]
        assert c.get("bad_signature", 0) == 0 and c.get("bad_blob", 0) == 0
    # stats are exposed per peer
    st = ws[2].call("stats")["stats"]
    assert sum(s["bytes_in"] for s in st.values()) >= (n - 1) * size
    # model sharing: three providers, the joiner fetches tensor parts from all of them, verified
    digest = None
    for w in ws[2:5]:
        digest = w.call("serve_model", seed=7, n_tensors=6, tensor_bytes=300_000, part_size=100_000)["digest"]
    res = ws[5].call("fetch_model", providers=[w.id.hex() for w in ws[2:5]], seed=7, digest=digest, timeout=60)
    assert res["content_ok"] and res["tensors"] == 6 and res["files"] == ["config.json"]
    assert len(res["sources"]) == 3 and sum(res["sources"].values()) >= 6 * 300_000


def test_publisher_killed_mid_transfer_others_finish_from_a_peer(workers):
    pub, early, b, c = workers(4)
    ws = [pub, early, b, c]
    connect_all(ws)
    size = 3_000_000
    h = pub.call("publish", seed=5, size=size)["hash"]
    assert early.call("fetch", hash=h, size=size, providers=[pub.id.hex()], timeout=30)["fetched"]
    pub.call("set_upload_rate", rate=1_000_000)  # slow enough that the kill lands mid-transfer
    providers = [pub.id.hex(), early.id.hex()]
    rb = b.send("fetch", hash=h, size=size, providers=providers, timeout=40)
    rc = c.send("fetch", hash=h, size=size, providers=providers, timeout=40)
    for w in (b, c):
        wait_until(lambda: w.call("stats")["stats"].get(pub.id.hex(), {}).get("bytes_in", 0) > 0, 20, "transfer from publisher")
    pub.kill()
    for w, rid in ((b, rb), (c, rc)):
        r = w.result(rid, 60)
        assert r["fetched"] and r["size"] == size, r
        st = w.call("stats")["stats"]
        assert 0 < st[pub.id.hex()]["bytes_in"] < size  # got part of it from the publisher...
        assert st[early.id.hex()]["bytes_in"] >= size  # ...and all of it from the peer
    assert c.call("counters")["counters"].get("bad_blob", 0) == 0


def test_adversarial_inputs_rejected_counted_and_survived(workers):
    a, b, liar, outsider = workers(4)
    members = [a, b, liar]
    connect_all(members)
    # the outsider knows a's address and even lists itself, but a does not list it
    outsider.call("set_members", members={a.id.hex(): a.address, outsider.id.hex(): outsider.address})
    outsider.call("set_step", step=0)

    # 1. non-member: its broadcast and its fetch are refused
    h_a = a.call("publish", seed=1, size=10_000)["hash"]
    outsider.call("broadcast", kind="heartbeat", step=0)
    r = outsider.call("fetch", hash=h_a, size=10_000, providers=[a.id.hex()], timeout=2)
    assert not r["fetched"]
    # 2. bad signature
    forged = b.call("forge", kind="heartbeat", step=0)["envelope"]
    assert b.call("inject", peer=a.id.hex(), envelopes=[forged])["acked"] == 1
    # 3. replay: a message signed for step 0, re-sent after the run moved to step 6; and one for another run
    old = b.call("broadcast", kind="finished", step=0, phase="witness")["envelope"]
    wait_until(lambda: len(a.call("received")["messages"]) >= 1, 10, "b's finished at a")
    for w in members:
        w.call("set_step", step=6)
    b.call("inject", peer=a.id.hex(), envelopes=[old])
    other_run = b.call("broadcast", kind="heartbeat", step=6, run_id="another-run")["envelope"]
    b.call("inject", peer=a.id.hex(), envelopes=[other_run, "c1c2c3"])  # + a malformed one
    # 4. truncated, oversized and corrupt blobs from a lying member; the honest b has each real blob
    fetched = []
    for seed, mode in ((11, "truncate"), (12, "oversize"), (13, "corrupt")):
        h = liar.call("publish_fake", seed=seed, size=50_000, mode=mode)["hash"]
        assert b.call("publish", seed=seed, size=50_000, step=6)["hash"] == h
        only_liar = a.call("fetch", hash=h, size=50_000, providers=[liar.id.hex()], timeout=0.5)
        assert not only_liar["fetched"] and "bad_blob" in only_liar["error"], only_liar  # reported, not raised
        fetched.append(a.call("fetch", hash=h, size=50_000, providers=[liar.id.hex(), b.id.hex()], timeout=20))
    assert all(f["fetched"] for f in fetched), fetched

    c = a.call("counters")["counters"]
    assert c["non_member"] >= 1 and c["bad_signature"] == 1 and c["replay"] == 1
    assert c["wrong_run"] == 1 and c["malformed"] == 1
    assert c["bad_blob_truncated"] >= 2 and c["bad_blob_oversized"] >= 2 and c["bad_blob_hash_mismatch"] >= 2
    assert a.call("stats")["stats"][liar.id.hex()]["bad_blobs"] >= 6
    # a is still healthy: a fresh message from b still arrives exactly once
    before = len(a.call("received")["messages"])
    b.call("broadcast", kind="heartbeat", step=6)
    wait_until(lambda: len(a.call("received")["messages"]) == before + 1, 10, "fresh message after the attacks")
    assert a.proc.poll() is None and liar.proc.poll() is None


def test_model_joiner_finishes_after_a_provider_is_killed(workers):
    """A LLaMA served by three processes; a fourth joins and fetches it into its own model (in place),
    with one provider on standby. One serving provider is SIGKILLed mid-transfer: its parts are
    fetched again from the others, the standby steps in, and the weights arrive exactly."""
    ws = workers(5)
    connect_all(ws)
    llama = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4)  # ~5.3M parameters, 21 MB
    providers, joiner = ws[:4], ws[4]
    served = [w.call("serve_model", llama=llama, seed=3, part_size=1 << 20, reply_timeout=120) for w in providers]
    assert len({s["state_hash"] for s in served}) == 1
    for w in providers:
        w.call("set_upload_rate", rate=1_000_000)  # slow enough that the kill lands mid-transfer
    rid = joiner.send("fetch_model", llama=llama, providers=[w.id.hex() for w in providers], max_providers=3, timeout=120)
    # the joiner enlists three of the four (in random order); kill one that has served it a part
    # (more bytes than its two streams can hold unfinished)
    victim = wait_until(lambda: next((w for w in providers
                                      if joiner.call("stats")["stats"].get(w.id.hex(), {}).get("bytes_in", 0) > 2_500_000), None),
                        30, "a part from a provider")
    victim.kill()
    r = joiner.result(rid, 180)
    assert r["ok"], r
    assert r["state_hash"] == served[0]["state_hash"]  # every weight arrived, verified and in place
    assert 0 < r["sources"].get(victim.id.hex(), 0) < r["model_bytes"]
    assert r["counters"].get("model_provider_dropped", 0) >= 1
    alive = [w.id.hex() for w in providers if w is not victim]
    assert sum(r["sources"].get(p, 0) for p in alive) + r["sources"].get(victim.id.hex(), 0) == r["model_bytes"]
