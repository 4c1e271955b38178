"""P2PNode over the in-memory transport: broadcast with cut links, blob fetch and failover, model sharing."""

from __future__ import annotations

import asyncio

import pytest

from psyche.identity import Identity
from psyche.p2p import (
    BlobUnavailable,
    Finished,
    Heartbeat,
    InMemoryModel,
    MemoryNetwork,
    ModelUnavailable,
    P2PNode,
    RawTensor,
    ResultCommitment,
    SignedMessage,
)
from psyche.p2p.node import endpoint_answers

RUN = "run-x"


async def _cluster(n: int, **opts):
    net = MemoryNetwork()
    ids = [Identity(bytes([i + 7]) * 32) for i in range(n)]
    nodes = [P2PNode(i, RUN, net.transport(i.public_key), resend_interval=0.05, stall_timeout=0.5, **opts) for i in ids]
    members = {nd.public_key: nd.address for nd in nodes}
    for nd in nodes:
        nd.set_members(members)
        nd.set_step(0)
    return net, nodes


async def _until(pred, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_broadcast_reaches_all_despite_cut_links():
    async def main():
        net, nodes = await _cluster(5)
        got = {nd.public_key: [] for nd in nodes}
        for nd in nodes:
            nd.on_message(lambda s, m, k=nd.public_key: got[k].append((s, m)))
        a, c, e = nodes[0].public_key, nodes[2].public_key, nodes[4].public_key
        net.block(a, c)
        net.block(a, e)
        net.block(c, e)
        msgs = [Finished(run_id=RUN, step=0, phase="round"), Heartbeat(run_id=RUN, step=0)]
        for nd in nodes:
            for m in msgs:
                await nd.broadcast(m)
        await _until(lambda: all(len(v) == 2 * (len(nodes) - 1) for v in got.values()))
        for nd in nodes:
            senders = {s for s, _ in got[nd.public_key]}
            assert senders == {x.public_key for x in nodes} - {nd.public_key}
            assert nd.counters.get("bad_signature", 0) == 0
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_messages_iterator_and_replay_counted():
    async def main():
        net, (a, b) = await _cluster(2)
        seen = []

        async def consume():
            async for sender, msg in b.messages():
                seen.append((sender, msg))

        task = asyncio.create_task(consume())
        commit = ResultCommitment(run_id=RUN, step=0, batch_start=0, batch_end=4, blob_hash=b"h" * 32, size=10)
        await a.broadcast(commit)
        await _until(lambda: len(seen) == 1)
        assert seen[0] == (a.public_key, commit)
        # replay the very same signed envelope after the steps moved on
        raw = SignedMessage.create(a.identity, commit).encode()
        b.set_step(5)
        assert await a.send_raw_envelopes(b.public_key, [raw]) == 1
        assert b.counters["replay"] == 1 and len(seen) == 1
        await b.close()
        await asyncio.wait_for(task, 2)
        await a.close()

    asyncio.run(main())


def test_blob_fetch_failover_and_bad_blob_counted():
    async def main():
        net, (pub, liar, honest, fetcher) = await _cluster(4)
        data = bytes(range(256)) * 400
        h = pub.publish_blob(data)
        assert await honest.fetch_blob(h, len(data), [pub.public_key]) == data
        liar.blobs.insert_unchecked(h, data[:-1] + b"?")
        net.block(fetcher.public_key, pub.public_key)
        got = await fetcher.fetch_blob(h, len(data), [pub.public_key, liar.public_key, honest.public_key], timeout=5)
        assert got == data
        assert fetcher.counters["bad_blob"] == 1 and fetcher.stats()[liar.public_key].bad_blobs == 1
        assert fetcher.stats()[honest.public_key].bytes_in == len(data)
        # the fetcher now serves it too
        assert fetcher.has_blob(h)
        with pytest.raises(BlobUnavailable) as info:
            await fetcher.fetch_blob(b"\0" * 32, 10, [pub.public_key, honest.public_key], timeout=0.5)
        assert {r for _, r in info.value.attempts} >= {"missing"}
        for nd in (pub, liar, honest, fetcher):
            await nd.close()

    asyncio.run(main())


def test_oversized_announcement_rejected():
    async def main():
        net, (a, b) = await _cluster(2)
        data = b"x" * 1000
        h = a.publish_blob(data)
        a.blobs.insert_unchecked(h, data + b"extra")
        with pytest.raises(BlobUnavailable) as info:
            await b.fetch_blob(h, len(data), [a.public_key], timeout=0.3)
        assert info.value.attempts[0][1] == "bad_blob:oversized"
        assert b.counters["bad_blob_oversized"] >= 1
        await a.close()
        await b.close()

    asyncio.run(main())


def test_non_member_refused_and_counted():
    async def main():
        net, (a, b) = await _cluster(2)
        stranger = Identity(b"\x55" * 32)
        outsider = P2PNode(stranger, RUN, net.transport(stranger.public_key))
        outsider.set_members({a.public_key: a.address})
        h = a.publish_blob(b"secret")
        with pytest.raises(BlobUnavailable):
            await outsider.fetch_blob(h, 6, [a.public_key], timeout=0.3)
        await outsider.broadcast(Heartbeat(run_id=RUN, step=0))
        await asyncio.sleep(0.2)
        assert a.counters["non_member"] >= 1
        for nd in (a, b, outsider):
            await nd.close()

    asyncio.run(main())


def test_model_fetch_parallel_verified_and_majority_manifest():
    from psyche.p2p.torch_io import raw_to_state_dict

    async def main():
        net, nodes = await _cluster(4)
        tensors = {f"layer{i}.weight": RawTensor("F32", (64, 16), bytes([i]) * 4096) for i in range(5)}
        files = {"config.json": b'{"hidden": 16}', "tokenizer.json": b"{}" * 100}
        model = InMemoryModel(tensors, files, part_size=1000)
        digests = {nd.serve_model(model) for nd in nodes[:2]}
        evil = dict(tensors)
        evil["layer0.weight"] = RawTensor("F32", (64, 16), b"\xff" * 4096)
        nodes[2].serve_model(InMemoryModel(evil, files, part_size=1000))
        joiner = nodes[3]
        got = await joiner.fetch_model([n.public_key for n in nodes[:3]], timeout=10)
        assert got.tensors == tensors and got.files == files
        assert set(got.sources) == {nodes[0].public_key, nodes[1].public_key}  # parallel, and not the odd one out
        assert joiner.counters["bad_manifest"] == 1
        # by digest: only the evil provider's manifest accepted when asked for it
        evil_digest = nodes[2]._provider_digest
        got2 = await joiner.fetch_model([n.public_key for n in nodes[:3]], manifest_digest=evil_digest, timeout=10)
        assert got2.tensors["layer0.weight"].data == b"\xff" * 4096 and set(got2.sources) == {nodes[2].public_key}
        with pytest.raises(ModelUnavailable):
            await joiner.fetch_model([n.public_key for n in nodes[:3]], manifest_digest=b"\0" * 32, timeout=2)
        assert len(digests) == 1
        sd = raw_to_state_dict(got.tensors)
        assert tuple(sd["layer1.weight"].shape) == (64, 16)
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_model_part_from_lying_provider_is_refetched_elsewhere():
    async def main():
        net, nodes = await _cluster(3)
        tensors = {"w": RawTensor("U8", (5000,), bytes(range(250)) * 20)}
        good = InMemoryModel(tensors, {}, part_size=512)
        for nd in nodes[:2]:
            nd.serve_model(good)

        class Liar(InMemoryModel):
            def read(self, kind, name, offset, length):
                return b"\0" * length

        nodes[1].serve_model(Liar(tensors, {}, part_size=512))  # same manifest, wrong bytes
        got = await nodes[2].fetch_model([nodes[0].public_key, nodes[1].public_key], timeout=10)
        assert got.tensors == tensors
        assert nodes[2].counters["bad_blob"] >= 1
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_model_fetched_into_a_state_dict_in_place_and_mismatch_refused_first():
    import torch

    from psyche.p2p.errors import ModelMismatch
    from psyche.p2p.torch_io import StateDictSink, model_from_state_dict

    async def main():
        net, nodes = await _cluster(3)
        g = torch.Generator().manual_seed(0)
        theirs = {"a.weight": torch.randn(64, 33, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
                  "steps": torch.arange(5)}
        for nd in nodes[:2]:
            nd.serve_model(model_from_state_dict(theirs, {"config.json": b"{}"}, part_size=1000))
        ours = {k: torch.zeros_like(v) for k, v in theirs.items()}
        before = {k: v.data_ptr() for k, v in ours.items()}
        sink = StateDictSink(ours)
        got = await nodes[2].fetch_model([n.public_key for n in nodes[:2]], into=sink, timeout=10)
        for k in theirs:
            assert torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() == before[k]  # written in place
        assert sink.files == {"config.json": bytearray(b"{}")} and got.files == {"config.json": b"{}"}
        assert sum(got.sources.values()) == got.manifest.total_bytes()

        wrong = dict(ours, **{"a.weight": torch.zeros(64, 32)})
        with pytest.raises(ModelMismatch, match="a.weight"):
            await nodes[2].fetch_model([nodes[0].public_key], into=StateDictSink(wrong), timeout=10)
        with pytest.raises(ModelMismatch, match="missing"):
            await nodes[2].fetch_model([nodes[0].public_key], into=StateDictSink({"x": torch.zeros(1)}), timeout=10)
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_model_standby_provider_replaces_one_that_goes_away():
    async def main():
        net, nodes = await _cluster(4)
        tensors = {"w": RawTensor("U8", (40_000,), bytes(range(200)) * 200)}
        for nd in nodes[:3]:
            nd.serve_model(InMemoryModel(tensors, {}, part_size=1000))
        joiner = nodes[3]
        # one provider at a time: whichever is enlisted first goes away after serving a little
        served = {"n": 0}
        first = {}

        class Fading(InMemoryModel):
            def read(self, kind, name, offset, length):
                served["n"] += 1
                if served["n"] == 3:
                    net.block(first["who"], joiner.public_key)
                return super().read(kind, name, offset, length)

        for nd in nodes[:3]:
            nd.serve_model(Fading(tensors, {}, part_size=1000))
        orig = joiner._get_part

        async def spy(peer, digest, ref, into=None):
            first.setdefault("who", peer)
            return await orig(peer, digest, ref, into=into)

        joiner._get_part = spy
        got = await joiner.fetch_model([n.public_key for n in nodes[:3]], max_providers=1, timeout=20)
        assert got.tensors["w"].data == tensors["w"].data
        assert joiner.counters["model_provider_dropped"] >= 1
        assert len(got.sources) >= 2  # the standby stepped in
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_upload_and_download_caps_are_kept_and_shown_per_peer():
    async def main():
        net, nodes = await _cluster(3)
        a, b, c = nodes
        data = bytes(range(256)) * 2000  # 512 KB
        h = a.publish_blob(data, step=0)
        a.set_upload_rate(2_000_000)
        await b.fetch_blob(h, len(data), [a.public_key], timeout=20)
        out = a.stats()[b.public_key]
        burst = a._up.burst
        # the cap's own accounting: the upload waited for what exceeded one bucket at 2 MB/s
        assert out.throttled_out_s == pytest.approx((len(data) - burst) / 2_000_000, rel=0.2)
        a.set_upload_rate(None)
        c.set_download_rate(4_000_000)
        await c.fetch_blob(h, len(data), [a.public_key], timeout=20)
        assert c.stats()[a.public_key].throttled_in_s == pytest.approx((len(data) - c._down.burst) / 4_000_000, rel=0.2)
        assert c.download_rate == 4_000_000 and a.upload_rate is None
        for nd in nodes:
            await nd.close()

    asyncio.run(main())


def test_endpoint_answers_only_while_a_live_endpoint_holds_the_key_there():
    async def main():
        net, (a, b) = await _cluster(2)
        prober = net.transport(Identity(b"\x66" * 32).public_key)  # dials with a key of its own, as in use
        assert await endpoint_answers(a.public_key, a.address, transport=prober)
        assert not await endpoint_answers(b.public_key, a.address, transport=prober), "another key at that address"
        await a.close()
        assert not await endpoint_answers(a.public_key, a.address, transport=prober), "the process is gone"
        await b.close()
        await prober.close()

    asyncio.run(main())
