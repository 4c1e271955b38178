"""The client runtime's phase logic, driven in one process (see :mod:`psyche.testing.runtime`).

Real runtimes, real trainers (a ~4,700-parameter LLaMA), the embedded ledger, the
in-memory P2P network and a clock that moves only when the test says: each test
plays one situation of a run in well under a second.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from psyche.client import runtime as runtime_module
from psyche.client.runtime import KeyInUse, wait_notice
from psyche.coordinator import Join, Pause, Resume, WarmupWitness, Witness
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
def _model_code_loaded(tokens, tmp_path_factory):
    """Do each kind of trainer work once first: the first in a process imports code (seconds),
    which would otherwise be timed as the first test's."""
    from psyche.client.trainer import LocalTrainer

    t = LocalTrainer(tiny_config(tokens))
    t.init_model()
    out = t.train(1, 0, 2)
    t.check_payload(out.payload)
    t.apply(1, [out.payload])
    t.evaluate()
    t.save(tmp_path_factory.mktemp("warm"), step=1)


def _run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def _identical(clients) -> bool:
    first = clients[0].weights()
    return all(all(torch.equal(first[k], c.weights()[k]) for k in first) for c in clients[1:])


@pytest.mark.parametrize("overlapped", [True, False], ids=["overlapped", "apply-first"])
def test_three_clients_train_a_whole_run_to_identical_weights_and_a_checkpoint(tokens, tmp_path, overlapped):
    async def scenario():
        cfg = tiny_config(tokens, init_min_clients=3, overlapped=overlapped)
        async with RuntimeSwarm(cfg, checkpoint_root=tmp_path) as swarm:
            clients = [swarm.add() for _ in range(3)]
            await swarm.until(swarm.in_state(RunState.RoundTrain), what="warmup done")
            await swarm.finish()
            for c in clients:
                assert c.task.result() == 0
                assert c.saw("run finished at step 3")
                assert c.saw("model initialised from the run's seed")
                assert c.saw("epoch 0 start")
            assert _identical(clients), "every node applied the same results"
            s = swarm.state
            assert s.run_state is RunState.Finished and [ck.step for ck in s.checkpoints] == [3]
            saver = next(c for c in clients if c.id == s.checkpoints[0].client)
            assert saver.saw("checkpoint after step 3 written to")
            # Each client reported each step it trained, and the validation loss of steps 1 and 3.
            for c in clients:
                steps = [r["step"] for r in c.ledger.reports]
                assert sorted(set(steps)) == [1, 2, 3]
                # Each measures its slice of the validation set, by its place in the round.
                assert {r["step"] for r in c.ledger.reports if "val_loss" in r} <= {1, 3}
                prof = c.runtime.profile()
                assert prof is not None and prof["steps_trained"] == 3 and prof["client"] == c.id.hex()
                assert prof["applied_step"] == 3 and prof["weights_sha256"] == clients[0].runtime.profile()["weights_sha256"]
            # Together the slices cover the whole validation set at each step measured.
            for step in (1, 3):
                vals = [r for c in clients for r in c.ledger.reports if r["step"] == step and "val_loss" in r]
                assert sum(r["val_tokens"] for r in vals) == clients[0].runtime.trainer.evaluate()[1]

    _run(scenario)


def _verified(client, step: int, *others) -> bool:
    return all(o.id in client.runtime.books[step].verified for o in others)


