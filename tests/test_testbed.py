"""The testbed behaves like the WAN it stands for: shaped rates, loss, cut links, CPU
shares, byte counters, and a teardown that leaves nothing behind (also after a crash).

Traffic comes from small Python programs started on the nodes with ``bed.spawn``;
each writes what it measured to a JSON file in ``tmp_path``. The bands are wide:
these check that shaping is in place, not how exactly the kernel shapes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psyche.testbed import Link, Node, leftovers, missing_requirement, sweep
from psyche.testbed import Testbed as Bed  # a name pytest does not take for a test class

_MISSING = missing_requirement()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no testbed on this machine: {_MISSING}")

PORT = 5001

# --- programs run on the nodes (argv after -c) ----------------------------------------

TCP_SINK = """
import json, socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
srv = socket.create_server(("0.0.0.0", port))
open(out + ".ready", "w").close()
conn, _ = srv.accept()
n, t0 = 0, None
while chunk := conn.recv(1 << 16):
    t0 = t0 or time.monotonic()
    n += len(chunk)
json.dump({"bytes": n, "seconds": time.monotonic() - t0}, open(out, "w"))
"""

TCP_SEND = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(60)
s.sendall(b"x" * int(sys.argv[3]))
s.close()
"""

TCP_ACCEPT = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
open(sys.argv[2], "w").close()
while True:
    srv.accept()[0].close()
"""

TCP_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    print("connect failed:", repr(exc))
    raise SystemExit(1)
"""

# Counts distinct numbered datagrams; echoes "hello" so that a sender knows the path works.
UDP_SINK = """
import json, socket, sys, time
port, out, idle, total = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE (root may pass rmem_max)
s.bind(("0.0.0.0", port))
open(out + ".ready", "w").close()
seen = set()
end = time.monotonic() + total
while (left := end - time.monotonic()) > 0:
    s.settimeout(min(left, idle) if seen else left)
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        if seen:
            break
        continue
    if data == b"hello":
        s.sendto(data, peer)
    else:
        seen.add(int(data))
json.dump({"received": len(seen)}, open(out, "w"))
"""

# With handshake=1, first a "hello" answered by the sink: both sides' neighbour (ARP) entries
# are resolved, so no datagram is lost waiting for one, and only the link's loss counts.
UDP_SEND = """
import socket, sys, time
host, port, count, handshake = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
deadline = time.monotonic() + 10
while handshake:
    s.sendto(b"hello", (host, port))
    try:
        handshake = s.recv(64) != b"hello"
    except socket.timeout:
        if time.monotonic() > deadline:
            raise SystemExit("no answer to hello")
for i in range(count):
    s.sendto(str(i).encode(), (host, port))
    if i % 20 == 19:
        time.sleep(0.005)  # paced: the sink's socket buffer never overflows
"""

# Busy for 1.5 s (CPU time per wall second), waits for the file GO, busy for 1 s again.
CPU_BURN = """
import json, os, resource, sys, time
def burn(seconds):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    while time.monotonic() - t0 < seconds:
        pass
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (time.monotonic() - t0)
out, go = sys.argv[1], sys.argv[2]
first = burn(1.5)
open(out + ".first", "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
json.dump({"first": first, "second": burn(1.0)}, open(out, "w"))
"""

# Creates a testbed with a process on it, says its tag and that process's pid, then sleeps
# (argv[1] == "keep": up(keep=True) and exit at once instead).
OWNER = """
import sys, time
from psyche.testbed import Node, Testbed
bed = Testbed([Node("a"), Node("b", control=True)])
bed.up(keep=sys.argv[1] == "keep")
p = bed.spawn("a", ["sleep", "600"])
print(bed.tag, p.pid, flush=True)
if sys.argv[1] != "keep":
    time.sleep(600)
"""


# --- helpers --------------------------------------------------------------------------

