"""The client runtime's phase logic, driven in one process (see :mod:`psyche.testing.runtime`).

Real runtimes, real trainers (a ~4,700-parameter LLaMA), the embedded ledger, the
in-memory P2P network and a clock that moves only when the test says: each test
plays one situation of a run in well under a second.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from psyche.client.runtime import KeyInUse, wait_notice
from psyche.coordinator import Join, Resume, WarmupWitness, Witness
from psyche.coordinator import queries as q
from psyche.coordinator.bloom import BloomFilter
from psyche.coordinator.state import ClientState, RunState
from psyche.identity import Identity
from psyche.ledger.embedded import EmbeddedLedger
from psyche.testing.runtime import OutageLedger, RuntimeSwarm, tiny_config, write_token_folder


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_token_folder(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module", autouse=True)
def _model_code_loaded(tokens):
    """Build one model first: the first build in a process imports the model code (seconds)."""
    from psyche.client.trainer import LocalTrainer

    LocalTrainer(tiny_config(tokens)).init_model()


def _run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def _identical(clients) -> bool:
    first = clients[0].weights()
    return all(all(torch.equal(first[k], c.weights()[k]) for k in first) for c in clients[1:])


def test_three_clients_train_a_whole_run_to_identical_weights_and_a_checkpoint(tokens, tmp_path):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, init_min_clients=3), checkpoint_root=tmp_path) as swarm:
            clients = [swarm.add() for _ in range(3)]
            await swarm.until(swarm.in_state(RunState.RoundTrain), what="warmup done")
            await swarm.finish()
            for c in clients:
                assert c.task.result() == 0
                assert c.saw("run finished at step 3")
                assert c.saw("model initialised from the run's seed")
            print(*(c.said for c in clients), sep="\n")
            assert _identical(clients), "every node applied the same results"
            s = swarm.state
            assert s.run_state is RunState.Finished and [ck.step for ck in s.checkpoints] == [3]
            saver = next(c for c in clients if c.id == s.checkpoints[0].client)
            assert saver.saw("checkpoint after step 3 written to")
            # Each client reported each step it trained, and the validation loss of steps 1 and 3.
            for c in clients:
                steps = [r["step"] for r in c.ledger.reports]
                assert sorted(set(steps)) == [1, 2, 3]
                assert {r["step"] for r in c.ledger.reports if "val_loss" in r} == {1, 3}

    _run(scenario)
