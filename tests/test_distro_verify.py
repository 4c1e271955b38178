"""How a verifier scores a DisTrO result against its trainer's data (psyche.distro.verify).

Real pieces only: a small LLaMA on the fortunes corpus, DisTrO results as peers make
them, references computed as a client computes them.
"""

from __future__ import annotations

import math

import pytest
import torch

from psyche.distro import decode_payload, encode_payload
from psyche.distro.verify import (
    MIN_OTHERS,
    agreement,
    output_parameter,
    output_references,
    score_checks,
    z_score,
)
from psyche.testing import adversaries


@pytest.fixture(scope="module")
def setup(data_dir):
    from psyche.testing.distro_sim import SimConfig, _data, _model_cfg, build_distro
    from psyche.train import build_model

    cfg = SimConfig(peers=6, batch_per_peer=8, seq_len=32, hidden_size=64, intermediate_size=128, data_dir=str(data_dir))
    train, _, vocab = _data(cfg)
    model = build_model(_model_cfg(cfg, vocab))
    opts = [build_distro(cfg, model) for _ in range(cfg.peers)]
    params = [(p, g["chunk"]) for g in opts[0].param_groups for p in g["params"]]
    index = output_parameter(model, [p for p, _ in params])
    return cfg, train, model, opts, params, index


def results_of(setup, step: int = 0):
    """Each peer's result of one step (on the same weights), as bytes round-trip them."""
    from psyche.train.step import compute_gradients

    cfg, train, model, opts, _, _ = setup
    out = []
    for peer, opt in enumerate(opts):
        start = (step * cfg.peers + peer) * cfg.batch_per_peer
        compute_gradients(model, train.batch(range(start, start + cfg.batch_per_peer)),
                          micro_batch_size=cfg.batch_per_peer, grad_clip=1.0)
        out.append(decode_payload(encode_payload(opt.generate(steps_done=step)), opt.result_layouts()))
        model.zero_grad(set_to_none=True)
    return out


def test_the_reference_is_the_output_embeddings_gradient_and_touches_no_grad(setup):
    import torch.nn.functional as F

    from psyche.distro import dct

    cfg, train, model, _, params, index = setup
    batch = train.batch(range(3))
    head = model.get_output_embeddings().weight
    assert head.grad is None
    (ref,) = output_references(model, [batch], index, params[index][1])
    assert head.grad is None and ref.index == index
    # The output side of the gradient only: the last hidden states are held fixed (with tied
    # embeddings the full gradient would add the input side, which needs the whole backward).
    hidden = model.get_decoder()(input_ids=batch[:, :-1]).last_hidden_state.detach()
    logits = hidden @ head.T
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)), head)
    c = dct.forward(grad, dct.tile_grid(tuple(head.shape), params[index][1]))
    assert torch.allclose(ref.coefficients, c / c.square().mean().sqrt(), atol=1e-4)
    # Several batches in one forward pass give each its own reference.
    a, b = output_references(model, [batch[:1], batch[1:]], index, params[index][1])
    assert not torch.allclose(a.coefficients, b.coefficients)


def test_z_scores_need_four_others_and_ignore_one_wild_one():
    assert math.isnan(z_score(1.0, [0.1] * (MIN_OTHERS - 1)))
    assert math.isnan(z_score(1.0, [0.2] * MIN_OTHERS))  # no spread: nothing to measure against
    calm = z_score(1.0, [0.0, 0.1, -0.1, 0.05, -0.05])
    assert calm > 5 and z_score(1.0, [0.0, 0.1, -0.1, 0.05, -0.05, -40.0]) == pytest.approx(calm, rel=0.35)


def test_a_result_scores_high_on_its_own_data_and_a_cheat_low(setup):
    cfg, train, model, _, params, index = setup
    results = results_of(setup)
    refs = output_references(model, [train.batch(range(p * cfg.batch_per_peer, p * cfg.batch_per_peer + 2))
                                     for p in range(cfg.peers)], index, params[index][1])
    honest = score_checks([(refs[p], p) for p in range(cfg.peers)], dict(enumerate(results)))
    assert all(z > 2 for z in honest), honest
    # Peer 0's result replaced: negated, random signs, another peer's (a copy), or missing.
    g = torch.Generator().manual_seed(0)
    for bad, below in ((adversaries.negate(results[0]), -3), (adversaries.random_signs(results[0], g), 0),
                       (results[1], 2)):
        z = score_checks([(refs[0], 0)], {**dict(enumerate(results)), 0: bad})[0]
        assert z < below, z
    assert math.isnan(score_checks([(refs[0], 0)], dict(enumerate(results[1:], start=1)))[0])
    # Agreement is a mean of sign × reference: a result agrees with the negation of itself at minus its value.
    assert agreement(adversaries.negate(results[0]), refs[0]) == pytest.approx(-agreement(results[0], refs[0]))
