"""Speed-aware shares: how much of a round's batch each trainer gets, and how the run learns it.

Pure integer arithmetic, so every machine cuts every batch the same way.

**What is measured.** Each selected witness reports, per trainer of the round, the
milliseconds from when it saw the round start until it held that trainer's
verified result (:attr:`~psyche.coordinator.state.WitnessReport.arrivals_ms`).
When the round closes, a trainer whose result a witness quorum saw gets the
*upper median* of those delays: one lying witness cannot make its friend look
faster than the honest witnesses saw it. Its throughput sample is the tokens it
trained divided by that delay (tokens per second of round time), and its
estimate moves half way to the sample. A trainer no quorum saw in time (it
missed ``max_round_train_time``, or died) has its estimate halved and its batch
re-queued. Nothing a client says about itself enters the estimate.

**How shares follow.** Each round's batch is cut in proportion to the estimates.
With shares proportional to ``tokens / delay``, the only fixed point is the one
where every trainer's delay is the same: every node busy, none waited for, even
with per-round overheads that do not shrink with the share (they are in the
delay too). A trainer never measured (new, or its estimate halved to nothing)
starts conservatively, at half the smallest estimate in the round. Every share
lies between a floor (1/16 of an equal share, at least one sample, so every
trainer keeps being measured) and a ceiling (4 equal shares, so no single result
carries most of a step).

**Re-queued batches.** A missed batch waits in the run's queue and is trained
whole by one trainer of a later round: the one with the largest share takes the
oldest piece, and so on (at most all trainers but one take pieces, so fresh data
keeps flowing; a lone trainer's round trains just the piece). The remaining
trainers share the fresh samples. No sample is trained twice, none is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

SHARE_FLOOR_DIVISOR = 16
"""A share is at least an equal share divided by this (and at least one sample)."""
SHARE_CEILING_MULTIPLE = 4
"""A share is at most this many equal shares."""
MAX_REQUEUED = 256
"""Missed batches the run keeps waiting; a piece missed beyond this is not trained."""


class Piece(msgspec.Struct, array_like=True, frozen=True):
    """Sample indices ``[start, end)`` of a batch that was missed and waits to be trained again."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class Taken(msgspec.Struct, array_like=True, frozen=True):
    """A re-queued :class:`Piece` given whole to the trainer at shuffle ``position`` of a round."""

    position: int
    start: int
    end: int


class RoundPlan(msgspec.Struct, frozen=True):
    """How a round's batch is cut: ``sizes[p]`` samples for shuffle position ``p``, of which the
    positions in ``taken`` train a re-queued piece and the others the fresh samples, in order."""

    sizes: list[int]
    taken: list[Taken]

    @property
    def fresh(self) -> int:
        return sum(self.sizes) - sum(t.end - t.start for t in self.taken)


