"""The baseline a network is measured against: one node's work with no network and no coordinator.

:func:`lone_trainer` trains one client's share of each step, compresses it, checks
the payload as a witness would and applies ``clients`` results, as a client of an
N-client run does, in this process (overlapped as the run's config says: each step
trains before the previous one is applied). ``python -m psyche.testing.lone`` runs it as its
own process (for a CPU share of its own on a testbed) and writes the result as JSON;
:func:`lone_on_testbed` runs it so on testbed nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psyche.config import RunConfig

if TYPE_CHECKING:
    from psyche.testbed import Testbed


def lone_trainer(cfg: RunConfig, *, clients: int, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of one node's share (the global batch over ``clients``), one torch thread.

    Returns ``utilization`` (forward/backward over wall time), ``step_s`` (mean wall
    time of a step), ``step_times`` (each step's), ``params`` and ``phases`` (share of
    wall time per phase)."""
    import torch

    from psyche.client.trainer import LocalTrainer

    torch.set_num_threads(1)
    trainer = LocalTrainer(cfg)
    trainer.init_model()
    trainer.timer.reset()
    per_client = cfg.coordinator.global_batch_size_start // clients
    times = []
    held: list[bytes] = []  # overlapped: the step trained last, not yet applied
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        t = time.perf_counter()
        start = (step - 1) * per_client
        out = trainer.train(step, start, start + per_client)
        trainer.check_payload(out.payload)
        if cfg.optimizer.overlapped:
            # As a client does: step t trains (ahead by its own step t-1 results) before
            # step t-1 is applied; the last step is applied at the end.
            if held:
                trainer.apply(step - 1, held)
            held = [out.payload] * clients
            if step == steps:
                trainer.apply(step, held)
        else:
            trainer.apply(step, [out.payload] * clients)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    fb = trainer.timer.totals()["forward_backward"]
    return {"utilization": fb / wall, "step_s": wall / steps, "step_times": times, "params": trainer.parameters(),
            "phases": {k: round(v / wall, 4) for k, v in sorted(trainer.timer.totals().items())}}


def lone_on_testbed(bed: Testbed, nodes: Sequence[str], cfg_path: Path, out: Path, *, clients: int, steps: int,
                    name: str = "alone", timeout: float = 3600) -> list[dict[str, Any]]:
    """Run ``python -m psyche.testing.lone`` on each of ``nodes`` of ``bed`` at once (each at its CPU
    share, no network); their :func:`lone_trainer` reports, in ``nodes`` order.

    Each writes ``out/NAME-I.json`` and logs to ``out/NAME-I.log``; a failed one raises
    ``SystemExit`` naming its log."""
    procs = [bed.spawn(node, [sys.executable, "-m", "psyche.testing.lone", "--config", str(cfg_path),
                              "--clients", str(clients), "--steps", str(steps), "--out", str(out / f"{name}-{i}.json")],
                       log=out / f"{name}-{i}.log", env=dict(os.environ)) for i, node in enumerate(nodes)]
    for i, p in enumerate(procs):
        if p.wait(timeout) != 0:
            raise SystemExit(f"the lone trainer on {nodes[i]} failed; log: {out / f'{name}-{i}.log'}")
    return [json.loads((out / f"{name}-{i}.json").read_text()) for i in range(len(nodes))]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m psyche.testing.lone --config RUN.toml --clients N --steps S --out FILE.json``."""
    from psyche.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m psyche.testing.lone", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--clients", type=int, required=True, help="the run's clients: this node trains 1/N of the batch")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
    except ConfigError as exc:
        p.error(" ".join(exc.lines()))
    report = lone_trainer(cfg, clients=a.clients, steps=a.steps)
    a.out.write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
