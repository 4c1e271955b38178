"""Checking a peer's DisTrO result against the data it was assigned (verification).

A result is the top-k DCT coefficients of a peer's momentum, one sign each, and
the momentum holds the gradient of the peer's batch. A verifier computes a
*reference*: the gradient of a few of the peer's assigned sequences on the same
weights, for the output embedding only (the tensor that says most about which
tokens a batch held: a forward pass and one matrix product, no backward through
the model). :func:`agreement` measures how well a result's signs agree with it.
An honest result agrees better than the round's other results do, because it
holds those very sequences' gradient while the others only share what every
batch's gradient has in common. :func:`z_score` is that excess in standard
deviations of the others.

That test looks at one tensor. The other tensors are checked for *direction*:
each tensor of a result should agree with the verifier's own training gradient
(another batch, same weights: the part every batch shares) about as well as the
other results' same tensor does. A tensor negated or filled with random signs
agrees far less than the others' median (or against it); an honest one does not.
:func:`check_score` combines both into the one number a verifier reports; see
:mod:`psyche.coordinator.verification` for what the run does with it.

Measured on the bench's setup (8 peers × 32 sequences of 64 tokens, 3 of a
trainer's sequences checked; see ``bench/adversary.py``): an honest result's z is
about +5 (sd 2.6), a result computed on other data or copied from another peer
about 0 (sd 1.5), a negated, random-sign or stale one far below 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from psyche.distro import dct
from psyche.distro.codec import SparseResult


@dataclass(frozen=True)
class Reference:
    """A verifier's reference for one result: the DCT coefficients ``(tiles, n)`` of the gradient of
    some of the trainer's sequences, for the parameter at ``index`` of the result list, scaled to
    unit RMS."""

    index: int
    coefficients: torch.Tensor


def output_parameter(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> int:
    """The position in ``params`` (the order results list parameters) of ``model``'s output embedding."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError("verification needs a model with an output embedding (a causal LM head)")
    for i, p in enumerate(params):
        if p is head.weight:
            return i
    raise ValueError("the output embedding is not among the optimizer's parameters")


def output_references(model: torch.nn.Module, batches: Sequence[torch.Tensor], index: int, chunk: int) -> list[Reference]:
    """The reference of each of ``batches`` (``(B, seq_len+1)`` token ids each) on ``model``'s current weights.

    One forward pass without gradients over all of them up to the last hidden states ``h``;
    then, per batch, the mean cross-entropy's gradient for the output embedding ``W``
    (logits ``h·Wᵀ``), which is ``(softmax(h·Wᵀ) − onehot(y))ᵀ·h / tokens``: computed
    directly, so no ``.grad`` is touched and a training step in progress is not disturbed.
    ``index`` and ``chunk``: where that parameter sits in a result and the chunk its DCT
    tiles use.
    """
    head = model.get_output_embeddings()  # type: ignore[operator]
    base = model.get_decoder()  # type: ignore[operator]
    if not batches:
        return []
    device = head.weight.device
    whole = torch.cat([b.to(device) for b in batches])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = base(input_ids=whole[:, :-1], use_cache=False).last_hidden_state.float()  # (B, T, H)
            weight = head.weight.float()
            grid = dct.tile_grid(tuple(head.weight.shape), chunk)
            out = []
            row = 0
            for b in batches:
                h = hidden[row: row + b.size(0)].reshape(-1, hidden.size(-1))  # (N, H)
                y = whole[row: row + b.size(0), 1:].reshape(-1)
                row += b.size(0)
                probs = torch.softmax(h @ weight.T, dim=-1)  # (N, V)
                probs[torch.arange(y.numel(), device=device), y] -= 1.0
                grad = probs.T @ h / max(y.numel(), 1)  # (V, H)
                c = dct.forward(grad, grid)
                rms = c.square().mean().sqrt()
                out.append(Reference(index, c / rms if rms > 0 else c))
    finally:
        model.train(was_training)
    return out


MIN_OTHERS = 4
"""Other results a comparison needs: with fewer, their spread is too easily tiny by chance. So the
coordinator checks rounds of at least 5 trainers (``psyche.coordinator.verification.MIN_TRAINERS``;
the direction test needs 6, as it leaves out the verifier's own result)."""
CLEAR = 3.0
"""A tensor counts in the direction test when the other results' median agreement is this many
of their robust standard deviations above 0 (else chance alone could swing its fraction)."""
MEAN_FLOOR, MEAN_WEIGHT = 0.6, 20.0
"""A result whose tensors agree with the direction reference, on average, less than this fraction
of the median other result's scores ``MEAN_WEIGHT`` points per unit below the floor (an honest
result's average is about 1: it scores about 8)."""
WORST_FLOOR, WORST_WEIGHT = -0.5, 10.0
"""The same for its worst single tensor, with a looser floor: one tensor of an honest result can
fall to 0.25 of the others' median by chance (it scores 7.5), a negated tensor sits near −1 (−5)."""


