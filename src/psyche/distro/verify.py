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
deviations of the others: the score a verifier reports (see
:mod:`psyche.coordinator.verification` for what the run does with it).

The test reads one tensor. A result whose other tensors are wrong while its
output embedding is honest passes it: checking the other tensors against the
verifier's own gradient (the direction every batch shares) was measured and
dropped, since late in a run honest results stop agreeing with it as clearly,
and an honest node would then be condemned.

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
coordinator checks rounds of at least 5 trainers (``psyche.coordinator.verification.MIN_TRAINERS``)."""


K = TypeVar("K", bound=Hashable)


def score_checks(checks: Sequence[tuple[Reference, K]], results: Mapping[K, Sequence[SparseResult]]) -> list[float]:
    """A verifier's score of each ``(reference, key)`` in ``checks``: the :func:`z_score` of the result
    ``results[key]`` against every other result of its round in ``results`` (the verifier's own
    among them). NaN where the result is missing or too few others compare with it."""
    out = []
    for ref, key in checks:
        if key not in results:
            out.append(math.nan)
            continue
        data = {k: agreement(r, ref) for k, r in results.items()}
        out.append(z_score(data[key], [v for k, v in data.items() if k != key]))
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