def test_a_node_that_missed_a_verified_commitment_resyncs_and_rejoins_the_next_epoch_with_the_model_from_peers(
        tokens, monkeypatch):
    """A is cut off from everyone in step 1: it never hears B's and C's commitments, which a witness
    quorum verified. Applying step 1 without them would fork its weights, so it withdraws; in the
    next epoch it joins again, fetches the model from B and C, and ends bit-identical to them.
    (Applying first thing in the round, A withdraws before B and C can accuse it of the result
    they never saw; overlapped, either may come first.)"""
    monkeypatch.setattr(runtime_module, "MODEL_RETRY_SECONDS", 0.01)

    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, init_min_clients=3, total_steps=4, overlapped=False)) as swarm:
            a, b, c = (swarm.add() for _ in range(3))
            await swarm.until(swarm.in_state(RunState.RoundTrain, step=1))
            swarm.net.block(a.id, b.id)
            swarm.net.block(a.id, c.id)
            await swarm.until(lambda: _verified(b, 1, c) and _verified(c, 1, b) and a.runtime.steps_trained == 1)
            swarm.advance(swarm.cfg.coordinator.max_round_train_time)  # A's result never comes: witness now
            await swarm.until(lambda: a.saw("missed the commitment of"), what="A resyncs")
            await swarm.until(lambda: swarm.health(a.id) is ClientState.Withdrawn)
            await swarm.until(lambda: a.saw("this client is Withdrawn in epoch 0; it will rejoin for the next epoch"))
            swarm.clock.advance(swarm.cfg.coordinator.epoch_time)  # epoch 0 ends with this round
            await swarm.until(lambda: swarm.state.epoch == 1, pace=1.0, what="epoch 0 over")
            # Still cut off in epoch 1's warmup: A cannot get the model, and tries again.
            await swarm.until(lambda: sum(line.startswith("fetching the model") for line in a.said) >= 2,
                              what="A retries the model download")
            assert a.runtime.model_epoch is None
            swarm.net.unblock(a.id, b.id)
            swarm.net.unblock(a.id, c.id)
            await swarm.until(lambda: a.runtime.model_epoch == 1, what="A has the model")
            await swarm.finish()
            assert swarm.state.epoch >= 1
            assert a.saw("joined run runtime-test (epoch 1)") and a.saw("model fetched from")
            assert not b.saw("fetching the model"), "B kept its own weights across the epochs"
            assert all(x.task.result() == 0 for x in (a, b, c))
            assert _identical([a, b, c])

    _run(scenario)


def test_an_agreed_result_that_cannot_be_fetched_makes_the_node_resync(tokens):
    """A hears of C's result (through B) but can fetch it from nobody: C's link to A is cut and,
    by the time A applies, so is B's. A quorum verified it, so A must not apply the step without
    it: it withdraws instead of forking."""
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, init_min_clients=3), blob_timeout=0.1) as swarm:
            a, b, c = (swarm.add() for _ in range(3))
            swarm.net.block(a.id, c.id)
            await swarm.until(lambda: c.id in a.runtime.books[1].commitments and _verified(a, 1, b)
                              and _verified(b, 1, a, c))
            swarm.net.block(a.id, b.id)
            await swarm.until(lambda: c.id not in a.runtime.books[1].fetching, what="A's own fetch gives up")
            swarm.advance(swarm.cfg.coordinator.max_round_train_time)
            await swarm.until(lambda: a.saw("could not be fetched"), what="A resyncs")
            assert a.saw(f"step 1: the agreed result of {c.id.hex()[:8]} could not be fetched")
            await swarm.until(lambda: swarm.health(a.id) is ClientState.Withdrawn)
            swarm.net.unblock(a.id, b.id)
            swarm.net.unblock(a.id, c.id)
            await swarm.finish()
            assert _identical([b, c])

    _run(scenario)


def test_a_trainer_that_never_publishes_is_accused_and_dropped(tokens):
    """S joins and plays its coordinator part by hand (warmup and witness reports) but never
    publishes a result: once the round closes, the runtimes accuse it and it is dropped."""
    async def scenario():
        cfg = tiny_config(tokens, init_min_clients=3, total_steps=2)  # every member a witness
        async with RuntimeSwarm(cfg) as swarm:
            silent = Identity(b"\x55" * 32)
            by_hand = swarm.ledger(silent)
            await by_hand.submit(Join(p2p_address="mem:" + silent.public_key.hex()))
            a, b = swarm.add(), swarm.add()
            await swarm.until(swarm.in_state(RunState.Warmup))
            await by_hand.submit(WarmupWitness())
            await swarm.until(swarm.in_state(RunState.RoundTrain, step=1))
            trainers = q.round_trainers(swarm.state, step=1)
            await by_hand.submit(Witness(step=1, participant_bloom=BloomFilter.exact_for([], trainers).to_bytes(),
                                         broadcast_bloom=BloomFilter.exact_for([], []).to_bytes(),
                                         broadcast_merkle=bytes(32), loss=0.0, tokens_per_sec=0.0, bandwidth_bytes=0))
            await swarm.until(lambda: _verified(a, 1, b) and _verified(b, 1, a))
            swarm.advance(cfg.coordinator.max_round_train_time)  # S's result never comes
            await swarm.until(lambda: swarm.health(silent.public_key) is ClientState.Dropped, what="S dropped")
            accusation = f"step 1: accused ['{silent.public_key.hex()[:8]}'] of missing results"
            assert a.saw(accusation) or b.saw(accusation)
            await swarm.finish()
            assert _identical([a, b])

    _run(scenario)