@torch.no_grad()
def gradient_reference(params: Sequence[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Per parameter (``(parameter, chunk)`` in result order), the DCT coefficients of its ``.grad``
    scaled to unit RMS (zeros for a parameter without one): the direction reference."""
    out = []
    for p, chunk in params:
        grid = dct.tile_grid(tuple(p.shape), chunk)
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        c = dct.forward(g.detach().to(torch.float32), grid)
        rms = c.square().mean().sqrt()
        out.append(c / rms if rms > 0 else c)
    return out


def tensor_agreements(results: Sequence[SparseResult], reference: Sequence[torch.Tensor]) -> list[float]:
    """Per parameter, :func:`agreement` of the result with the direction reference."""
    return [agreement(results, Reference(i, c)) for i, c in enumerate(reference)]


def direction_fractions(candidate: Sequence[float], others: Sequence[Sequence[float]]) -> list[float]:
    """Per tensor, the candidate's direction agreement as a fraction of the median other result's,
    for the tensors whose other results clearly agree on a direction (their median is more than
    :data:`CLEAR` robust standard deviations above 0; the rest say nothing and are left out)."""
    out = []
    for i, a in enumerate(candidate):
        values = [o[i] for o in others]
        if len(values) < MIN_OTHERS:
            continue
        med = statistics.median(values)
        spread = 1.4826 * statistics.median(abs(v - med) for v in values)
        if med > CLEAR * spread:
            out.append(a / med)
    return out


def check_score(data_z: float, fractions: Sequence[float] = ()) -> float:
    """The score a verifier reports for one result: its data z-score, or its direction score when
    that is lower: the lower of ``MEAN_WEIGHT · (mean fraction − MEAN_FLOOR)`` and
    ``WORST_WEIGHT · (worst fraction − WORST_FLOOR)`` over its tensors' direction fractions
    (:func:`direction_fractions`). NaN stays NaN."""
    if not fractions or data_z != data_z:
        return data_z
    direction = min(MEAN_WEIGHT * (statistics.fmean(fractions) - MEAN_FLOOR),
                    WORST_WEIGHT * (min(fractions) - WORST_FLOOR))
    return min(data_z, direction)


K = TypeVar("K", bound=Hashable)


def score_checks(checks: Sequence[tuple[Reference, K]], results: Mapping[K, Sequence[SparseResult]],
                 direction: Sequence[torch.Tensor] | None = None, own: K | None = None) -> list[float]:
    """A verifier's score (:func:`check_score`) of each ``(reference, key)`` in ``checks``: the result
    ``results[key]`` against every other result of its round in ``results``. ``direction``: the
    verifier's own gradient reference, when it trained this round; ``own``: the key of its own
    result, which the direction test leaves out (it was made from that very gradient). NaN where
    the result is missing or too few others compare with it."""
    directions = ({k: tensor_agreements(r, direction) for k, r in results.items() if k != own}
                  if direction is not None else {})
    out = []
    for ref, key in checks:
        if key not in results:
            out.append(math.nan)
            continue
        data = {k: agreement(r, ref) for k, r in results.items()}
        z = z_score(data[key], [v for k, v in data.items() if k != key])
        fractions = (direction_fractions(directions[key], [v for k, v in directions.items() if k != key])
                     if key in directions else [])
        out.append(check_score(z, fractions))
    return out


def agreement(results: Sequence[SparseResult], ref: Reference) -> float:
    """Mean, over the coefficients a result sent for the reference's parameter, of each one's sign
    times the reference's coefficient there (0.0 when it sent none)."""
    r = results[ref.index]
    if tuple(r.indices.shape[:1]) != tuple(ref.coefficients.shape[:1]):
        raise ValueError("result and reference cut the parameter into different tiles")
    picked = ref.coefficients.gather(1, r.indices.to(torch.int64))
    return float((picked * torch.sign(r.values.to(torch.float32))).sum()) / max(picked.numel(), 1)


def z_score(candidate: float, others: Sequence[float]) -> float:
    """How far ``candidate`` lies above the median of ``others``, in their robust standard deviations
    (1.4826 × the median absolute deviation, so a few wild results among the others do not widen
    it). NaN with fewer than :data:`MIN_OTHERS` others, or when they do not vary."""
    if len(others) < MIN_OTHERS:
        return math.nan
    med = statistics.median(others)
    spread = 1.4826 * statistics.median(abs(o - med) for o in others)
    if not spread > 0:
        return math.nan
    return (candidate - med) / spread