def share_weights(estimates: Sequence[int]) -> list[int]:
    """The weight each trainer's share is proportional to: its estimate, or, for a trainer never
    measured (estimate 0), half the smallest known estimate (all 1 when nobody was measured).

    >>> share_weights([0, 0, 0]), share_weights([300, 0, 100])
    ([1, 1, 1], [300, 50, 100])
    """
    known = [e for e in estimates if e > 0]
    if not known:
        return [1] * len(estimates)
    start = max(1, min(known) // 2)
    return [e if e > 0 else start for e in estimates]


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Cut ``total`` samples into ``len(weights)`` integer shares in proportion to ``weights``,
    each within the floor and the ceiling; the shares sum to ``total`` exactly.

    With fewer samples than trainers every share is 0 or 1 (the first ``total`` get one).
    Rounding gives the leftover samples to the largest remainders, ties to the lower position.

    >>> allocate(14, [3, 3, 1])
    [6, 6, 2]
    >>> allocate(16, [100, 1])   # the slow one keeps the floor
    [15, 1]
    >>> allocate(2, [5, 5, 5])
    [1, 1, 0]
    """
    n = len(weights)
    if n == 0:
        return []
    if any(w <= 0 for w in weights):
        raise ValueError("share weights must be positive")
    if total <= n:
        return [1 if p < total else 0 for p in range(n)]
    floor = max(1, total // (SHARE_FLOOR_DIVISOR * n))
    ceiling = min(total, -(-SHARE_CEILING_MULTIPLE * total // n))
    fixed: dict[int, int] = {}
    while True:
        free = [p for p in range(n) if p not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(weights[p] for p in free)
        # Clamp every share the proportional cut would put outside [floor, ceiling], then cut
        # again among the rest; this ends within n passes (each pass fixes one share or more).
        low = [p for p in free if left * weights[p] < floor * wsum]
        high = [p for p in free if left * weights[p] > ceiling * wsum]
        if low:
            fixed.update((p, floor) for p in low)
        elif high:
            fixed.update((p, ceiling) for p in high)
        else:
            break
        if len(fixed) == n:
            break
    sizes = [fixed.get(p, 0) for p in range(n)]
    free = [p for p in range(n) if p not in fixed]
    left = total - sum(sizes)
    if not free:
        # Everyone clamped (a tiny batch): hand the difference out in position order within bounds.
        p = 0
        while left != 0:
            step = 1 if left > 0 else -1
            if floor <= sizes[p] + step <= ceiling:
                sizes[p] += step
                left -= step
            p = (p + 1) % n
        return sizes
    wsum = sum(weights[p] for p in free)
    rem: list[tuple[int, int]] = []
    for p in free:
        sizes[p], r = divmod(left * weights[p], wsum)
        rem.append((-r, p))
    for _, p in sorted(rem)[: left - sum(sizes[p] for p in free)]:
        sizes[p] += 1
    return sizes


def plan_round(total: int, estimates: Sequence[int], queue: Sequence[Piece], *, speed_aware: bool) -> RoundPlan:
    """The cut of a round of ``total`` samples among trainers with ``estimates`` (shuffle order),
    taking re-queued pieces from the front of ``queue`` first.

    ``speed_aware=False`` gives every trainer the same weight (an equal split).
    Pieces are taken in queue order while they fit: at most one per trainer, at most
    ``n - 1`` of them (a lone trainer takes one and trains nothing else), each no
    larger than what is left of ``total``. The largest shares take them, so a piece
    lands where there is the most speed.
    """
    n = len(estimates)
    weights = share_weights(estimates) if speed_aware else [1] * n
    if n == 0:
        return RoundPlan(sizes=[], taken=[])
    target = allocate(total, weights)
    by_share = sorted(range(n), key=lambda p: (-target[p], p))
    taken: list[Taken] = []
    room = total
    for piece in queue:
        if len(taken) >= max(1, n - 1) or piece.size > room or piece.size <= 0:
            break
        taken.append(Taken(position=by_share[len(taken)], start=piece.start, end=piece.end))
        room -= piece.size
    if not taken:
        return RoundPlan(sizes=target, taken=[])
    sizes = [0] * n
    for t in taken:
        sizes[t.position] = t.end - t.start
    holding = {t.position for t in taken}
    rest = [p for p in range(n) if p not in holding]
    for p, size in zip(rest, allocate(room, [weights[p] for p in rest])):
        sizes[p] = size
    return RoundPlan(sizes=sizes, taken=taken)


def delivery_ms(arrivals: Sequence[Sequence[int]], trainers: int) -> list[int | None]:
    """The delay the round's witnesses saw for each of its ``trainers`` positions: the upper median
    of their positive reports (0 means "not received"), or None where no witness reported one.
    Each report is read once (a round's close asks this of every trainer).

    >>> delivery_ms([[10, 900], [12, 0], [11, 700]], 2)
    [11, 900]
    """
    seen: list[list[int]] = [[] for _ in range(trainers)]
    for report in arrivals:
        for position, ms in enumerate(report[:trainers]):
            if ms > 0:
                seen[position].append(ms)
    return [sorted(ms)[len(ms) // 2] if ms else None for ms in seen]


def measured(estimate: int, tokens: int, delay_ms: int) -> int:
    """The estimate (tokens/s) after a delivery of ``tokens`` witnessed ``delay_ms`` after the
    round began: half way from the old estimate to this round's figure (all of it when unknown).

    >>> measured(0, 1000, 500), measured(1000, 1000, 250)
    (2000, 2500)
    """
    sample = max(1, tokens * 1000 // max(1, delay_ms))
    return sample if estimate <= 0 else (estimate + sample) // 2


def missed(estimate: int) -> int:
    """The estimate after a round whose deadline the trainer missed: halved (0 = start over)."""
    return estimate // 2