def _spawn(bed: Bed, node: str, code: str, *args: object, log: Path) -> subprocess.Popen:
    return bed.spawn(node, [sys.executable, "-c", code, *map(str, args)], log=log)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 30) -> int:
    """Wait for ``proc``; its exit code (the log is in the message of a timeout)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s; log:\n{log.read_text()}") from None


def _ok(proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    assert _finish(proc, log, timeout) == 0, log.read_text()


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 10) -> None:
    """Wait until ``proc`` (logging to ``log``) has created ``path``."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before writing {path.name}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout} s:\n{log.read_text()}"
        time.sleep(0.02)


def _tcp_mbit(bed: Bed, tmp_path: Path, src: str, dst: str, nbytes: int) -> float:
    """Send ``nbytes`` over TCP from ``src`` to ``dst``; the rate the receiver saw, Mbit/s."""
    out, log = tmp_path / f"tcp-{src}-{dst}.json", tmp_path / f"tcp-{src}-{dst}.log"
    sink = _spawn(bed, dst, TCP_SINK, PORT, out, log=log)
    _wait_file(Path(f"{out}.ready"), sink, log)
    _ok(_spawn(bed, src, TCP_SEND, bed.ip(dst), PORT, nbytes, log=log), log)
    _ok(sink, log)
    got = json.loads(out.read_text())
    assert got["bytes"] == nbytes
    return nbytes * 8 / got["seconds"] / 1e6


def _udp_received(bed: Bed, tmp_path: Path, src: str, dst: str, count: int, *, handshake: bool = True,
                  total: float = 20) -> int:
    """Send ``count`` numbered datagrams from ``src`` to ``dst``; how many distinct ones arrived."""
    out, log = tmp_path / f"udp-{src}-{dst}.json", tmp_path / f"udp-{src}-{dst}.log"
    out.unlink(missing_ok=True)
    Path(f"{out}.ready").unlink(missing_ok=True)
    sink = _spawn(bed, dst, UDP_SINK, PORT, out, 1.0, total, log=log)
    _wait_file(Path(f"{out}.ready"), sink, log)
    _ok(_spawn(bed, src, UDP_SEND, bed.ip(dst), PORT, count, int(handshake), log=log), log)
    _ok(sink, log, timeout=total + 10)
    return json.loads(out.read_text())["received"]


def _probe(bed: Bed, tmp_path: Path, src: str, dst: str, timeout: float) -> bool:
    """Whether a TCP connect from ``src`` to ``dst`` (running TCP_ACCEPT) succeeds within ``timeout``."""
    log = tmp_path / "probe.log"
    return _finish(_spawn(bed, src, TCP_PROBE, bed.ip(dst), PORT, timeout, log=log), log) == 0


def _ours(tag: str) -> list[str]:
    """What is left of testbed ``tag`` (other testbeds on this machine are none of our business)."""
    return [x for x in leftovers() if f"psytb-{tag}" in x]


def _gone(pid: int, timeout: float = 5) -> bool:
    """Whether process ``pid`` is gone (an orphan's zombie is reaped by init a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def alone() -> None:
    """Skip unless this test's testbeds are the only ones: it removes every testbed on the machine."""
    sweep()  # testbeds whose owner died are fair game
    if others := leftovers():
        pytest.skip(f"another testbed is up here and this test removes them all: {others[:3]}")


# --- links ----------------------------------------------------------------------------

def test_a_shaped_link_runs_at_its_rate_in_both_directions_and_an_unshaped_one_much_faster(tmp_path):
    with Bed([Node("a", Link(mbit=20)), Node("b"), Node("c")]) as bed:
        upload = _tcp_mbit(bed, tmp_path, "a", "b", 3_000_000)
        download = _tcp_mbit(bed, tmp_path, "b", "a", 3_000_000)
        free = _tcp_mbit(bed, tmp_path, "c", "b", 3_000_000)
    assert 12 <= upload <= 24, f"upload over a 20 Mbit/s link ran at {upload:.1f} Mbit/s"
    assert 12 <= download <= 24, f"download over a 20 Mbit/s link ran at {download:.1f} Mbit/s"
    assert free > 2 * max(upload, download), f"unshaped: {free:.1f} Mbit/s, shaped: {upload:.1f}/{download:.1f}"


