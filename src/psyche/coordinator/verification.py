"""Verified results: who checks whose result, and when the run condemns one.

Pure integer arithmetic, so every machine reaches the same verdicts.

**Who checks.** A round's witnesses are its verifiers (in rounds of at least
:data:`MIN_TRAINERS` trainers). The trainer at shuffle
position ``p`` is checked by the first ``verifiers`` witnesses met going round
the shuffle order from ``p + 1`` (never by itself); the shuffle is fresh each
round, so nobody picks who checks it. A verifier scores each result it was given
(how much better the result agrees with the gradient of a few of the trainer's
own sequences than the round's other results do, in standard deviations of
those others, times :data:`SCORE_SCALE`; see :mod:`psyche.distro.verify`) and
sends the scores in its witness report, :data:`NO_SCORE` for a result it could
not check.

**One round's score.** A result's score in a round is the ``need``-th smallest of
its verifiers' scores, where ``need`` is a majority of its verifiers and at
least two (:func:`verdicts_needed`): it is low only if that many verifiers found
it low. So one verifier, lying or unlucky, can never by itself make an honest
result look bad, and (with three or more verifiers) cannot by itself make a bad
one look good either. It does tilt the odds: a liar among an honest result's
three verifiers leaves it the lower of the two honest scores, which the
allowance below is chosen to absorb.

**Evidence over rounds.** Each trainer keeps a ``suspicion`` (≤ 0): a one-sided
CUSUM of its round scores, ``min(0, suspicion + score − ALLOWANCE)``. An honest
trainer's scores sit well above the allowance, so its suspicion stays at 0; a
result that does not hold its own data's gradient (another batch's, a copy, an
old one) scores about 0 and sinks it by about the allowance each round; a
harmful one (negated, random signs) scores far below 0 and sinks it at once.
When it reaches ``-CONDEMN_AT`` the result of that round is condemned: no node
applies it, and its trainer is dropped from the epoch without points.

**Why these numbers.** Measured on the bench's setup (8 peers × 32 sequences of 64
tokens, 3 verifiers each checking 3 of a trainer's sequences, 120 steps; 960 honest
round scores): an honest result's round score had mean 5.2, sd 1.9, and its lowest
was 0.17 (1 % were below 1.6). A result computed on other data scored 0.2 (sd 0.95),
a copy of another peer's result 0.0 (sd 0.7); negated, random or stale results far
below 0. Replayed on those scores with an allowance of 2.5 and a limit of 5, an
honest suspicion never fell below −2.3, and −4.3 in the worst case a lying verifier
can make (every round scored by the lowest of the three verifiers); a cheat reached
the limit within 4 of its results in 294 of 296 tries (copies and stale results:
all). An allowance of 3 caught cheats a little sooner, but in ``bench/adversary.py``
a lying verifier then got one honest node condemned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import chain, islice
from typing import NamedTuple

from psyche.coordinator.instructions import MAX_SCORE, MIN_SCORE

SCORE_SCALE = 100
"""A score on the wire is the verifier's z-score times this, rounded."""
NO_SCORE = MIN_SCORE
"""What a verifier reports for a result it was assigned but could not check."""
ALLOWANCE = 250
"""What each round's score is measured against (2.5 standard deviations of the others): an honest
result scores well above it, one that does not hold its own data's gradient about 0."""
CONDEMN_AT = 500
"""Suspicion at which a result is condemned (5 standard deviations of accumulated shortfall)."""
MAX_VERIFIERS = 8
"""Most verifiers one result can have (the ``verifiers`` setting's ceiling)."""
MIN_TRAINERS = 5
"""Rounds with fewer trainers check nothing: a verifier compares a result with at least 4 others
(:data:`psyche.distro.verify.MIN_OTHERS`), and fewer are too easily alike by chance."""


class Check(NamedTuple):
    """A result a verifier must score: the trainer at shuffle ``position`` and its interval
    (see :func:`psyche.coordinator.queries.verification_checks`)."""

    position: int
    trainer: bytes
    start: int
    end: int


