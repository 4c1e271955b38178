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


TINY = dict(steps=6, seq_len=32, hidden_size=64, intermediate_size=128, layers=1, heads=2, distro_lr=1e-2,
            warmup_steps=0, chunk=16, topk=4, eval_every=3, eval_batches=1, eval_batch_size=8)


def weights_of(run):
    return [p.detach().clone() for p in run.models[0].parameters()]


def test_token_votes_with_equal_shares_are_bit_identical_to_equal_votes():
    plain = run_distro(config_from(peers=2, batch_per_peer=2, **TINY))
    same = run_distro(config_from(peers=2, shares=(2, 2), combine="tokens", **TINY))
    assert plain.curve.val_loss == same.curve.val_loss and plain.curve.tokens == same.curve.tokens
    assert all(torch.equal(a, b) for a, b in zip(weights_of(plain), weights_of(same)))


def test_unequal_shares_split_the_same_samples_and_token_votes_change_the_run():
    from psyche.testing.distro_sim import _indices

    cfg = config_from(peers=3, shares=(3, 2, 1), **TINY)
    equal = config_from(peers=3, batch_per_peer=2, **TINY)
    for step in range(3):
        split = [_indices(cfg, step, peer) for peer in range(3)]
        assert [len(r) for r in split] == [3, 2, 1]
        assert [i for r in split for i in r] == [i for peer in range(3) for i in _indices(equal, step, peer)]
    assert cfg.apply_weights() is None
    assert config_from(peers=3, shares=(3, 2, 1), combine="tokens", **TINY).apply_weights() == [96, 64, 32]
    by_votes = run_distro(cfg)
    by_tokens = run_distro(config_from(peers=3, shares=(3, 2, 1), combine="tokens", **TINY))
    assert by_votes.peers_bit_identical and by_tokens.peers_bit_identical
    assert by_votes.curve.tokens == by_tokens.curve.tokens == run_distro(equal).curve.tokens
    assert not all(torch.equal(a, b) for a, b in zip(weights_of(by_votes), weights_of(by_tokens)))


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(peers=3, shares=(2, 2)), r"shares: need one per peer \(3\), got 2"),
    (dict(peers=2, shares=(2, 0)), r"shares: every peer trains >= 1 sequence"),
    (dict(combine="mean"), r"combine: must be one of 'equal', 'tokens', got 'mean'"),
])
def test_split_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from(**overrides)


def test_overlapped_peers_take_their_gradient_ahead_by_their_own_results_and_stay_identical():
    """The lookahead changes each peer's gradient (so the run), never the agreement of the peers' weights."""
    runs = {}
    for lookahead in (True, False):
        cfg = config_from(peers=2, steps=4, batch_per_peer=2, seq_len=32, hidden_size=64, intermediate_size=128,
                          layers=1, heads=2, warmup_steps=0, chunk=16, topk=4, overlapped=True,
                          lookahead=lookahead, eval_every=4, eval_batches=1, eval_batch_size=8)
        runs[lookahead] = run_distro(cfg)
        assert runs[lookahead].peers_bit_identical
    ahead, stale = (next(iter(runs[k].models[0].parameters())) for k in (True, False))
    assert not torch.equal(ahead, stale)
