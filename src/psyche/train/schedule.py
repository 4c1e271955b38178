"""The learning rate as a pure function of the step (nanoGPT style).

``lr_at(step, lr_cfg, total_steps)`` for the four kinds, each with a linear warmup:

* ``constant``: warmup, then ``peak_lr`` for ever.
* ``linear``:   warmup, then a straight line from ``peak_lr`` to ``final_lr`` at ``total_steps``.
* ``cosine``:   warmup, then half a cosine from ``peak_lr`` to ``final_lr`` at ``total_steps``.
* ``wsd``:      warmup, stable at ``peak_lr``, then a straight line to ``final_lr`` over the
  last ``decay_fraction`` of the steps (warmup-stable-decay).

Steps are 0-based: step ``s`` is the ``s+1``-th optimizer update.
DisTrO's momentum warmup, which ends with this LR warmup, is
:func:`psyche.distro.optimizer.momentum_warmup_factor`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from psyche.config import LRScheduleConfig


def wsd_decay_start(lr_cfg: "LRScheduleConfig", total_steps: int) -> int:
    """The first step of the decay phase of a ``wsd`` schedule."""
    decay_steps = math.ceil(lr_cfg.decay_fraction * total_steps)
    return max(lr_cfg.warmup_steps, total_steps - decay_steps)


def lr_at(step: int, lr_cfg: "LRScheduleConfig", total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) in a run of ``total_steps`` steps.

    Promises: ``0 < lr <= peak_lr`` during warmup and ``final_lr <= lr <= peak_lr`` after
    it; the warmup rises and the decay never rises; from ``total_steps`` on the LR is
    ``final_lr`` (``peak_lr`` for ``constant``).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 (got {total_steps})")
    peak, final, warmup = lr_cfg.peak_lr, lr_cfg.final_lr, lr_cfg.warmup_steps
    # 1) linear warmup: step 0 already trains (peak/(warmup+1)); step `warmup` reaches peak.
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    # 2) constant: no decay at all.
    if lr_cfg.kind == "constant":
        return peak
    # 3) past the end of the run: stay at the floor.
    if step >= total_steps:
        return final
    if lr_cfg.kind == "wsd":
        start = wsd_decay_start(lr_cfg, total_steps)
        # 4) wsd, stable phase: the peak until the decay starts.
        if step < start:
            return peak
        # 5) wsd, decay phase: a straight line towards final_lr at total_steps.
        progress = (step - start) / (total_steps - start)
        return peak + progress * (final - peak)
    progress = (step - warmup) / max(1, total_steps - warmup)  # in [0, 1)
    # 6) linear: a straight line from peak to final.
    if lr_cfg.kind == "linear":
        return peak + progress * (final - peak)
    # 7) cosine: half a cosine from peak (progress 0) to final (progress 1).
    if lr_cfg.kind == "cosine":
        return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - final)
    raise ValueError(f"lr.kind: unknown schedule {lr_cfg.kind!r}")

