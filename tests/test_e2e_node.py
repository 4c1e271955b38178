"""A node of two ranks (``psyche client --nproc-per-node 2``) in a real run beside one-rank nodes.

Separate processes throughout: the coordinator server, three clients, and the node's second
rank (a child of its client, joined to it by a gloo process group).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.test_e2e_network import BEFORE_TRAINING, IN_ROUND, history_steps

pytestmark = pytest.mark.e2e


def child_ranks(parent: int) -> list[int]:
    """Pids of the rank processes (``python -m psyche.client.ranks``) that ``parent`` started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"psyche.client.ranks" in cmd:
            pids.append(int(proc.name))
    return pids


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_two_rank_node_trains_beside_one_rank_nodes_and_a_dead_rank_takes_it_out_until_it_rejoins(network):
    # Epochs end by the clock, so the node rejoins at a later epoch, and enough steps that the run
    # outlasts the first one however fast this machine is: with 30, the two one-rank nodes once
    # trained every step left (0.1 s each) before the 20 s epoch ended, and the node never rejoined.
    # The warmup leaves a slow machine room to start the node's ranks again (spawned processes
    # importing torch): missing it drops the node, and the run may finish before another epoch.
    steps = 80
    net = network("e2e-node", total_steps=steps, epoch_time=20, warmup_time=12, max_round_train_time=10, min_clients=2)
    net.start_server()
    net.start_client(0, "--nproc-per-node", "2")
    for i in (1, 2):
        net.start_client(i)
    s = net.wait_state(lambda s: s["state"] in IN_ROUND and s["step"] >= 2, 180, "step 2")
    node = net.client_id(0)
    log = lambda: " ".join(net.log("client-0", tail=1_000_000).split())  # noqa: E731 - rich wraps lines
    assert ": trained samples" in log(), "the two-rank node trains"
    assert "this node trains on 2 ranks (cpu, cpu) through torch.distributed" in log()
    s = net.wait_state(lambda s: any(c["id"] == net.client_id(0) and c["ranks"] == 2 for c in s["clients"]), 60,
                       "the node's ranks in the status")
    assert {c["ranks"] for c in s["clients"] if c["id"] != net.client_id(0)} <= {1, None}
    assert {c["id"] for c in s["clients"]} == {net.client_id(i) for i in range(3)}
    # Kill the node's second rank: its client withdraws the node, the run goes on without it.
    ranks = child_ranks(net.procs["client-0"].pid)
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGKILL)
    out = net.wait_state(lambda s: any(c["id"] == node and c["state"] in ("Withdrawn", "Dropped") for c in s["clients"]),
                         120, "the node to withdraw")
    epoch_out, step_out = out["epoch"], out["step"]
    assert "this node's ranks failed (rank 1 exited (code -9))" in log()
    assert "withdrawing to rejoin next epoch" in log()
    assert net.procs["client-0"].poll() is None, "the client process lives on"
    net.wait_state(lambda s: s["step"] >= step_out + 1, 120, "the run to go on without the node")
    # It rejoins at a later epoch with the model from its peers, its ranks started again, and trains.
    net.wait_state(lambda s: s["epoch"] > epoch_out and s["state"] not in BEFORE_TRAINING and any(
        c["id"] == node and c["state"] == "Healthy" for c in s["clients"]), 180, "the node to rejoin")
    net.wait(lambda: ": trained samples" in log().rsplit("model fetched from", 1)[-1], 120,
             "the node to train again with the fetched model")
    restarted = child_ranks(net.procs["client-0"].pid)
    assert len(restarted) == 1 and restarted != ranks
    final = net.wait_state(lambda s: s["state"] == "Finished", 400, "the run to finish")
    assert history_steps(final) == list(range(1, steps + 1))
    for i in range(3):
        assert net.wait_exit(f"client-{i}", 120) == 0, net.log(f"client-{i}")
    assert not alive(restarted[0]), "the node's rank stopped with its client"
    profiles = [net.profile(i) for i in range(3)]
    assert {p["applied_step"] for p in profiles} == {steps}
    assert [p["ranks"] for p in profiles] == [2, 1, 1]
    assert len({p["weights_sha256"] for p in profiles}) == 1, "every node, the two-rank one too, holds the same weights"
    last = final["history"][-1]
    assert last["clients"] == 3, last
