"""A newcomer's first hour with `psyche client` and `psyche server`: what each says while
connecting, waiting and sharing keys (issue 12).

The first tests read the pure parts (wait lines, server log lines, reachability notices);
the rest run the real commands in subprocesses and read what a user sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from psyche.config import parse_config
from psyche.coordinator import Coordinator, Join, Pause, Resume, Tick, Withdraw
from psyche.localports import free_port
from psyche.ledger.remote import Reachability, server_url_problem
from psyche.ledger.status import run_events, run_summary
from psyche.client.runtime import wait_notice
from tests.netutil import ROOT, Network

CFG = parse_config({
    "name": "newcomer",
    "coordinator": {"init_min_clients": 2, "min_clients": 1, "witness_nodes": 1, "total_steps": 2,
                    "global_batch_size_start": 4, "global_batch_size_end": 4, "checkpointers": 1,
                    "waiting_for_members_extra_time": 1, "warmup_time": 5},
    "lr": {"warmup_steps": 1},
})
AUTHORITY, A, B = b"\x01" * 32, b"\xaa" * 32, b"\xbb" * 32


def _apply(coord: Coordinator, instr, signer: bytes, now: int) -> None:
    err = coord.apply(instr, signer, now, bytes(32))
    assert err is None, err


def _events(coord: Coordinator, instr, signer: bytes, now: int, **kw) -> list[str]:
    before = coord.copy().state
    _apply(coord, instr, signer, now)
    return run_events(before, coord.state, name="newcomer", **kw)


# --- pure parts ---------------------------------------------------------------------------


def test_a_client_says_what_it_waits_for_and_the_server_logs_each_change():
    coord = Coordinator.new(CFG.run_id, CFG, authority=AUTHORITY, now=100)
    s = coord.state
    assert wait_notice(s, A) is None, "not joined yet: nothing to wait for"
    assert _events(coord, Join(p2p_address="mem:a"), A, 100, origin="10.0.0.1:5000") == [
        "client aaaaaaaa joined from 10.0.0.1:5000 for epoch 0 (1 joined, 2 needed to start)"]
    assert wait_notice(coord.state, A) == "waiting for members: 1 of 2 needed to start (init_min_clients = 2)"
    assert run_summary(coord, CFG)["clients"] == 0 and run_summary(coord, CFG)["waiting"] == 1
    _apply(coord, Join(p2p_address="mem:b"), B, 101)
    assert wait_notice(coord.state, A) == ("2 members joined; epoch 0 starts once no more join for 1s "
                                           "(waiting_for_members_extra_time)")
    started = _events(coord, Tick(), AUTHORITY, 103)
    assert started == ["epoch 0 started with 2 members: aaaaaaaa, bbbbbbbb"]
    assert wait_notice(coord.state, A) == "epoch 0 starts with 2 members; warmup: getting the model (up to 5s)"
    summary = run_summary(coord, CFG)
    assert (summary["clients"], summary["waiting"], summary["init_min_clients"]) == (2, 0, 2)
    # Warmup ends by the clock: the warmup witness never said it was ready and is dropped; the
    # first round trains with the other.
    silent = coord.state.clients[coord.state.warmup_witnesses[0]].id
    other = A if silent == B else B
    assert _events(coord, Tick(), AUTHORITY, 109) == [
        f"client {silent.hex()[:8]} was dropped in epoch 0 (1 healthy members left)"]
    assert wait_notice(coord.state, other) is None, "a training member is not waiting"
    c = b"\xcc" * 32
    assert _events(coord, Join(p2p_address="mem:c"), c, 110) == ["client cccccccc joined; it waits for epoch 0 to end"]
    assert wait_notice(coord.state, c) == "waiting for epoch 0 to end (0 of 2 steps done): this node joins epoch 1"
    assert _events(coord, Withdraw(), other, 111) == [
        f"client {other.hex()[:8]} withdrew in epoch 0 (0 healthy members left)"]
    assert _events(coord, Pause(), AUTHORITY, 112) == ["pause requested: the run pauses at the end of the current round"]
    lines = _events(coord, Tick(), AUTHORITY, 200)  # the round times out: witness window, cooldown ...
    for now in range(201, 240):
        before = coord.copy().state
        if coord.apply(Tick(), AUTHORITY, now, bytes(32)) is None:
            lines += run_events(before, coord.state, name="newcomer")
    assert any(re.fullmatch(r"step 1/2 finished(, loss [0-9.]+)?, \d+ trainers", x) for x in lines), lines
    assert lines[-1] == "run newcomer paused after step 1; every member withdrew", lines
    assert wait_notice(coord.state, A) == ("the run is paused after step 1; waiting for its authority to resume it "
                                           "(`psyche resume`)")
    assert _events(coord, Resume(), AUTHORITY, 300) == ["run newcomer resumed after step 1; waiting for members to join again"]


def test_reachability_is_said_once_when_lost_at_a_modest_interval_and_once_when_back():
    r = Reachability("http://h:1", retry_every=2)
    assert r.answered(0) is None
    assert r.failed(10, "connection refused") == "coordinator unreachable at http://h:1 (connection refused), retrying every 2s"
    assert [r.failed(t, "connection refused") for t in (12, 20, 39)] == [None, None, None]
    assert r.failed(40, "connection refused") == ("coordinator still unreachable at http://h:1 after 30s "
                                                  "(connection refused), retrying every 2s")
    assert r.failed(42, "connection refused") is None
    assert r.answered(52) == "coordinator reachable again after 42s"
    assert r.answered(53) is None


def test_a_server_url_needs_a_scheme_and_a_host():
    assert server_url_problem("http://127.0.0.1:8000") is None
    assert server_url_problem("https://coord.example") is None
    for bad in ("127.0.0.1:8000", "localhost:8000", "http://", "ftp://h:1", "http://h:port"):
        assert server_url_problem(bad) == f"--server must be a URL like http://HOST:PORT (got {bad!r})"


# --- the real commands ----------------------------------------------------------------------


def psyche(*args: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "psyche.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_error_line(done: subprocess.CompletedProcess, *, stdout: int = 0) -> str:
    """The single line a refused command printed on stderr (after ``stdout`` lines of progress)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stdout.strip().splitlines()) == stdout, done.stdout
    return lines[0]