def test_a_key_held_by_a_live_process_keeps_a_second_one_out(tokens):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens)) as swarm:
            probed = []

            async def alive(address: str) -> bool:
                probed.append(address)
                return True

            twin = swarm.add(start=False, key_probe=alive)
            await twin.ledger.submit(Join(p2p_address="mem:elsewhere"))  # the first process's registration
            swarm.start(twin)
            await swarm.until(twin.task.done, what="the second process stops")
            err = twin.task.exception()
            assert isinstance(err, KeyInUse) and not err.taken_over and err.address == "mem:elsewhere"
            assert probed == ["mem:elsewhere"]
            assert q.address_of(swarm.state, twin.id) == "mem:elsewhere", "the live process keeps its key"

    _run(scenario)


def test_a_restart_takes_over_the_key_of_a_process_that_died_and_a_later_thief_stops_it(tokens):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens)) as swarm:
            async def dead(address: str) -> bool:
                return False

            me = swarm.add(start=False, key_probe=dead)
            await me.ledger.submit(Join(p2p_address="mem:died"))
            swarm.start(me)
            await swarm.until(lambda: q.address_of(swarm.state, me.id) == me.node.address)
            assert me.saw("re-registered this key at this process's P2P address")
            # Another process registers the same key while this one runs: two nodes would sign as one.
            await swarm.ledger(me.identity).submit(Join(p2p_address="mem:thief"))
            await swarm.until(me.task.done, what="the runtime stops")
            err = me.task.exception()
            assert isinstance(err, KeyInUse) and err.taken_over and err.address == "mem:thief"

    _run(scenario)


def test_metrics_reports_are_kept_while_the_host_is_down_and_sent_in_order_once_it_is_back(tokens):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, total_steps=2)) as swarm:
            a = swarm.add(ledger=OutageLedger)
            b = swarm.add()
            await swarm.until(lambda: a.runtime.warmup_reported == 0)
            a.ledger.down = True
            await swarm.until(lambda: a.runtime.steps_trained == 1 and len(a.runtime._outbox) >= 1
                              and 1 in a.runtime.witnessed, what="A trained and tried to witness")
            assert a.ledger.inner.reports == [], "nothing reached the host"
            a.ledger.down = False
            await swarm.until(lambda: not a.runtime._outbox and a.ledger.inner.reports, what="outbox flushed")
            await swarm.finish()
            steps = [r["step"] for r in a.ledger.inner.reports]
            assert steps == sorted(steps) and set(steps) == {1, 2}, "every step reported, oldest first"
            assert a.task.result() == b.task.result() == 0

    _run(scenario)


def test_each_wait_is_told_once_and_a_late_joiner_waits_for_the_next_epoch(tokens):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, total_steps=2)) as swarm:
            await swarm.ledger(swarm.authority).submit(Pause())
            a = swarm.add()
            await swarm.until(lambda: a.saw("the run is paused after step 0"))
            await swarm.ledger(swarm.authority).submit(Resume())
            await swarm.until(lambda: a.saw("waiting for members: 1 of 2 needed to start (init_min_clients = 2)"))
            b = swarm.add()
            await swarm.until(swarm.in_state(RunState.RoundTrain, step=1))
            late = swarm.add()
            await swarm.until(lambda: late.id in swarm.state.pending)
            await swarm.until(lambda: late.saw("this node joins epoch 1"))
            assert late.said[-1].startswith("waiting for epoch 0 to end (")
            await swarm.finish()
            for c in (a, b, late):
                notices = [line for line in c.said if line.startswith(("waiting", "the run is"))]
                assert len(notices) == len(set(notices)), f"a wait told twice: {notices}"
            assert _identical([a, b])

    _run(scenario)


def test_wait_notice_is_none_for_a_node_that_waits_for_nothing(tokens):
    swarm_cfg = tiny_config(tokens)
    from psyche.coordinator import Coordinator

    s = Coordinator.new("r", swarm_cfg, authority=bytes(32), now=0).state
    assert wait_notice(s, b"\x01" * 32) is None, "not joined: nothing to wait for"
    s.pending.append(b"\x01" * 32)
    assert wait_notice(s, b"\x01" * 32).startswith("waiting for members: 1 of 2")


def test_stop_withdraws_a_member_from_the_run(tokens):
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, init_min_clients=3, total_steps=3)) as swarm:
            a, b, c = (swarm.add() for _ in range(3))
            await swarm.until(lambda: a.runtime.steps_trained == 1)
            a.runtime.stop()
            await swarm.until(a.task.done, what="A stops")
            assert a.task.cancelled() and a.saw("withdrew from the run")
            assert swarm.health(a.id) is ClientState.Withdrawn
            await swarm.finish()
            assert _identical([b, c])

    _run(scenario)


