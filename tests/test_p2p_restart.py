"""A peer that was SIGKILLed and restarts with the same key at a new address is reachable again."""

from __future__ import annotations

import asyncio

import pytest

from psyche.identity import Identity
from psyche.p2p import Finished, Heartbeat, MemoryNetwork, P2PNode
from psyche.testing.p2p_worker import WorkerProcess, close_all, connect_all, start_workers, wait_until

RUN = "restart-run"


def _exchange(ws: list[WorkerProcess], *, step: int, seed: int, timeout: float) -> None:
    """Each worker publishes a small blob and broadcasts a commitment; every other worker
    receives the commitment and fetches the blob from its publisher."""
    size = 2048
    hashes = {}
    for i, w in enumerate(ws):
        h = w.call("publish", seed=seed + i, size=size, step=step)["hash"]
        hashes[w.id.hex()] = h
        w.call("broadcast", kind="commit", step=step, blob_hash=h, size=size)

    def commits_everywhere():
        for w in ws:
            got = {(m["sender"], m["blob_hash"]) for m in w.call("received")["messages"] if m["type"] == "ResultCommitment"}
            if not all((x.id.hex(), hashes[x.id.hex()]) in got for x in ws if x is not w):
                return False
        return True

    wait_until(commits_everywhere, timeout, f"commitments of step {step} everywhere")
    rids = []
    for w in ws:
        items = [{"hash": hashes[x.id.hex()], "size": size, "providers": [x.id.hex()]} for x in ws if x is not w]
        rids.append(w.send("fetch_many", items=items, timeout=timeout))
    for w, rid in zip(ws, rids):
        res = w.result(rid, timeout + 10)["results"]
        assert all(r["fetched"] for r in res), (w.id.hex()[:8], res)


def test_newer_inbound_connection_replaces_the_older_one_and_departure_closes_it():
    """In memory: B's process is replaced by B2 (same key) without closing; when B2 dials A,
    A closes the connection of the old B; when B2 leaves the member set, A closes B2's too."""

    async def main():
        net = MemoryNetwork()
        ia, ib = Identity(b"\x01" * 32), Identity(b"\x02" * 32)
        a = P2PNode(ia, RUN, net.transport(ia.public_key), resend_interval=0.05, stall_timeout=0.5)
        b = P2PNode(ib, RUN, net.transport(ib.public_key), resend_interval=0.05, stall_timeout=0.5)
        members = {a.public_key: a.address, b.public_key: b.address}
        for nd in (a, b):
            nd.set_members(members)
            nd.set_step(0)
        got = []
        a.on_message(lambda s, m: got.append(m))

        async def delivered(n: int) -> None:
            while len(got) < n:
                await asyncio.sleep(0.01)

        await b.broadcast(Heartbeat(run_id=RUN, step=0))
        await asyncio.wait_for(delivered(1), 5)
        (old,) = b.transport.connections
        b2 = P2PNode(ib, RUN, net.transport(ib.public_key), resend_interval=0.05, stall_timeout=0.5)
        b2.set_members(members)
        b2.set_step(0)
        await b2.broadcast(Finished(run_id=RUN, step=0, phase="round"))
        await asyncio.wait_for(delivered(2), 5)
        (new,) = b2.transport.connections
        assert old.is_closed and not new.is_closed
        a.set_members({a.public_key: a.address})
        assert new.is_closed
        for nd in (a, b, b2):
            await nd.close()

    asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.parametrize("first", ["old_peers_learn_address", "restarted_peer_dials"])
def test_killed_peer_restarted_with_same_key_at_new_address_is_reachable(first):
    """A, B, C exchange blobs and messages; C is SIGKILLed and restarted with the same key
    on a new port; once A and B learn the new address, blobs and broadcasts flow both ways
    again within a few seconds. ``first`` says who acts first after the restart: A and B
    dial C' (while the dead C's connections still look open to QUIC), or C' dials them."""
    ws = start_workers(3, RUN)
    started = list(ws)
    try:
        a, b, c = ws
        connect_all(ws, step=1)
        _exchange(ws, step=1, seed=10, timeout=10)
        c.kill()
        c2 = WorkerProcess(RUN, seed=c.seed)
        started.append(c2)
        assert c2.id == c.id and c2.address != c.address
        ws2 = [a, b, c2]
        if first == "restarted_peer_dials":
            # C' knows A and B; they still list C's old address but accept C' (same key)
            c2.call("set_members", members={x.id.hex(): x.address for x in ws2})
            c2.call("set_step", step=1)
            c2.call("broadcast", kind="heartbeat", step=1)
            wait_until(lambda: c2.call("pending")["pending"] == 0, 10, "C' heartbeat acked by A and B")
        connect_all(ws2, step=2)
        _exchange(ws2, step=2, seed=20, timeout=8)
    finally:
        close_all(started)