def test_a_lossy_link_drops_that_share_of_datagrams_and_a_clean_one_none(tmp_path):
    # Only the sender's link is lossy: a datagram between two lossy nodes would cross two.
    with Bed([Node("lossy", Link(loss=20)), Node("clean"), Node("sink")]) as bed:
        lossy = _udp_received(bed, tmp_path, "lossy", "sink", 2000)
        clean = _udp_received(bed, tmp_path, "clean", "sink", 2000)
    assert 0.70 <= lossy / 2000 <= 0.90, f"{lossy} of 2000 datagrams crossed a 20 % lossy link"
    assert clean >= 0.99 * 2000, f"{clean} of 2000 datagrams crossed a clean link"


def test_a_cut_link_carries_nothing_until_it_is_up_again_by_hand_or_after_for_seconds(tmp_path):
    with Bed([Node("a"), Node("b")]) as bed:
        server = _spawn(bed, "b", TCP_ACCEPT, PORT, tmp_path / "accepting", log=tmp_path / "accept.log")
        _wait_file(tmp_path / "accepting", server, tmp_path / "accept.log")
        assert _probe(bed, tmp_path, "a", "b", timeout=5)

        bed.link_down("a")
        assert not _probe(bed, tmp_path, "a", "b", timeout=1)
        assert _udp_received(bed, tmp_path, "a", "b", 100, handshake=False, total=1.5) == 0

        bed.link_up("a")
        assert _probe(bed, tmp_path, "a", "b", timeout=5)
        assert _udp_received(bed, tmp_path, "a", "b", 100) == 100

        bed.link_down("a", for_seconds=2)
        assert not bed.nodes["a"].link.up
        assert not _probe(bed, tmp_path, "a", "b", timeout=0.5)
        deadline = time.monotonic() + 10
        while not bed.nodes["a"].link.up:
            assert time.monotonic() < deadline, "link_down(for_seconds=2) did not come back up by itself"
            time.sleep(0.1)
        assert _probe(bed, tmp_path, "a", "b", timeout=5)


def test_bytes_counts_at_least_what_was_sent_and_received(tmp_path):
    with Bed([Node("a"), Node("b")]) as bed:
        sent0, _ = bed.bytes("a")
        _, received0 = bed.bytes("b")
        _tcp_mbit(bed, tmp_path, "a", "b", 1_000_000)
        sent1, _ = bed.bytes("a")
        _, received1 = bed.bytes("b")
    assert sent1 - sent0 >= 1_000_000
    assert received1 - received0 >= 1_000_000


# --- CPU ------------------------------------------------------------------------------

def test_a_cpu_share_limits_a_busy_loop_and_set_cpu_none_lifts_it_while_it_runs(tmp_path):
    out, log = tmp_path / "burn.json", tmp_path / "burn.log"
    with Bed([Node("p", cpu=0.25)]) as bed:
        burn = _spawn(bed, "p", CPU_BURN, out, tmp_path / "go", log=log)
        _wait_file(Path(f"{out}.first"), burn, log, timeout=30)
        bed.set_cpu("p", None)
        (tmp_path / "go").touch()
        _ok(burn, log)
    got = json.loads(out.read_text())
    assert 0.15 <= got["first"] <= 0.35, f"with cpu=0.25 a busy loop used {got['first']:.2f} of a core"
    assert got["second"] > 0.5, f"with no limit a busy loop used {got['second']:.2f} of a core"


# --- teardown -------------------------------------------------------------------------

