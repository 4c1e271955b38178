"""The client's trainer: results parsed when verified are reused, exactly, when applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    from psyche.config import load_config
    from psyche.data import ensure_default_dataset
    from psyche.demo import DEFAULT_CONFIG, demo_config

    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    return demo_config(load_config(DEFAULT_CONFIG), clients=2, steps=4, data_location=str(data))


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_applying_verified_results_gives_the_same_weights_as_parsing_them_afresh(cfg):
    from psyche.client.trainer import LocalTrainer

    a, b = LocalTrainer(cfg), LocalTrainer(cfg)
    for t in (a, b):
        t.init_model()
    out_a, out_b = a.train(1, 0, 4), b.train(1, 4, 8)
    payloads = [out_a.payload, out_b.payload]
    for p in payloads:
        a.check_payload(p)  # a keeps both parsed; b parses them when it applies
    assert len(a._parsed) == 2
    a.apply(1, payloads)
    b.apply(1, payloads)
    assert not a._parsed, "what was applied is forgotten"
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))


def test_the_parsed_results_kept_stay_within_their_byte_budget(cfg, monkeypatch):
    from psyche.client import trainer as trainer_mod

    t = trainer_mod.LocalTrainer(cfg)
    t.init_model()
    payloads = [t.train(1, 4 * i, 4 * i + 4).payload for i in range(3)]
    t.check_payload(payloads[0])
    one = t._parsed_bytes
    monkeypatch.setattr(trainer_mod, "PARSED_CACHE_BYTES", 2 * one)
    for p in payloads[1:]:
        t.check_payload(p)
    assert len(t._parsed) == 2 and t._parsed_bytes == 2 * one, "the oldest was dropped"
    with pytest.raises(ValueError):
        t.check_payload(payloads[0][:-1])  # a truncated payload is still refused, and not kept
    assert len(t._parsed) == 2


def test_trainer_single_machine_loop_and_simulation_build_the_same_distro(cfg):
    """One builder: the client, `psyche train` and the benchmarks all get DisTrO.from_config's groups and options."""
    from psyche.client.trainer import LocalTrainer
    from psyche.distro import DisTrO
    from psyche.testing.distro_sim import build_distro, config_from
    from psyche.train.loop import build_optimizer
    from psyche.train.model import build_model

    def described(opt):
        return [(g["kind"], g["lr"], g["lr_scale"], g["compression_decay"], g["topk"], g["one_bit"], g["chunk"],
                 g["weight_decay"], g["matrix_update"], g["embedding_update"], len(g["params"])) for g in opt.param_groups] + [opt.warmup_steps]

    t = LocalTrainer(cfg)
    t.init_model()
    reference = described(DisTrO.from_config(build_model(cfg.model), cfg.optimizer, cfg.lr))
    assert reference[-1] == cfg.lr.warmup_steps > 0, "the momentum warmup spans the LR warmup"
    assert described(t.optimizer) == reference
    assert described(build_optimizer(build_model(cfg.model), cfg.optimizer, cfg.lr, kind="distro")) == reference
    # The simulation, given the same LR and warmup, builds the same optimizer from its defaults.
    sim = config_from(distro_lr=cfg.lr.peak_lr, warmup_steps=cfg.lr.warmup_steps,
                      **{k: v for k, v in cfg.optimizer.distro_options().items() if k != "weight_decay"})
    assert described(build_distro(sim, build_model(cfg.model))) == reference
    # A config that sets an option passes it through, and only it.
    custom = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"matrix_lr_scale": 0.5})})
    t2 = LocalTrainer(custom)
    t2.init_model()
    scales = {g["kind"]: g["lr_scale"] for g in t2.optimizer.param_groups}
    assert scales["matrix"] == 0.5 and scales["embedding"] == DisTrO.DEFAULT_KIND_SCALES["embedding"]
    # Codec options for one kind of tensor reach that kind's groups, and only theirs.
    from psyche.config import KindCodecConfig

    per_kind = cfg.optimizer.model_copy(update={"kinds": {"matrix": KindCodecConfig(topk=7, one_bit=False)}})
    groups = DisTrO.from_config(build_model(cfg.model), per_kind, cfg.lr).param_groups
    expected = {(kind, 7, False) if kind == "matrix" else (kind, topk, one_bit)
                for kind, _, _, _, topk, one_bit, *_ in reference[:-1]}
    assert {(g["kind"], g["topk"], g["one_bit"]) for g in groups} == expected
    # Without the momentum warmup, DisTrO keeps β from the first step.
    off = cfg.optimizer.model_copy(update={"momentum_warmup": False})
    assert DisTrO.from_config(build_model(cfg.model), off, cfg.lr).warmup_steps == 0


def test_the_momentum_warmup_follows_the_runs_step_not_a_local_count(cfg):
    """A node that joins at step 3 generates as one that trained steps 1 and 2: two steps done."""
    from psyche.client.trainer import LocalTrainer

    t = LocalTrainer(cfg)
    t.init_model()
    assert t.optimizer is not None
    seen: list[dict] = []
    generate = t.optimizer.generate
    t.optimizer.generate = lambda **kw: seen.append(kw) or generate(**kw)  # type: ignore[method-assign]
    t.train(3, 0, 4)
    assert seen == [{"steps_done": 2}]


def test_an_overlapped_step_trains_ahead_by_the_nodes_own_results_and_leaves_the_weights_as_they_were(cfg):
    """Step 2 trained before step 1 is applied takes its gradient with this node's own step-1 results
    applied (unless the config turns the lookahead off); the weights it leaves are untouched. Applied
    first (not overlapped), both train alike."""
    from psyche.client.trainer import LocalTrainer

    off = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lookahead": False})})
    ahead, stale, applied_first = LocalTrainer(cfg), LocalTrainer(off), LocalTrainer(cfg)
    for t in (ahead, stale, applied_first):
        t.init_model()
        t.train(1, 0, 4)
    weights = _weights(ahead)
    assert ahead.train(2, 4, 8).payload != stale.train(2, 4, 8).payload
    assert all(torch.equal(x, y) for x, y in zip(_weights(ahead), weights, strict=True))
    assert "lookahead" in ahead.timer.totals() and "lookahead" not in stale.timer.totals()
    # The same step once step 1 is applied: no result is in flight, the lookahead changes nothing.
    stale_2 = LocalTrainer(off)
    stale_2.init_model()
    stale_2.train(1, 0, 4)
    for t in (applied_first, stale_2):
        t.apply(1, [])  # an empty agreement still ends the step
    assert applied_first.train(2, 4, 8).payload == stale_2.train(2, 4, 8).payload