def test_client_help_says_a_server_or_solana_url_is_required(tmp_path):
    said = " ".join(psyche("client", "--help", cwd=tmp_path).stdout.split())
    assert "required: this or --solana" in said and "required instead of --server" in said


def test_a_bad_or_unreachable_server_is_one_line_and_creates_no_key(tmp_path):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    assert one_error_line(psyche("client", "--server", "127.0.0.1:8000", cwd=tmp_path)) == \
        "error: --server must be a URL like http://HOST:PORT (got '127.0.0.1:8000')"
    assert one_error_line(psyche("client", "--server", url, cwd=tmp_path)) == \
        f"error: cannot reach the coordinator server at {url} (connection refused); is `psyche server` running there?"
    assert not (tmp_path / "client.key").exists(), "no key before the server was reached"
    assert psyche("keygen", "authority.key", cwd=tmp_path).returncode == 0
    for cmd in ("pause", "resume"):
        assert one_error_line(psyche(cmd, "--server", "localhost:8000", "--key", "authority.key", cwd=tmp_path)) == \
            "error: --server must be a URL like http://HOST:PORT (got 'localhost:8000')"
        assert one_error_line(psyche(cmd, "--server", url, "--key", "authority.key", cwd=tmp_path)) == \
            f"error: cannot reach the coordinator server at {url} (connection refused); is `psyche server` running there?"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authority.key"]


def said(net: Network, name: str) -> str:
    """A process's log with rich's line wrapping undone."""
    return " ".join(net.log(name, tail=1_000_000).split())


@pytest.mark.e2e
def test_missing_data_is_one_line_naming_the_path_and_creates_no_key(network):
    net = network("newcomer-data", init_min_clients=2)
    net.start_server()
    missing = net.root / "no-such-data"
    done = psyche("client", "--server", net.url, "--key", str(net.root / "c.key"), "--data", str(missing),
                  cwd=net.root)
    line = one_error_line(done)
    assert line.startswith("error: ") and str(missing) in line and "psyche tokenize" in line, line
    assert not (net.root / "c.key").exists()


