"""Where a node's time goes: the phase timer, the profile, and the trainer's use of them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from psyche.client.timing import PhaseTimer, profile

ROOT = Path(__file__).resolve().parents[1]


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "forward_backward"]), st.floats(0, 100)), max_size=30),
       st.floats(0.001, 1e4))
def test_profile_adds_up(work, wall):
    timer = PhaseTimer()
    for name, seconds in work:
        timer.add(name, seconds)
    prof = profile(timer, wall_seconds=wall, cpu_seconds=wall / 2, steps_trained=3)
    busy = sum(s for _, s in work)
    assert prof["steps_trained"] == 3
    assert sum(p["calls"] for p in prof["phases"].values()) == len(work)
    assert prof["utilization"] == pytest.approx(sum(s for n, s in work if n == "forward_backward") / wall, abs=1e-4)
    assert prof["other"]["seconds"] == pytest.approx(max(0.0, wall - busy), abs=1e-3)
    shares = [p["share"] for p in prof["phases"].values()]
    assert shares == sorted(shares, reverse=True), "the biggest phase comes first"


def test_phase_counts_time_even_when_it_raises_and_across_threads():
    timer = PhaseTimer()
    with pytest.raises(RuntimeError):
        with timer.phase("x"):
            raise RuntimeError("boom")

    def work():
        for _ in range(1000):
            timer.add("y", 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert timer.calls() == {"x": 1, "y": 4000}
    assert timer.totals()["y"] == pytest.approx(4.0)


def test_trainer_times_each_kind_of_work():
    from psyche.client.trainer import LocalTrainer
    from psyche.config import load_config
    from psyche.data import ensure_default_dataset
    from psyche.demo import DEFAULT_CONFIG, demo_config

    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    cfg = demo_config(load_config(DEFAULT_CONFIG), clients=2, steps=4, data_location=str(data))
    trainer = LocalTrainer(cfg)
    trainer.init_model()
    out = trainer.train(1, 0, 4)
    trainer.check_payload(out.payload)
    trainer.apply(1, [out.payload, out.payload])
    totals = trainer.timer.totals()
    assert {"model_load", "data", "forward_backward", "compress", "verify", "apply"} <= set(totals)
    assert 0 < out.forward_backward_seconds < out.seconds
    assert totals["forward_backward"] == out.forward_backward_seconds
