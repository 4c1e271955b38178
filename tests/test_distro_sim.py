"""The simulated DisTrO network: peers exchanging bytes learn and stay bit-identical."""

import pytest
import torch

from psyche.testing.distro_sim import config_from, run_distro

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("overlapped", [False, True], ids=["plain", "overlapped"])
def test_two_peers_learn_and_hold_identical_weights(overlapped):
    cfg = config_from(peers=2, steps=8, batch_per_peer=2, seq_len=32, hidden_size=64, intermediate_size=128,
                      layers=1, heads=2, distro_lr=1e-2, warmup_steps=0, chunk=16, topk=4,
                      # 8 steps: a short memory and one LR for all tensors learn fastest.
                      compression_decay=0.9, matrix_lr_scale=1.0, embedding_lr_scale=1.0,
                      overlapped=overlapped, eval_every=4, eval_batches=1, eval_batch_size=8)
    run = run_distro(cfg)
    assert run.peers_bit_identical
    assert run.curve.val_loss[-1] < run.curve.val_loss[0] - 0.2
    assert run.train_loss_last < run.train_loss_first
    assert 0 < run.payload_bytes_per_peer_step < 4 * run.params / 20
    # Not vacuous: each peer trained its own batches, so their momenta differ.
    p0, p1 = (next(iter(m.parameters())) for m in run.models)
    d0, d1 = (opt.state[p]["delta"] for opt, p in zip(run.optimizers, (p0, p1)))
    assert not torch.equal(d0, d1)


def test_grouped_adamw_scales_each_kind_and_learns():
    from psyche.testing.distro_sim import run_adamw

    cfg = config_from(peers=2, steps=8, batch_per_peer=2, seq_len=32, hidden_size=64, intermediate_size=128,
                      layers=1, heads=2, warmup_steps=0, eval_every=4, eval_batches=1, eval_batch_size=8)
    plain = run_adamw(cfg, 1e-2)
    grouped = run_adamw(cfg, 1e-2, grouped=True)
    assert grouped.val_loss[-1] < grouped.val_loss[0] - 0.05
    assert grouped.val_loss[-1] != plain.val_loss[-1]  # the scales changed the run
