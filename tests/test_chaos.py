"""Whole runs on a WAN that misbehaves: a killed client, a killed and restarted server, a
cut link, loss on every link, and uneven machines (a client starved of CPU, a client whose
link slows to a trickle: each must lose share of the batch instead of holding up the run).

Each scenario is a real run (``psyche server`` and three ``psyche client`` processes,
each on its own testbed node behind a shaped 50 Mbit/s link, the clients on 0.6 of a
core) with faults injected while it trains. Whatever happened, the run must end
Finished with every step 1..N in its history exactly once, the clients that came
through (not killed, and at the final step) must exit 0 with identical weights, and
the checkpoint must load and give finite logits.

``pytest -m chaos`` runs them (as root: the testbed needs namespaces and cgroups; they
are skipped elsewhere). By default each run is 20 steps with the fault at step 3, about
20-45 s a scenario on a 2-core machine; ``PSYCHE_FULL=1`` makes it 60 steps, the fault at
step 10.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from psyche.testbed import Link, Node, missing_requirement
from psyche.testbed import Testbed as Bed  # a name pytest does not take for a test class
from psyche.testing.network import Network, client_node, small_config

_MISSING = missing_requirement()
pytestmark = [pytest.mark.chaos, pytest.mark.e2e,
              pytest.mark.skipif(_MISSING is not None, reason=f"no testbed on this machine: {_MISSING}")]

FULL = os.environ.get("PSYCHE_FULL") == "1"
STEPS = 60 if FULL else 20
AT_STEP = 10 if FULL else 3
"""The step a fault waits for (a round of this model takes a fraction of a second)."""
CLIENTS = 3
CPU = 0.6
"""Each client node's CPU share, in cores."""
LINK = Link(mbit=50)

# A slow, lossy network: rounds may take many seconds, a restart or a cut link stalls one.
# Late witnesses get 6 s (the default is 5): with 3 s, a CPU-starved client on the 5 %-loss links
# once sent its witness report after the window and was dropped (loss-5pct, step 3).
TIMINGS: dict[str, Any] = dict(warmup_time=25, max_round_train_time=20, round_witness_time=6, cooldown_time=4,
                               epoch_time=3600, min_clients=2, init_min_clients=3, checkpointers=1)

IN_ROUND = ("RoundTrain", "RoundWitness")


@pytest.fixture
def chaos_run(testbed_run, data_dir):
    """``start(name, link=LINK, **coordinator)``: a testbed (node ``server`` with a control link, client nodes
    ``c0..c2`` with ``CPU`` cores each, every node on ``link``) and a ``STEPS``-step run on it,
    server and clients started; everything is stopped and torn down afterwards, whatever happened."""

    def start(name: str, *, link: Link = LINK, **coordinator: Any) -> tuple[Bed, Network]:
        cfg = small_config(name, data=data_dir, **{"total_steps": STEPS, **TIMINGS, **coordinator})
        return testbed_run(cfg, [Node("server", link, control=True)]
                           + [Node(client_node(i), link, cpu=CPU) for i in range(CLIENTS)])

    return start


def wait_step(net: Network, step: int) -> dict:
    """Wait until the run trains step ``step`` (or a later one)."""
    s = net.wait_state(lambda s: s["state"] in IN_ROUND and s["step"] >= step or s["state"] == "Finished", 300,
                       f"step {step}")
    assert s["state"] != "Finished", f"the run finished before step {step}, where the fault was due"
    return s


def check_finished(net: Network, steps: int, *, killed: frozenset[int] = frozenset(),
                   may_drop: frozenset[int] = frozenset()) -> dict:
    """The run ends Finished with steps 1..``steps`` each once in its history; the ``killed``
    clients are not members, every other client exits 0; those at step ``steps`` (all but ``may_drop``,
    and at least two) hold the same weights; the checkpoint loads and gives finite logits.
    Returns the final status."""
    import torch
    from transformers import AutoModelForCausalLM

    final = net.wait_state(lambda s: s["state"] == "Finished", 300 + 20 * steps, "the run to finish")
    assert [h["step"] for h in final["history"]] == list(range(1, steps + 1)), final["history"]
    states = {c["id"]: c["state"] for c in final["clients"]}
    for i in killed:  # dropped, and gone from the member list by the end
        assert states.get(net.client_id(i)) in (None, "Dropped"), f"killed client-{i}: {states[net.client_id(i)]}"
    profiles: dict[int, dict | None] = {}
    for i in range(CLIENTS):
        if i in killed:
            continue
        assert net.wait_exit(f"client-{i}", 120) == 0, net.log(f"client-{i}")
        path = net.profile_path(i)
        profiles[i] = net.profile(i) if path.exists() else None  # none if it never trained
    survivors = {i: p for i, p in profiles.items() if p is not None and p["applied_step"] == steps}
    expected = set(range(CLIENTS)) - killed - may_drop
    assert survivors.keys() >= expected and len(survivors) >= 2, (
        f"clients at step {steps}: {sorted(survivors)}; expected at least {sorted(expected)} and two; "
        f"applied steps: { {i: p and p['applied_step'] for i, p in profiles.items()} }")
    digests = {i: p["weights_sha256"] for i, p in survivors.items()}
    assert len(set(digests.values())) == 1 and None not in digests.values(), digests

    model = AutoModelForCausalLM.from_pretrained(str(net.root / "checkpoint"))
    ids = torch.arange(1, 17).unsqueeze(0)  # (1, 16)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return final


# --- faults: each waits for its step, then strikes; returns the clients it killed ----------

def kill_client(bed: Bed, net: Network, at_step: int = AT_STEP) -> set[int]:
    """SIGKILL client 2 mid-round; it is dropped and the other two go on (min_clients 2)."""
    wait_step(net, at_step)
    net.kill("client-2")
    return {2}


