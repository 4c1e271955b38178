"""The dashboard: delta protocol, fan-out, routes on the coordinator server, and the remote proxy."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from psyche.config import parse_config
from psyche.coordinator import Join, encode_instruction
from psyche.dashboard import apply_delta, create_proxy_app, mount_dashboard, status_delta
from psyche.dashboard.app import STATIC
from psyche.dashboard.feed import Feed
from psyche.ledger.envelope import sign_request
from psyche.ledger.server import CoordinatorServer, create_app
from psyche.ledger.store import Store
from psyche.identity import Identity

RUN = "dash-test"
CFG = parse_config({
    "name": RUN,
    "coordinator": {"init_min_clients": 2, "min_clients": 1, "witness_nodes": 1, "total_steps": 5,
                    "global_batch_size_start": 4, "global_batch_size_end": 4, "checkpointers": 1,
                    "waiting_for_members_extra_time": 0},
    "lr": {"warmup_steps": 1},
})


# --- the delta protocol (pure) -------------------------------------------------

values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3),
                   st.lists(st.integers(0, 3), max_size=3))
keys = st.sampled_from(["state", "step", "epoch", "clients", "round", "config", "x"])
rows = st.dictionaries(st.sampled_from(["loss", "tokens", "val_loss"]), values, max_size=3)


@st.composite
def histories(draw) -> list[dict]:
    steps = sorted(draw(st.sets(st.integers(1, 30), max_size=8)))
    return [{"step": s, **draw(rows)} for s in steps]


@st.composite
def statuses(draw) -> dict:
    doc = draw(st.dictionaries(keys, values, max_size=5))
    if draw(st.booleans()):
        doc["history"] = draw(histories())
    if draw(st.booleans()):
        ring = st.lists(st.fixed_dictionaries({"epoch": st.integers(0, 2), "step": st.integers(0, 5)},
                                              optional={"seen": values}), max_size=5)
        rows_ = draw(ring)
        # Mostly a proper ring (sorted, unique keys), sometimes anything at all.
        if draw(st.integers(0, 3)):
            rows_ = list({(r["epoch"], r["step"]): r for r in sorted(rows_, key=lambda r: (r["epoch"], r["step"]))}.values())
        doc["witness_rounds"] = rows_
    return doc


@given(statuses(), statuses())
def test_delta_applied_to_the_old_status_gives_the_new(prev, new):
    delta = status_delta(prev, new)
    assert apply_delta(prev, delta) == new
    assert json.loads(json.dumps(delta)) == delta  # plain JSON, as the page receives it


@given(statuses(), histories(), st.integers(0, 5))
def test_a_sliding_history_sends_only_the_new_rows_and_the_dropped_keys(base, extra, dropped):
    old = [{"step": s, "loss": 1.0} for s in range(1, 6)]
    slid = old[dropped:] + [dict(r, step=r["step"] + 10) for r in extra]
    delta = status_delta(dict(base, history=old), dict(base, history=slid))
    assert delta["set"] == {} and delta["unset"] == []
    assert [r["step"] for r in delta.get("rows", {}).get("history", [])] == [r["step"] + 10 for r in extra]
    assert delta.get("drop", {}).get("history", []) == [[s] for s in range(1, 1 + dropped)]


def test_unordered_rows_are_sent_whole():
    prev = {"history": [{"step": 1}, {"step": 2}]}
    new = {"history": [{"step": 3}, {"step": 1}]}
    delta = status_delta(prev, new)
    assert delta["set"] == {"history": new["history"]} and apply_delta(prev, delta) == new


def test_feed_sends_deltas_to_viewers_in_step_and_snapshots_to_the_rest():
    async def go():
        feed = Feed()
        assert feed.frame_after(None) is None
        feed.publish({"step": 1, "history": []})
        assert json.loads(feed.frame_after(None))["type"] == "snapshot"
        feed.publish({"step": 2, "history": [{"step": 1, "loss": 3.0}]})
        delta = json.loads(feed.frame_after(1))
        assert delta == {"type": "delta", "v": 2, "base": 1, "set": {"step": 2}, "unset": [],
                         "rows": {"history": [{"step": 1, "loss": 3.0}]}}
        assert json.loads(feed.frame_after(0))["type"] == "snapshot"  # fell behind
        assert feed.frame_after(2) is None
        assert not feed.publish({"step": 2, "history": [{"step": 1, "loss": 3.0}]})  # nothing new
        assert await feed.next_frame(2, timeout=0.01) is None
        waiter = asyncio.ensure_future(feed.next_frame(2, timeout=5))
        await asyncio.sleep(0)
        feed.publish({"step": 3, "history": [{"step": 1, "loss": 3.0}], "loss": float("nan")})
        version, frame = await waiter
        assert version == 3 and json.loads(frame)["set"] == {"step": 3, "loss": None}  # NaN is not JSON

    asyncio.run(go())


# --- on the coordinator server -------------------------------------------------


def make_server(tmp_path) -> tuple[CoordinatorServer, Identity]:
    authority = Identity.generate()
    server = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key, tick_interval=0.05)
    server.create_run(CFG, authority.public_key)
    return server, authority


def join(client: TestClient, ident: Identity) -> None:
    body = sign_request(ident, RUN, "instruction", encode_instruction(Join(p2p_address=f"addr-{ident.public_key.hex()[:6]}")))
    assert client.post(f"/api/runs/{RUN}/instructions", content=body).status_code == 200


_docs: dict[int, dict] = {}


def receive_until(ws, predicate, *, limit: int = 50) -> dict:
    """Follow a live feed (snapshot + deltas, as the page does) until the document satisfies
    ``predicate``; the document so far is kept per socket between calls."""
    doc = _docs.get(id(ws))
    for _ in range(limit):
        msg = ws.receive_json()
        if msg["type"] == "snapshot":
            doc = msg["data"]
        elif msg["type"] == "delta":
            assert doc is not None, "a delta before any snapshot"
            doc = apply_delta(doc, msg)
        _docs[id(ws)] = doc
        if doc is not None and predicate(doc):
            return doc
    raise AssertionError(f"no matching document in {limit} messages; last: {doc}")


def test_page_and_every_asset_it_references_are_served(tmp_path):
    server, _ = make_server(tmp_path)
    with TestClient(create_app(server, extra_routes=mount_dashboard)) as client:
        total = 0
        for path in ("/", f"/runs/{RUN}"):
            page = client.get(path)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            total = len(page.content)
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert {"/static/dashboard.js", "/static/charts.js", "/static/dashboard.css"} <= set(assets)
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200, asset
            total += len(r.content)
        assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text), "the page must not load anything off-server"
        assert client.get("/favicon.ico").status_code == 200
        assert total < 1_000_000
        # The coordinator's own API is untouched.
        assert client.get(f"/api/runs/{RUN}").json()["run_id"] == RUN


def test_live_feed_pushes_joins_and_metrics_reports(tmp_path):
    server, _ = make_server(tmp_path)
    a, b = Identity.generate(), Identity.generate()
    with TestClient(create_app(server, extra_routes=mount_dashboard)) as client:
        with client.websocket_connect(f"/api/runs/{RUN}/live") as ws:
            first = receive_until(ws, lambda d: True)
            assert first["run_id"] == RUN and first["pending"] == [] and "config" in first
            assert first["shares"] == "speed" and first["requeued_samples"] == 0
            join(client, a)
            receive_until(ws, lambda d: d["pending"] == [a.public_key.hex()])
            join(client, b)
            # With both in, the server's clock starts the epoch: they become members.
            doc = receive_until(ws, lambda d: len(d["clients"]) == 2)
            assert {c["id"] for c in doc["clients"]} == {a.public_key.hex(), b.public_key.hex()}
            assert doc["clients"][0]["bytes_sent"] is None
            # No round yet: no share; no delivery witnessed yet: no speed estimate.
            assert {(c["share"], c["throughput"], c["accepted_tokens"]) for c in doc["clients"]} == {(None, None, 0)}
            # A metrics report changes no coordinator state, yet it is pushed.
            report = sign_request(a, RUN, "report", json.dumps({"step": 1, "bytes_sent_total": 1234, "loss": 2.5}).encode())
            assert client.post(f"/api/runs/{RUN}/reports", content=report).status_code == 200
            doc = receive_until(ws, lambda d: any(c["bytes_sent"] == 1234 for c in d["clients"]))
            assert next(c for c in doc["clients"] if c["id"] == a.public_key.hex())["last_seen"] is not None


def test_status_is_built_once_per_change_whatever_the_number_of_viewers(tmp_path):
    server, _ = make_server(tmp_path)
    with TestClient(create_app(server, extra_routes=mount_dashboard)) as client:
        hub = client.app.state.dashboard
        sockets = [client.websocket_connect(f"/api/runs/{RUN}/live") for _ in range(8)]
        viewers = [s.__enter__() for s in sockets]
        try:
            for ws in viewers:
                assert receive_until(ws, lambda d: True)["run_id"] == RUN
            time.sleep(0.6)  # let the refresh that each new viewer asked for settle
            before = hub.builds
            ident = Identity.generate()
            join(client, ident)
            for ws in viewers:
                receive_until(ws, lambda d: ident.public_key.hex() in d["pending"])
            assert 1 <= hub.builds - before <= 2
        finally:
            for s in sockets:
                s.__exit__(None, None, None)


def test_unknown_run_and_runs_list(tmp_path):
    server, _ = make_server(tmp_path)
    with TestClient(create_app(server, extra_routes=mount_dashboard)) as client:
        with client.websocket_connect("/api/runs/nope/live") as ws:
            msg = ws.receive_json()
            assert msg["type"] == "error" and "nope" in msg["message"]
        with client.websocket_connect("/api/live") as ws:
            msg = ws.receive_json()
            assert msg["type"] == "snapshot" and [r["run_id"] for r in msg["data"]] == [RUN]


# --- the remote proxy (`psyche dashboard --server URL`) ------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """A real coordinator server on a loopback port, in a thread, that can be stopped and restarted."""

    def __init__(self, db, port: int, *, dashboard: bool):
        self.db, self.port, self.dashboard = db, port, dashboard
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> Upstream:
        self.server = CoordinatorServer(Store(self.db), tick_interval=0.05)
        if RUN not in self.server.hosts:
            self.server.create_run(CFG, bytes(32))
        app = create_app(self.server, extra_routes=mount_dashboard if self.dashboard else None)
        self.uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("upstream did not start")

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(20)
        self.server.store.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dashboard", [True, False], ids=["live-upstream", "polled-upstream"])
def test_proxy_follows_a_remote_server_across_its_restart(tmp_path, dashboard):
    up = Upstream(tmp_path / "run.sqlite", free_port(), dashboard=dashboard).start()
    ident = Identity.generate()
    try:
        with TestClient(create_proxy_app(up.url, poll_interval=0.2)) as client:
            assert client.get("/").status_code == 200
            assert client.get("/api/runs").json()[0]["run_id"] == RUN
            with client.websocket_connect(f"/api/runs/{RUN}/live") as ws:
                assert receive_until(ws, lambda d: True)["run_id"] == RUN
                up.stop()
                # A change made while the proxy is cut off shows up once the server is back.
                up.start()
                body = sign_request(ident, RUN, "instruction", encode_instruction(Join(p2p_address="addr")))
                assert httpx.post(f"{up.url}/api/runs/{RUN}/instructions", content=body).status_code == 200
                doc = receive_until(ws, lambda d: d.get("pending") == [ident.public_key.hex()], limit=200)
                assert doc["run_id"] == RUN
            with client.websocket_connect("/api/runs/other/live") as ws:
                assert "error" in receive_until(ws, lambda d: "error" in d)
    finally:
        up.stop()


def test_static_assets_are_small_and_self_contained():
    text = "".join(p.read_text() for p in STATIC.iterdir() if p.suffix in (".js", ".css", ".html"))
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), "no off-server URLs in the page's assets"
    assert sum(p.stat().st_size for p in STATIC.iterdir()) < 200_000