def _sleeper(bed: Bed, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A `sleep 600` on node a, and a grandchild `sleep 600` of ours (not our child: only the cgroup finds it)."""
    proc = bed.spawn("a", ["sh", "-c", f"sleep 600 & echo $! > {tmp_path}/grandchild; wait"])
    path, deadline = tmp_path / "grandchild", time.monotonic() + 10
    while not (path.exists() and path.read_text().endswith("\n")):  # the shell creates it, then writes
        assert time.monotonic() < deadline, "the shell on node a did not start its sleep"
        time.sleep(0.02)
    return proc, int(path.read_text())


def test_leaving_the_with_block_removes_everything_and_kills_every_process_on_the_nodes(tmp_path):
    with Bed([Node("a", Link(20, 1), cpu=0.5), Node("b", control=True)]) as bed:
        proc, grandchild = _sleeper(bed, tmp_path)
        assert _ours(bed.tag), "a testbed that is up shows in leftovers()"
    assert proc.wait(10) == -signal.SIGKILL
    assert _gone(proc.pid) and _gone(grandchild)
    assert _ours(bed.tag) == []


def test_an_exception_in_the_with_block_still_removes_everything(tmp_path):
    bed = Bed([Node("a"), Node("b", control=True)])
    with pytest.raises(RuntimeError, match="boom"):
        with bed:
            proc, grandchild = _sleeper(bed, tmp_path)
            raise RuntimeError("boom")
    assert proc.wait(10) == -signal.SIGKILL
    assert _gone(grandchild)
    assert _ours(bed.tag) == []


def _owner(*args: str) -> tuple[subprocess.Popen, str, int]:
    """Run OWNER in a child process; it, the tag of its testbed and the pid of the process on it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, *args], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, f"the owner process failed (exit code {owner.wait(10)})"
    tag, pid = line.split()
    return owner, tag, int(pid)


def test_a_testbed_whose_owner_was_killed_is_removed_by_the_next_sweep():
    owner, tag, sleeper = _owner("die")
    try:
        assert _ours(tag)
        assert tag not in sweep(), "the owner is alive"
        owner.kill()
        owner.wait(10)
        assert tag in sweep()
        assert _ours(tag) == []
        assert _gone(sleeper)
    finally:
        owner.kill()
        owner.wait(10)
        sweep()


def test_a_kept_testbed_outlives_its_process_and_sweep_and_goes_with_sweep_everything(alone):
    owner, tag, sleeper = _owner("keep")
    try:
        assert owner.wait(30) == 0
        assert tag not in sweep()
        assert _ours(tag) and not _gone(sleeper, timeout=0)
        assert tag in sweep(everything=True)
        assert _ours(tag) == []
        assert _gone(sleeper)
    finally:
        sweep(everything=True)


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: Node("Server"), "name"),
    (lambda: Node("a_b"), "name"),
    (lambda: Node("a-very-long-name"), "name"),
    (lambda: Bed([Node("a"), Node("a")]), "names must be unique"),
    (lambda: Node("a", cpu=-1), "cpu"),
    (lambda: Node("a", cpu=0), "cpu"),
    (lambda: Link(loss=101), "loss"),
    (lambda: Link(loss=-1), "loss"),
    (lambda: Link(mbit=0), "rate"),
])
def test_a_bad_value_raises_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


# --- psyche testbed -------------------------------------------------------------------

def _psyche(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psyche.cli", *args], capture_output=True, text=True, timeout=120)


def test_psyche_testbed_up_status_down(alone):
    try:
        up = _psyche("testbed", "up", "--clients", "2", "--mbit", "50")
        assert up.returncode == 0, up.stderr
        for name in ("server", "c0", "c1"):
            assert f"{name} " in up.stdout, up.stdout
        assert "ip netns exec" in up.stdout
        status = _psyche("testbed", "status")
        assert status.returncode == 0, status.stderr
        assert "server, c0, c1" in status.stdout, status.stdout
    finally:
        down = _psyche("testbed", "down")
    assert down.returncode == 0, down.stderr
    assert "removed testbed" in down.stdout
    assert leftovers() == []
    again = _psyche("testbed", "down")
    assert again.returncode == 0 and "no testbed was up" in again.stdout


@pytest.mark.parametrize("option, value", [("--cpu", "0"), ("--loss", "101"), ("--mbit", "-1"),
                                           ("--server-mbit", "fast")])
def test_psyche_testbed_up_refuses_a_bad_value_naming_the_option(option, value):
    done = _psyche("testbed", "up", option, value)
    assert done.returncode != 0
    assert done.stderr.startswith("error:") and option in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
