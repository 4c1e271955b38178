"""Members who cheat: what each kind of adversary does to the result it publishes.

Each kind turns the result an honest node would publish into the one the adversary
publishes instead. They are used by ``bench/adversary.py`` (eight peers in one
process, through the real verification path) and, for ``negate``, by a real client
process that cheats (``python -m psyche.testing.adversaries negate client ...``).

- ``negate``: every value's sign flipped (the update pushes the model uphill);
- ``random``: random signs at the honest positions (noise);
- ``other_data``: the result of training on data other than the assigned batch;
- ``copy``: another trainer's result of the same round, republished;
- ``stale``: the adversary's own result of an earlier round, republished;
- ``adaptive``: the honest result with signs flipped only where no other peer sent
  that coefficient (so its vote alone decides it), in every tensor but the one the
  data test reads, and only as far as it expects to pass the direction test.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from psyche.distro.codec import SparseResult
from psyche.distro.verify import MEAN_FLOOR

KINDS = ("negate", "random", "other_data", "copy", "stale", "adaptive")

OTHER_DATA_OFFSET = 10_000_000
"""``other_data`` trains samples this far past its assigned ones."""


def _with_values(r: SparseResult, values: torch.Tensor) -> SparseResult:
    return SparseResult(r.shape, r.dtype, r.chunk, r.topk, r.one_bit, r.indices, values.to(r.values.dtype))


def negate(results: Sequence[SparseResult]) -> list[SparseResult]:
    """Every value's sign flipped."""
    return [_with_values(r, -r.values) for r in results]


def random_signs(results: Sequence[SparseResult], generator: torch.Generator) -> list[SparseResult]:
    """Random signs at the same positions."""
    return [_with_values(r, torch.randint(0, 2, r.values.shape, generator=generator).float() * 2 - 1)
            for r in results]


def adaptive(results: Sequence[SparseResult], others: Sequence[Sequence[SparseResult]],
             direction: Sequence[torch.Tensor], spare: int, *, keep_fraction: float = MEAN_FLOOR + 0.25
             ) -> list[SparseResult]:
    """The honest ``results`` with signs flipped where no result in ``others`` chose the coefficient,
    in every tensor but ``spare`` (the data test's), most harmful first (where the sign agrees
    most with ``direction``, the adversary's own gradient reference), and only while the tensor's
    agreement with ``direction`` stays at least ``keep_fraction`` of the median other's: what it
    expects the verifiers' direction test to let through."""
    out = []
    for i, r in enumerate(results):
        if i == spare:
            out.append(r)
            continue
        ref = direction[i]
        tiles, n = ref.shape
        chosen = torch.zeros(tiles, n, dtype=torch.bool)
        for o in others:
            chosen.scatter_(1, o[i].indices.to(torch.int64), True)
        idx = r.indices.to(torch.int64)
        signs = torch.sign(r.values.to(torch.float32))
        contrib = ref.gather(1, idx) * signs  # each coefficient's part of the agreement
        alone = ~chosen.gather(1, idx)
        count = idx.numel()
        mine = float(contrib.sum()) / count
        medians = sorted(float((ref.gather(1, o[i].indices.to(torch.int64))
                                * torch.sign(o[i].values.to(torch.float32))).sum()) / count for o in others)
        target = keep_fraction * medians[len(medians) // 2] if medians else mine
        # Flipping coefficient j lowers the agreement by 2·contrib[j]/count: flip the largest first.
        flat = torch.where(alone, contrib, torch.zeros_like(contrib)).flatten()
        order = torch.argsort(flat, descending=True)
        drop = 2 * flat[order].clamp_min(0).cumsum(0) / count
        budget = max(0.0, mine - target)
        k = int((drop <= budget).sum())
        flip = torch.zeros(flat.numel(), dtype=torch.bool)
        flip[order[:k]] = True
        flipped = torch.where(flip.view_as(signs) & alone, -signs, signs)
        out.append(_with_values(r, flipped))
    return out


def _negating_client(argv: list[str]) -> None:
    """``psyche`` with every result this node publishes negated (it trains honestly, then lies)."""
    from psyche.cli import main
    from psyche.client import trainer as trainer_module
    from psyche.distro import decode_payload, encode_payload

    honest_train = trainer_module.LocalTrainer.train

    def train(self, step: int, start: int, end: int) -> trainer_module.TrainOutput:
        out = honest_train(self, step, start, end)
        bad = encode_payload(negate(decode_payload(out.payload, self.shapes)))
        return trainer_module.TrainOutput(bad, out.loss, out.tokens, out.seconds, out.finite,
                                          out.forward_backward_seconds)

    trainer_module.LocalTrainer.train = train  # type: ignore[method-assign]
    sys.argv = ["psyche", *argv]
    main()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "negate":
        sys.exit("usage: python -m psyche.testing.adversaries negate PSYCHE-ARGS...")
    _negating_client(sys.argv[2:])
