"""LR schedules: properties of lr_at for every kind."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from psyche.config import LRScheduleConfig
from psyche.train.schedule import lr_at, wsd_decay_start

KINDS = ["constant", "linear", "cosine", "wsd"]


@st.composite
def schedules(draw):
    total = draw(st.integers(1, 400))
    peak = draw(st.floats(1e-5, 1.0))
    cfg = LRScheduleConfig(
        kind=draw(st.sampled_from(KINDS)),
        peak_lr=peak,
        final_lr=draw(st.floats(0.0, 1.0)) * peak,
        warmup_steps=draw(st.integers(0, total - 1)),
        decay_fraction=draw(st.floats(0.01, 1.0)),
    )
    return cfg, total


@given(schedules())
def test_bounds(sched):
    cfg, total = sched
    for s in range(total + 3):
        lr = lr_at(s, cfg, total)
        assert 0 < lr or (cfg.final_lr == 0 and s >= cfg.warmup_steps)
        assert lr <= cfg.peak_lr * (1 + 1e-12)
        if s >= cfg.warmup_steps:
            assert lr >= cfg.final_lr * (1 - 1e-12) or cfg.kind == "constant"


@given(schedules())
def test_warmup_rises_to_peak_and_decay_never_rises(sched):
    cfg, total = sched
    lrs = [lr_at(s, cfg, total) for s in range(total + 2)]
    w = cfg.warmup_steps
    assert all(a < b for a, b in zip(lrs[:w], lrs[1 : w + 1]))
    assert math.isclose(lrs[w], cfg.peak_lr) if w < total else True
    tail = lrs[w:]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(tail, tail[1:]))


@given(schedules())
def test_end_of_run_is_the_floor(sched):
    cfg, total = sched
    expected = cfg.peak_lr if cfg.kind == "constant" else cfg.final_lr
    assert lr_at(total, cfg, total) == expected
    assert lr_at(total + 100, cfg, total) == expected


@given(schedules())
def test_wsd_is_flat_then_decays(sched):
    cfg, total = sched
    cfg = cfg.model_copy(update={"kind": "wsd"})
    start = wsd_decay_start(cfg, total)
    assert all(lr_at(s, cfg, total) == cfg.peak_lr for s in range(cfg.warmup_steps, start))
    assert total - start <= math.ceil(cfg.decay_fraction * total)


def test_known_values():
    cfg = LRScheduleConfig(kind="cosine", peak_lr=1.0, final_lr=0.0, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_at(4, cfg, 14) == 1.0
    assert math.isclose(lr_at(9, cfg, 14), 0.5)  # half-way through the decay
    lin = cfg.model_copy(update={"kind": "linear"})
    assert math.isclose(lr_at(9, lin, 14), 0.5)
    with pytest.raises(ValueError):
        lr_at(-1, cfg, 10)
