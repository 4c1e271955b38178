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
- ``adaptive``: the honest result with signs flipped wherever no other peer sent
  that coefficient (so its vote alone decides it), in every tensor but the one the
  verifiers' data test reads (kept honest, so the result passes it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from psyche.distro.codec import ResultLayout, SparseResult
from psyche.distro.payload import decode_payload, encode_payload

KINDS = ("negate", "random", "other_data", "copy", "stale", "adaptive")

OTHER_DATA_OFFSET = 10_000_000
"""``other_data`` trains samples this far past its assigned ones."""


def _with_values(r: SparseResult, values: torch.Tensor) -> SparseResult:
    return SparseResult(r.shape, r.dtype, r.chunk, r.topk, r.one_bit, r.indices, values.to(r.values.dtype))


def negate(results: Sequence[SparseResult]) -> list[SparseResult]:
    """Every value's sign flipped."""
    return [_with_values(r, -r.values) for r in results]


def negate_payload(payload: bytes, layouts: Sequence[ResultLayout]) -> bytes:
    """A result payload (results of ``layouts``) with every value's sign flipped."""
    return encode_payload(negate(decode_payload(payload, layouts)))


def random_signs(results: Sequence[SparseResult], generator: torch.Generator) -> list[SparseResult]:
    """Random signs at the same positions."""
    return [_with_values(r, torch.randint(0, 2, r.values.shape, generator=generator).float() * 2 - 1)
            for r in results]


def adaptive(results: Sequence[SparseResult], others: Sequence[Sequence[SparseResult]], spare: int) -> list[SparseResult]:
    """The honest ``results`` with every sign flipped where no result in ``others`` chose the
    coefficient (there its vote alone is the update), in every tensor but ``spare``: the one the
    verifiers' data test reads, kept honest so that the result passes it."""
    out = []
    for i, r in enumerate(results):
        if i == spare:
            out.append(r)
            continue
        chosen = torch.zeros(r.grid.num_tiles, r.grid.tile_numel, dtype=torch.bool)
        idx = r.indices.to(torch.int64)
        for o in others:
            chosen.scatter_(1, o[i].indices.to(torch.int64), True)
        alone = ~chosen.gather(1, idx)
        signs = torch.sign(r.values.to(torch.float32))
        out.append(_with_values(r, torch.where(alone, -signs, signs)))
    return out


def _negating_client(argv: list[str]) -> None:
    """The ``psyche`` program, run in this process (as ``python -m psyche.cli`` would run it), with
    every result this node publishes negated: it trains honestly, then lies."""
    import dataclasses
    import runpy

    from psyche.client import trainer as trainer_module

    honest_train = trainer_module.LocalTrainer.train

    def train(self, step: int, start: int, end: int) -> trainer_module.TrainOutput:
        out = honest_train(self, step, start, end)
        return dataclasses.replace(out, payload=negate_payload(out.payload, self.layouts))

    trainer_module.LocalTrainer.train = train  # type: ignore[method-assign]
    sys.argv = ["psyche", *argv]
    runpy.run_module("psyche.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "negate":
        sys.exit("usage: python -m psyche.testing.adversaries negate PSYCHE-ARGS...")
    _negating_client(sys.argv[2:])