def test_a_paused_run_resumes_from_its_checkpoint(tokens, tmp_path):
    """A pause takes effect after the round: the checkpointer saves, everyone is withdrawn. A client
    restarted meanwhile has no weights and nobody carries them into the next epoch, so it loads the
    run's last checkpoint; one that kept running goes on with its own weights (the same)."""
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens, total_steps=3), checkpoint_root=tmp_path) as swarm:
            a, b = swarm.add(), swarm.add()
            await swarm.until(swarm.in_state(RunState.RoundTrain, step=2))
            authority = swarm.ledger(swarm.authority)
            await authority.submit(Pause())
            await swarm.until(swarm.in_state(RunState.Paused), pace=1.0, what="paused after the round")
            await swarm.until(lambda: a.saw("the run is paused after step 2") and b.saw("the run is paused after step 2"))
            a.task.cancel()  # A's process stops and starts again with the same key
            await asyncio.gather(a.task, return_exceptions=True)
            await a.node.close()
            again = swarm.add(seed=0)
            assert again.id == a.id
            await authority.submit(Resume())
            await swarm.finish()
            location = next(ck.location for ck in swarm.state.checkpoints if ck.step == 2)
            assert again.saw(f"model loaded from checkpoint {location} (after step 2)")
            assert not b.saw("model loaded"), "B kept its weights"
            assert _identical([again, b])

    _run(scenario)


def test_an_unexpected_error_beside_the_main_loop_ends_the_runtime(tokens):
    """Only the errors the run expects are handled; anything else (here a bug in checking a result,
    raised in a download task) ends ``run`` with that error instead of vanishing with the task."""
    async def scenario():
        async with RuntimeSwarm(tiny_config(tokens)) as swarm:
            a, b = swarm.add(), swarm.add()

            def broken(payload: bytes) -> None:
                raise RuntimeError("a bug in checking results")

            a.trainer.check_payload = broken  # a fault in A's trainer, nothing else changed
            await swarm.until(a.task.done, what="A stops")
            assert isinstance(a.task.exception(), RuntimeError)

    _run(scenario)


@pytest.mark.parametrize("overlapped", [True, False], ids=["overlapped", "apply-first"])
def test_a_node_publishing_negated_results_is_condemned_by_its_verifiers_and_never_applied(tokens, overlapped):
    """Five nodes; one trains honestly but publishes its results negated. The witnesses check the
    results they were given against their trainers' data and report scores; the coordinator
    condemns the cheat's first result by its verifiers' majority: nobody applies it, the cheat is
    dropped, and the four honest nodes finish the run with identical weights."""
    import dataclasses

    from psyche.client.trainer import TrainOutput
    from psyche.testing.adversaries import negate_payload

    async def scenario():
        cfg = tiny_config(tokens, init_min_clients=5, min_clients=3, total_steps=4, overlapped=overlapped,
                          global_batch_size_start=40, global_batch_size_end=40)
        async with RuntimeSwarm(cfg) as swarm:
            clients = [swarm.add(start=False) for _ in range(5)]
            cheat = clients[4]
            honest_train = cheat.trainer.train

            def train(step: int, start: int, end: int) -> TrainOutput:
                out = honest_train(step, start, end)
                return dataclasses.replace(out, payload=negate_payload(out.payload, cheat.trainer.layouts))

            cheat.trainer.train = train  # type: ignore[method-assign]
            for c in clients:
                swarm.start(c)
            await swarm.until(lambda: swarm.state.step > 1, pace=1.0, what="step 1 closed")
            s = swarm.state
            bad = q.member(s, cheat.id)
            assert bad.state is ClientState.Dropped and bad.condemned_step == 1
            assert q.condemned_trainers(s, 1) == [cheat.id] and cheat.id not in q.applied_trainers(s, 1)
            scores = [rep.scores for rep in q.round_for_step(s, 1).reports]
            assert all(len(x) == 3 for x in scores), "every witness scored the 3 results it checks"
            await swarm.finish()
            honest = clients[:4]
            assert all(c.task.result() == 0 for c in honest)
            assert _identical(honest)
            assert cheat.saw("verification condemned its result of step 1")
            assert all(q.member(swarm.state, c.id).condemned_step == 0 for c in honest)

    _run(scenario)
