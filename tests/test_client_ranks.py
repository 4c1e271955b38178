"""A node of several ranks (``psyche client --nproc-per-node``): real gloo process groups on CPU.

Rank 0 is this test's process (a :class:`~psyche.client.ranks.NodeTrainer`); rank 1 is a
child process it starts. Each is compared with a one-rank
:class:`~psyche.client.trainer.LocalTrainer` given the same share and the same results.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    from psyche.config import load_config
    from psyche.data import ensure_default_dataset
    from psyche.demo import DEFAULT_CONFIG, demo_config

    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    return demo_config(load_config(DEFAULT_CONFIG), clients=2, steps=4, data_location=str(data))


@pytest.fixture
def node(cfg):
    """A 2-rank node on the CPU (stopped after the test)."""
    from psyche.client.ranks import NodeTrainer

    before = torch.get_num_threads()
    trainer = NodeTrainer(cfg, devices=["cpu", "cpu"])
    yield trainer
    trainer.close()
    torch.set_num_threads(before)


def _one_rank(cfg):
    from psyche.client.trainer import LocalTrainer

    trainer = LocalTrainer(cfg)
    trainer.init_model()
    return trainer


def test_a_two_rank_node_ends_each_round_with_the_weights_of_a_one_rank_node(cfg, node, tmp_path):
    """Each rank's part is one micro-batch of the one-rank node: the sums happen in the same
    order, so the results and the weights are bit-identical, step after step (the ranks get
    rank 0's new weights before each step)."""
    one, peer = _one_rank(cfg), _one_rank(cfg)
    node.init_model()
    m = cfg.optimizer.micro_batch_size
    for step in (1, 2, 3):
        share = (step * 100, step * 100 + 2 * m)
        a, b = node.train(step, *share), one.train(step, *share)
        assert a.finite and a.tokens == b.tokens == 2 * m * cfg.model.seq_len
        assert a.loss == b.loss
        assert a.payload == b.payload, f"step {step}: the node's result differs from the one-rank node's"
        other = peer.train(step, 900, 900 + m).payload  # another node's result, applied by all
        for trainer, own in ((node, a), (one, b), (peer, a)):
            trainer.apply(step, [own.payload, other])
        assert node.weights_digest() == one.weights_digest(), f"step {step}: weights differ after the apply"
    # What peers fetch and what a checkpointer writes come from rank 0's whole model, as on one rank.
    assert all(torch.equal(x, y) for x, y in zip(node.state_tensors().values(), one.state_tensors().values(), strict=True))
    assert node.save(tmp_path / "node", step=3)[1] == one.save(tmp_path / "one", step=3)[1]


def test_an_overlapped_two_rank_node_trains_ahead_like_a_one_rank_node(cfg, node):
    """Overlapped, each step trains before the previous one is applied: every rank gets rank 0's
    lookahead weights (its own in-flight results applied) and then the weights restored, so the
    results and the weights stay those of a one-rank node."""
    one = _one_rank(cfg)
    node.init_model()
    m = cfg.optimizer.micro_batch_size
    previous = None
    for step in (1, 2, 3):
        share = (step * 100, step * 100 + 2 * m)
        a, b = node.train(step, *share), one.train(step, *share)
        assert a.payload == b.payload, f"step {step}: the node's result differs from the one-rank node's"
        if previous is not None:
            for trainer in (node, one):
                trainer.apply(step - 1, [previous])
            assert node.weights_digest() == one.weights_digest(), f"step {step}: weights differ after the apply"
        previous = a.payload
    assert node.timer.totals().get("lookahead", 0) > 0


def test_an_uneven_share_gives_the_one_rank_gradient_up_to_summation_order(cfg, node):
    """A share of 11 sequences (6 + 5 on two ranks, micro-batches of 8 on one): the summed
    gradient agrees with one rank's to float32 rounding (the stated tolerance)."""
    one = _one_rank(cfg)
    node.init_model()
    share = range(40, 51)
    batch = node.data.train.batch(share)
    stats_node = node.gradients(share, node.data.train.batch(node.own_samples(share)))  # rank 0 reads its part
    stats_one = one.gradients(share, batch)
    assert stats_node.tokens == stats_one.tokens
    assert stats_node.loss == pytest.approx(stats_one.loss, rel=1e-6)
    assert stats_node.grad_norm == pytest.approx(stats_one.grad_norm, rel=1e-5)
    for (name, p), q in zip(node.model.named_parameters(), one.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_a_share_smaller_than_the_node_still_trains(cfg, node):
    """One sequence for two ranks: rank 1 runs a zero-weighted pass through the same collectives."""
    one = _one_rank(cfg)
    node.init_model()
    a, b = node.train(1, 7, 8), one.train(1, 7, 8)
    assert a.payload == b.payload and a.loss == b.loss


def test_a_rank_that_dies_fails_the_step_cleanly_and_the_ranks_start_again(cfg, node):
    from psyche.client.ports import TrainerFailure
    from psyche.client.ranks import MAX_FAILURES, RankFailure

    one = _one_rank(cfg)
    node.init_model()
    node.apply(1, [node.train(1, 0, 8).payload])
    one.apply(1, [one.train(1, 0, 8).payload])
    before = node.weights_digest()
    victim = node.group.procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    with pytest.raises(RankFailure, match=r"rank 1 exited \(code -9\)") as failed:
        node.train(2, 8, 16)
    assert isinstance(failed.value, TrainerFailure) and not failed.value.fatal
    assert node.group is None, "every rank was stopped: none is left waiting in a collective"
    assert node.weights_digest() == before, "a failed step leaves the weights as they were"
    # The next step starts the ranks again and trains as before.
    a, b = node.train(2, 8, 16), one.train(2, 8, 16)
    assert node.group is not None and all(p.poll() is None for p in node.group.procs)
    assert a.payload == b.payload
    # Failures in a row end in a fatal one: the client then stops (after withdrawing).
    node.failures = MAX_FAILURES - 1
    os.kill(node.group.procs[0].pid, signal.SIGKILL)
    with pytest.raises(RankFailure, match="giving up") as failed:
        node.train(3, 16, 24)
    assert failed.value.fatal


def test_a_rank_that_cannot_start_is_named(cfg, tmp_path):
    from psyche.client.ranks import NodeTrainer, RankFailure

    with pytest.raises(RankFailure, match=r"rank 1 could not start: .*cuda"):
        NodeTrainer(cfg, devices=["cpu", "cuda:7"])  # rank 1's device does not exist here


def test_node_devices_names_the_option_and_the_rule():
    from psyche.train.device import node_devices

    assert node_devices("cpu") == ["cpu"]
    assert node_devices("cpu", 3) == ["cpu"] * 3
    assert node_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert node_devices("auto", None, "cuda:1, cuda:0") == ["cuda:1", "cuda:0"]
    for args, said in [(("cpu", 0), "--nproc-per-node must be >= 1"),
                       (("cpu", 3, "cpu,cpu"), "--nproc-per-node 3 does not match the 2 device(s)"),
                       (("cpu", None, "cpu,cuda:0"), "one kind of device"),
                       (("cpu", None, "cuda:0,cuda:0"), "each GPU may be listed once"),
                       (("cpu", None, "tpu:0"), "'tpu:0' is not a device"),
                       (("cpu", None, ","), "at least one device"),
                       (("cuda:1", 2), "name the GPUs with --devices"),
                       (("mps", 2), "CPU or CUDA devices only")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            node_devices(*args)


def test_the_examples_in_the_docstrings_hold():
    import doctest

    from psyche.train import device, step

    for module in (step, device):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_prepare_gives_the_ranks_the_weights_before_the_first_step(cfg, node):
    """After warmup's model load the runtime calls prepare: the replicas are built then, so the
    first step only trains (and its result is still the one-rank node's)."""
    one = _one_rank(cfg)
    node.init_model()
    node.prepare()
    assert node._ddp is not None and not node._stale
    node.prepare()  # nothing to do: no order is sent
    a, b = node.train(1, 0, 16), one.train(1, 0, 16)
    assert a.payload == b.payload
    node.apply(1, [a.payload])
    one.apply(1, [b.payload])
    node.prepare()  # the applied weights go to the ranks now
    assert not node._stale
    assert node.train(2, 16, 32).payload == one.train(2, 16, 32).payload


NODE_THEN_WAIT = """
import sys, time
from psyche.client.ranks import NodeTrainer
from psyche.config import RunConfig
cfg = RunConfig.model_validate_json(sys.stdin.read())
node = NodeTrainer(cfg, devices=["cpu", "cpu"])
node.init_model()
node.train(1, 0, 8)
print(node.group.procs[0].pid, flush=True)
time.sleep(600)
"""


def test_the_ranks_go_when_their_client_is_killed(cfg):
    """A client killed outright (no goodbye to its ranks): its ranks notice and exit, none waits on."""
    import subprocess
    import sys
    import time

    from tests.test_e2e_node import alive

    client = subprocess.Popen([sys.executable, "-c", NODE_THEN_WAIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        client.stdin.write(cfg.model_dump_json())
        client.stdin.close()
        rank = int(client.stdout.readline())
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
        deadline = time.monotonic() + 20
        while alive(rank):
            assert time.monotonic() < deadline, "the rank outlived its client"
            time.sleep(0.1)
    finally:
        client.kill()


def test_a_rank_that_hangs_is_given_up_after_the_rank_timeout(cfg):
    """A rank that stops answering (SIGSTOP: alive, silent) holds the node at most ``rank_timeout``
    seconds; then every rank is stopped, the stopped one included, and the next step starts them again."""
    from psyche.client.ranks import NodeTrainer, RankFailure

    before = torch.get_num_threads()
    node = NodeTrainer(cfg, devices=["cpu", "cpu"], rank_timeout=3)
    try:
        node.init_model()
        node.train(1, 0, 8)
        hung = node.group.procs[0]
        os.kill(hung.pid, signal.SIGSTOP)
        with pytest.raises(RankFailure, match="ranks failed"):
            node.train(2, 8, 16)
        assert hung.wait(10) == -signal.SIGKILL, "the hung rank was killed, not left behind"
        assert node.train(2, 8, 16).finite
    finally:
        node.close()
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_a_two_gpu_node_trains_like_one_gpu(cfg):
    """On GPUs (NCCL, bf16 autocast) the ranks' sum and one device's differ by rounding: the
    results agree on most coefficients, the losses closely, and the weights after an apply of
    the same results are identical (apply is deterministic on one device)."""
    from psyche.client.ranks import NodeTrainer
    from psyche.client.trainer import LocalTrainer
    from psyche.distro import decode_payload

    node = NodeTrainer(cfg, devices=["cuda:0", "cuda:1"])
    try:
        one = LocalTrainer(cfg, device="cuda:0")
        node.init_model()
        one.init_model()
        a, b = node.train(1, 0, 16), one.train(1, 0, 16)
        assert a.loss == pytest.approx(b.loss, rel=1e-3)
        ra, rb = decode_payload(a.payload, node.layouts), decode_payload(b.payload, one.layouts)
        same = sum(int((x.indices == y.indices).sum()) for x, y in zip(ra, rb, strict=True))
        assert same >= 0.9 * sum(x.indices.numel() for x in ra)
        node.apply(1, [a.payload, b.payload])
        one.apply(1, [a.payload, b.payload])
        assert node.weights_digest() == one.weights_digest()
        assert node.train(2, 16, 32).finite
    finally:
        node.close()