def restart_server(bed: Bed, net: Network, at_step: int = AT_STEP) -> set[int]:
    """SIGKILL the server mid-round and start it again on its database."""
    s = wait_step(net, at_step)
    net.kill("server")
    time.sleep(2)
    net.start_server()
    assert net.status()["step"] >= s["step"], "the restarted server resumed where it was"
    return set()


def cut_link(bed: Bed, net: Network, at_step: int = AT_STEP) -> set[int]:
    """Cut client 1's link for 15 s (it may be dropped for the results it could not send)."""
    wait_step(net, at_step)
    bed.link_down(client_node(1), for_seconds=15)
    return set()


@dataclass(frozen=True)
class Scenario:
    name: str
    faults: tuple[Callable[..., set[int]], ...]
    link: Link = LINK
    may_drop: frozenset[int] = frozenset()
    """Clients the faults may leave behind the final step (dropped, not rejoined before the end)."""

    def __str__(self) -> str:
        return self.name


SCENARIOS = [
    Scenario("kill-client", (kill_client,)),
    # A restarted server holds the run's clock a few seconds (RESTART_GRACE_S) while clients
    # resend what it missed: no one is dropped for the server's own outage.
    Scenario("restart-server", (restart_server,)),
    Scenario("cut-link", (cut_link,), may_drop=frozenset({1})),
    Scenario("loss-5pct", (), link=Link(mbit=50, loss=5)),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_a_run_survives(chaos_run, scenario: Scenario):
    bed, net = chaos_run(f"chaos-{scenario.name}", link=scenario.link)
    killed: set[int] = set()
    for fault in scenario.faults:
        killed |= fault(bed, net)
    check_finished(net, STEPS, killed=frozenset(killed), may_drop=scenario.may_drop)


# --- uneven machines: shares follow what each node delivers -------------------------

SETTLE = 5
"""Rounds the run has to learn the nodes' speeds before a change."""
WITHIN = 5
"""Rounds after a CPU cut by which the share must have followed."""
LATE_WITHIN = 14
"""Rounds after a link cut to a trickle by which the share must have followed: the link's token
bucket first lets a burst through, so the results start arriving late about five rounds later,
and the backlog (so the delay) then grows round by round; measured here, the share is at 5-6 ten
rounds after the cut and still falling by a fifth a round."""
UNEVEN_STEPS = SETTLE + WITHIN + LATE_WITHIN + (20 if FULL else 4)


def share_at(net: Network, i: int, step: int) -> tuple[int, dict]:
    """Client ``i``'s share (samples) of the round training ``step`` (0: none), and that status."""
    s = net.wait_state(lambda s: s["state"] == "RoundTrain" and s["step"] >= step or s["state"] == "Finished",
                       300, f"step {step}", every=0.1)
    assert s["state"] != "Finished", f"the run finished before step {step}"
    row = next((c for c in s["clients"] if c["id"] == net.client_id(i)), None)
    return (row or {}).get("share") or 0, s


def shares_from(net: Network, i: int, first: int, rounds: int) -> list[int]:
    """Client ``i``'s share in each round from step ``first`` on, for ``rounds`` rounds."""
    return [share_at(net, i, step)[0] for step in range(first, first + rounds)]


def test_shares_follow_a_cpu_cut_and_a_late_link_and_the_run_goes_on(chaos_run):
    """Uneven machines, in one run: client 1's CPU is cut to a sixth, then client 2's link to a
    trickle while it keeps training at full speed (and its reports say so). Each loses share
    within a few rounds instead of making every round wait for it, and the run ends as every
    chaos run must."""
    # Enough work per round (36 sequences) that training, not the fixed costs, sets its length.
    bed, net = chaos_run("chaos-uneven", total_steps=UNEVEN_STEPS, checkpointers=1, max_round_train_time=30,
                         global_batch_size_start=36, global_batch_size_end=36)
    settled = shares_from(net, 1, SETTLE - 1, 2)
    # Equal nodes, but four processes share two cores here: a round's arrival delays jitter by a
    # quarter or so, and each estimate moves half way to the latest one, so an equal share (12)
    # wanders by about a third. The cut below must take it well under that band.
    assert all(8 <= x <= 16 for x in settled), f"equal nodes share 36 samples about equally: {settled}"

    _, s = share_at(net, 1, SETTLE + 1)
    bed.set_cpu(client_node(1), CPU / 6)
    after = shares_from(net, 1, s["step"] + 1, WITHIN)
    # Speeds 1 : 1 : 1/6 would give it 36 / 13 ≈ 3 samples; the floor is 1.
    assert min(after) <= 6 and after[-1] <= 7, f"client 1's shares after its CPU cut at step {s['step']}: {after}"
    rows = {c["id"]: c for c in net.status()["clients"]}
    slow, fast = rows[net.client_id(1)]["throughput"], rows[net.client_id(0)]["throughput"]
    assert slow is not None and fast is not None and slow < fast / 2, (slow, fast)

    before, s = share_at(net, 2, s["step"] + WITHIN + 1)
    assert before >= 8, f"client 2's share before its link is cut: {before}"
    bed.set_link(client_node(2), Link(mbit=0.05))
    late = shares_from(net, 2, s["step"] + 1, LATE_WITHIN)
    assert min(late) <= 4, f"client 2's shares after its link was cut at step {s['step']}: {late}"

    # The run went on at the others' pace: every step once, weights identical, checkpoint loads.
    # (Client 2 may lag behind the last step: its link moves 6 KB/s.)
    check_finished(net, UNEVEN_STEPS, may_drop=frozenset({2}))