@pytest.mark.e2e
def test_a_lone_client_says_it_waits_then_the_run_starts_trains_and_finishes_in_the_server_log(network):
    net = network("newcomer-wait", init_min_clients=2, min_clients=1, total_steps=2, checkpointers=0)
    net.start_server()
    net.start_client(0)
    net.wait(lambda: "waiting for members: 1 of 2 needed to start (init_min_clients = 2)" in said(net, "client-0"),
             120, "client-0 to say what it waits for")
    runs = httpx.get(f"{net.url}/api/runs", timeout=10).json()
    assert (runs[0]["clients"], runs[0]["waiting"], runs[0]["init_min_clients"]) == (0, 1, 2)
    net.start_client(1)
    # Each says the epoch starts (in warmup, or once training when its warmup passed unseen).
    for i in (0, 1):
        net.wait(lambda i=i: re.search(r"epoch 0 start(s|ed) with 2 members", said(net, f"client-{i}")), 120,
                 f"client-{i}: epoch 0")
    net.wait_state(lambda s: s["state"] == "Finished", 240, "the run to finish")
    for i in (0, 1):
        assert net.procs[f"client-{i}"].wait(60) == 0, net.log(f"client-{i}")
    server = said(net, "server")
    a, b = net.client_id(0)[:8], net.client_id(1)[:8]
    assert re.search(rf"INFO psyche.server {net.cfg.run_id}: client {a} joined from 127\.0\.0\.1:\d+ for epoch 0 "
                     r"\(1 joined, 2 needed to start\)", server), server
    assert f"client {b} joined from 127.0.0.1:" in server
    assert "epoch 0 started with 2 members: " in server
    assert re.search(r"step 1/2 finished(, loss [0-9.]+)?, 2 trainers", server), server
    assert re.search(r"step 2/2 finished(, loss [0-9.]+)?, 2 trainers", server), server
    assert "run newcomer-wait finished at step 2" in server
    assert "Traceback" not in server


@pytest.mark.e2e
def test_a_client_says_once_when_the_server_goes_away_and_when_it_is_back(network):
    net = network("newcomer-down", init_min_clients=2)
    net.start_server()
    net.start_client(0)
    net.wait(lambda: "waiting for members: 1 of 2" in said(net, "client-0"), 120, "client-0 to wait")
    net.kill("server")
    down = f"coordinator unreachable at {net.url} (connection refused), retrying every 2s"
    net.wait(lambda: down in said(net, "client-0"), 30, "client-0 to say the server is unreachable")
    time.sleep(6)  # several retries: still said once
    net.start_server()
    net.wait(lambda: "coordinator reachable again after" in said(net, "client-0"), 60, "client-0 to say it is back")
    log = said(net, "client-0")
    assert log.count(down) == 1 and "still unreachable" not in log and "Traceback" not in log, log
    assert "ConnectError" not in log and "Errno" not in log, log


@pytest.mark.e2e
def test_a_key_in_use_by_a_live_node_is_refused_and_a_dead_ones_key_is_taken_over(network):
    """Two `psyche client` without --key in one folder: the newcomer stays out and the live node
    keeps its key. A node restarted after it was killed still takes its key over."""
    net = network("newcomer-twice")  # 3 clients needed to start: the run stays WaitingForMembers
    net.start_server()
    net.start_client(0)
    net.wait(lambda: (net.root / "client-0.key").exists(), 60, "client-0 to create its key")
    me = net.client_id(0)
    net.wait_state(lambda s: me in s["pending"], 120, "client-0 to join")
    key = str(net.root / "client-0.key")
    twin = psyche("client", "--server", net.url, "--key", key, cwd=ROOT, timeout=120)
    line = one_error_line(twin, stdout=1)
    assert "p2p address ready" in twin.stdout, "its one line of progress: the node started, nothing more"
    assert re.fullmatch(rf"error: {re.escape(key)} is in use by a live node at 127\.0\.0\.1:\d+ \(another psyche "
                        r"client\?\); give each node its own key: --key other\.key", line), line
    assert net.procs["client-0"].poll() is None, "the live node keeps its key"
    assert me in net.status()["pending"], "and stays in the run"
    assert "another process registered" not in said(net, "client-0")
    # The same key after its process was killed: the new process takes the run's entry over.
    net.kill("client-0")
    net._spawn("restarted", ["client", "--server", net.url, "--key", key])
    net.wait(lambda: "re-registered this key" in net.log("restarted"), 60, "the restarted node to take its key over")
    assert me in net.status()["pending"]
