"""Uneven machines in a real run: shares follow what each node delivers, seen through the status API.

Real ``psyche server`` and three ``psyche client`` processes, each client on its own
testbed node (0.6 of a core, a 50 Mbit/s link). Two changes strike mid-run, one after
the other:

- one client's CPU quota is cut to a sixth: within a few rounds its share of the
  batch shrinks to about what it can still do;
- one client trains at full speed (its own reports say so) but its link is cut to a
  trickle, so its results reach the witnesses late: it loses share rather than making
  every round wait for it.

Either way the run ends Finished with every step once. ``pytest -m chaos`` runs it
(as root; skipped where the machine cannot build a testbed). ``PSYCHE_FULL=1`` runs
it longer.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from psyche.testbed import Link, Node, missing_requirement
from psyche.testbed import Testbed as Bed
from psyche.testing.network import Network, client_node, small_config

_MISSING = missing_requirement()
pytestmark = [pytest.mark.chaos, pytest.mark.e2e,
              pytest.mark.skipif(_MISSING is not None, reason=f"no testbed on this machine: {_MISSING}")]

FULL = os.environ.get("PSYCHE_FULL") == "1"
SETTLE = 5
"""Rounds the run has to learn the nodes' speeds before the change."""
WITHIN = 5
"""Rounds after a CPU cut by which the share must have followed."""
LATE_WITHIN = 10
"""Rounds after a link cut to a trickle by which the share must have followed: the link's token
bucket first lets a burst through, so the results start arriving late a few rounds later."""
STEPS = SETTLE + WITHIN + LATE_WITHIN + (20 if FULL else 4)
CPU = 0.6
LINK = Link(mbit=50)
TIMINGS: dict[str, Any] = dict(warmup_time=25, max_round_train_time=30, round_witness_time=3, cooldown_time=4,
                               epoch_time=3600, min_clients=2, init_min_clients=3, checkpointers=0,
                               # Enough work per round that training, not the fixed costs, sets its length.
                               global_batch_size_start=36, global_batch_size_end=36)
IN_ROUND = ("RoundTrain", "RoundWitness")


@pytest.fixture
def uneven_run(testbed_run, data_dir):
    def start(name: str) -> tuple[Bed, Network]:
        cfg = small_config(name, data=data_dir, total_steps=STEPS, **TIMINGS)
        return testbed_run(cfg, [Node("server", LINK, control=True)]
                           + [Node(client_node(i), LINK, cpu=CPU) for i in range(3)])

    return start


def share_at(net: Network, i: int, step: int) -> tuple[int, dict]:
    """Client ``i``'s share (samples) of the round training ``step``, and that status."""
    s = net.wait_state(lambda s: s["state"] == "RoundTrain" and s["step"] >= step or s["state"] == "Finished",
                       300, f"step {step}", every=0.1)
    assert s["state"] != "Finished", f"the run finished before step {step}"
    row = next((c for c in s["clients"] if c["id"] == net.client_id(i)), None)
    return (row or {}).get("share") or 0, s


def shares_around(net: Network, i: int, first: int, rounds: int) -> list[int]:
    """Client ``i``'s share in each round from step ``first`` for ``rounds`` rounds."""
    out = []
    for step in range(first, first + rounds):
        share, s = share_at(net, i, step)
        out.append(share)
    return out


def check_finished(net: Network) -> dict:
    final = net.wait_state(lambda s: s["state"] == "Finished", 300 + 20 * STEPS, "the run to finish")
    assert [h["step"] for h in final["history"]] == list(range(1, STEPS + 1)), final["history"]
    return final


def test_shares_follow_a_cpu_cut_and_a_late_link_and_the_run_goes_on(uneven_run):
    """One run, two changes (a run costs ~50 s to start on this machine, so they share one)."""
    bed, net = uneven_run("uneven")
    settled = shares_around(net, 1, SETTLE - 1, 2)
    assert all(10 <= x <= 14 for x in settled), f"equal nodes share 36 samples about equally: {settled}"

    # 1. Client 1's CPU quota is cut to a sixth while it trains.
    _, s = share_at(net, 1, SETTLE + 1)
    bed.set_cpu(client_node(1), CPU / 6)
    cut = s["step"]
    after = shares_around(net, 1, cut + 1, WITHIN)
    # Speeds 1 : 1 : 1/6 would give it 36 / 13 ≈ 3 samples; the floor is 1.
    assert min(after) <= 6 and after[-1] <= 7, f"shares after the CPU cut at step {cut}: {after}"
    rows = {c["id"]: c for c in net.status()["clients"]}
    slow, fast = rows[net.client_id(1)]["throughput"], rows[net.client_id(0)]["throughput"]
    assert slow is not None and fast is not None and slow < fast / 2, (slow, fast)

    # 2. Client 2 keeps training at full speed (and says so in its reports), but everything it
    # sends now crawls through a 50 kbit/s link: its results reach the witnesses late.
    before, s = share_at(net, 2, s["step"] + WITHIN + 1)
    assert before >= 9, f"client 2's share before its link is cut: {before}"
    bed.set_link(client_node(2), Link(mbit=0.05))
    late = shares_around(net, 2, s["step"] + 1, LATE_WITHIN)
    assert min(late) <= 4, f"shares of the late client after the change at step {s['step']}: {late}"

    # The run went on at the others' pace and finished: no step lost, none repeated.
    check_finished(net)