def verifiers_of(position: int, trainers: int, witnesses: int, per_result: int) -> list[int]:
    """Shuffle positions of the witnesses that check the result of the trainer at ``position``.

    >>> verifiers_of(0, 8, 8, 3), verifiers_of(6, 8, 8, 3), verifiers_of(1, 8, 3, 3), verifiers_of(0, 4, 4, 3)
    ([1, 2, 3], [7, 0, 1], [2, 0], [])
    """
    if trainers < MIN_TRAINERS:
        return []
    # Going round from position + 1, the witnesses (positions < witnesses) met are those after
    # ``position``, then those before it: no walk over the non-witness positions, which made a
    # round of 256 trainers cost milliseconds per witness report.
    w = min(witnesses, trainers)
    return list(islice(chain(range(position + 1, w), range(min(position, w))), per_result))


def assignments(trainers: int, witnesses: int, per_result: int) -> dict[int, list[int]]:
    """For each witness position, the shuffle positions of the trainers whose results it checks,
    in the order its report lists their scores (ascending)."""
    return {w: list(checked) for w, checked in enumerate(_assignments(trainers, witnesses, per_result))}


@lru_cache(maxsize=64)
def _assignments(trainers: int, witnesses: int, per_result: int) -> tuple[tuple[int, ...], ...]:
    # Asked for every witness report (to check its count of scores) with the same three numbers
    # all round long: 0.5 ms each at 256 trainers, computed once here.
    out: list[list[int]] = [[] for _ in range(min(witnesses, trainers))]
    for p in range(trainers):
        for w in verifiers_of(p, trainers, witnesses, per_result):
            out[w].append(p)
    return tuple(tuple(checked) for checked in out)


def verdicts_needed(verifiers: int) -> int:
    """How many of a result's ``verifiers`` must score it low for the round to: a majority, at least 2.

    >>> [verdicts_needed(v) for v in (1, 2, 3, 4, 5)]
    [2, 2, 2, 3, 3]
    """
    return max(2, verifiers // 2 + 1)


def round_score(scores: Sequence[int], verifiers: int) -> int | None:
    """One result's score in one round from what its ``verifiers`` reported (:data:`NO_SCORE` left out):
    the ``need``-th smallest, or None when fewer than ``need`` verifiers scored it."""
    given = sorted(s for s in scores if s != NO_SCORE)
    need = verdicts_needed(verifiers)
    return given[need - 1] if len(given) >= need else None


def suspicion_after(suspicion: int, score: int) -> int:
    """The trainer's suspicion after a round that scored its result ``score`` (one CUSUM step)."""
    return min(0, suspicion + score - ALLOWANCE)


def condemned(suspicion: int) -> bool:
    """Whether a trainer with this suspicion has its result condemned."""
    return suspicion <= -CONDEMN_AT


def to_wire(z: float) -> int:
    """A verifier's z-score as it travels in a witness report (clamped; NaN counts as no score)."""
    if z != z:  # NaN
        return NO_SCORE
    return max(NO_SCORE + 1, min(MAX_SCORE, round(z * SCORE_SCALE)))


def draw_sequences(checks: Sequence[Check], per_check: int, rng: random.Random) -> list[tuple[Check, list[int]]]:
    """For each of ``checks`` whose trainer had samples: ``per_check`` of them (all, if it had fewer),
    drawn by ``rng``, ascending. A client draws with :class:`random.SystemRandom`, so no trainer can
    know which of its samples will be checked."""
    return [(c, sorted(rng.sample(range(c.start, c.end), min(per_check, c.end - c.start))))
            for c in checks if c.end > c.start]


def wire_scores(checks: Sequence[Check], z: Mapping[bytes, float]) -> list[int]:
    """A witness report's ``scores``: each check's z-score (``z``, by trainer id) on the wire, in the
    order of ``checks``; :data:`NO_SCORE` for a trainer without one."""
    return [to_wire(z.get(c.trainer, math.nan)) for c in checks]
