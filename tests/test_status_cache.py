"""What a run's status keeps between builds (StatusCache): always what building it afresh gives.

A real RunHost and Store play a run with the honest swarm while members' reports arrive at
random steps (late ones, and ones replacing an earlier report of the same step), and the
status is built between them: the book's history and each member's latest report must equal
what reading every stored report again gives.
"""

from __future__ import annotations

import random

import pytest

from psyche.config import parse_config
from psyche.coordinator import Coordinator
from psyche.coordinator.state import RunState
from psyche.ledger.host import RunHost
from psyche.ledger.status import StatusCache, history_rows, round_outcomes, run_status
from psyche.ledger.store import Store
from psyche.testing.coordinator_swarm import Swarm

CFG = parse_config({
    "name": "book",
    "coordinator": {"init_min_clients": 3, "min_clients": 2, "witness_nodes": 2, "total_steps": 12,
                    "global_batch_size_start": 6, "global_batch_size_end": 6, "epoch_time": 20,
                    "warmup_time": 3, "cooldown_time": 2, "max_round_train_time": 4, "round_witness_time": 1,
                    "checkpointers": 1},
    "lr": {"warmup_steps": 1},
})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_book_always_equals_reading_every_report_again(tmp_path, seed):
    rng = random.Random(seed)
    store = Store(tmp_path / "run.sqlite")
    coord = Coordinator.new(CFG.run_id, CFG, authority=bytes(32), now=0)
    store.create_run(CFG.run_id, CFG.model_dump(mode="json"), bytes(32), coord.to_bytes(), coord.digest())

    class HostedSwarm(Swarm):
        def submit(self, instr, signer):
            return host.apply(instr, signer)

    swarm = HostedSwarm(coord)
    host = RunHost(coord, store=store, clock=lambda: swarm.now + 0.25, host_key=swarm.host_key)
    book = StatusCache()
    nonce = 0
    swarm.join(range(3))
    while coord.state.run_state is not RunState.Finished:
        swarm.act()
        swarm.advance(1)
        for _ in range(rng.randint(0, 3)):
            member = swarm.key(rng.randrange(3))
            step = max(1, coord.state.step - rng.choice([0, 0, 1, 2, 5]))  # some late, some again
            report = {"step": step, "tokens": rng.randint(1, 500), "loss": rng.random(),
                      "forward_backward_seconds": rng.random()}
            nonce += 1
            received = store.add_report(CFG.run_id, member, step, report, nonce)
            book.added(member, step, report, received)
        if rng.random() < 0.5:
            assert book.history(coord, store, CFG) == history_rows(coord, store, CFG)
            fresh = StatusCache()
            assert book.latest(store, CFG.run_id) == fresh.latest(store, CFG.run_id)
            status = run_status(host, CFG, store, now=0, cache=book)
            assert status == run_status(host, CFG, store, now=0, cache=fresh)
            assert status["rounds"] == round_outcomes(coord.state)
    assert book.history(coord, store, CFG) == history_rows(coord, store, CFG)
    assert len(book.history(coord, store, CFG)) > 5
    store.close()
