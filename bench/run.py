"""Benchmark: a short real run on loopback, and where each client's time goes.

Runs ``psyche demo`` (a coordinator server and N client processes, iroh between
them, the demo's LLaMA on the bundled text) and reads what the run left behind:
the server's database (per-client reports, step start times) and each client's
``--profile`` (seconds per phase of its work).

- ``utilization``: per client, forward/backward seconds over the wall time from
  its first step to the end of the run; the median over clients is the headline.
- ``utilization_in_rounds``: the same over the rounds alone (first step's start
  to last step's end, server clock): a long run's figure, where the epoch's
  warmup and cooldown (5 s in the demo config) weigh little.
- ``utilization_alone``: the baseline measured in the same run: one trainer in
  this process, no network and no coordinator, doing the same per-client work
  (train its share of the batch, compress, apply N results), one torch thread as
  the clients have. ``ratio_vs_alone`` = utilization / utilization_alone: the
  share of a lone node's efficiency the network keeps.
- ``bytes_per_step_per_client``: median P2P bytes a client sent per step
  (results to every peer, gossip, acknowledgements), and the payload alone.
- ``allreduce_equivalent_bytes``: what each client would send per step in a ring
  all-reduce of fp32 gradients, ``2·(N-1)/N · 4 · params``.
- ``step_time_s``: median wall time of a step's round, from its start to the next's.
- ``profile``: per phase, the median share of client wall time; ``other`` is time
  no phase claimed (waiting on the coordinator's round clock, on peers, for a CPU).

Prints one JSON line. ``--quick`` (or CI set) runs fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the clients' setting, for the baseline too

from rich.console import Console  # noqa: E402

from psyche.config import load_config  # noqa: E402
from psyche.demo import DEFAULT_CONFIG, demo_config, run_demo  # noqa: E402
from psyche.ledger.status import round_seconds  # noqa: E402
from psyche.ledger.store import Store  # noqa: E402
from psyche.testing.lone import lone_trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="12 steps")
    ap.add_argument("--out", type=Path, default=None, help="keep the run's folder here (default: a temp dir)")
    args = ap.parse_args()
    steps = 12 if (args.quick or os.environ.get("CI")) else args.steps
    base = load_config(DEFAULT_CONFIG)
    from psyche.data import ensure_default_dataset

    data = ensure_default_dataset(Path("data/fortunes")).resolve()
    cfg = demo_config(base, clients=args.clients, steps=steps, data_location=str(data))
    alone = lone_trainer(cfg, clients=args.clients, steps=min(steps, 10))

    tmp = tempfile.TemporaryDirectory(prefix="psyche-bench-run-") if args.out is None else None
    out = Path(tmp.name) if tmp else args.out
    t0 = time.perf_counter()
    code = run_demo(clients=args.clients, steps=steps, out=out, console=Console(file=sys.stderr))
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"the run did not finish (exit {code}); logs in {out / 'logs'}")

    profiles = [json.loads(p.read_text()) for p in sorted((out / "profiles").glob("*.json"))]
    store = Store(out / "run.sqlite")
    run_id = cfg.run_id
    # A step's validation report replaces its training report and carries the same fields.
    signed = [(signer, r) for signer, _, r, _ in store.reports(run_id)]
    reports = [r for _, r in signed]
    starts = store.step_times(run_id)
    store.close()
    step_gaps = [t for step in starts if (t := round_seconds(starts, step)) is not None]
    params = alone["params"]
    n = args.clients
    allreduce = 2 * (n - 1) / n * 4 * params
    sent = statistics.median(r["bytes_sent"] for r in reports)
    payload = statistics.median(r["result_bytes"] for r in reports)
    train_s = statistics.median(r["train_seconds"] for r in reports)
    fb_s = statistics.median(r["forward_backward_seconds"] for r in reports)
    utilization = statistics.median(p["utilization"] for p in profiles)
    # The same ratio over the rounds only (first step's start to last step's end): what a long
    # run approaches, where the epoch's warmup and cooldown are a small part of the time.
    spans = [t for t in starts.values() if t[1] is not None]
    rounds_wall = max(e for _, e in spans) - min(s for s, _ in spans)
    fb_by_client: dict[bytes, float] = {}
    for signer, r in signed:
        fb_by_client[signer] = fb_by_client.get(signer, 0.0) + r["forward_backward_seconds"]
    utilization_in_rounds = statistics.median(fb / rounds_wall for fb in fb_by_client.values())
    phases = sorted({name for p in profiles for name in p["phases"]})
    profile = {name: round(statistics.median(p["phases"].get(name, {}).get("share", 0.0) for p in profiles), 4)
               for name in phases}
    profile["other"] = round(statistics.median(p["other"]["share"] for p in profiles), 4)
    step_time = statistics.median(step_gaps)
    print(json.dumps({
        "bench": "run",
        "clients": n,
        "steps": steps,
        "params": params,
        "cpus": os.cpu_count(),
        "utilization": round(utilization, 4),
        "utilization_per_client": [p["utilization"] for p in profiles],
        "utilization_in_rounds": round(utilization_in_rounds, 4),
        "utilization_alone": round(alone["utilization"], 4),
        "ratio_vs_alone": round(utilization / alone["utilization"], 4),
        "cpu_share_per_client": [p["cpu_share"] for p in profiles],
        "bytes_per_step_per_client": sent,
        "payload_bytes_per_step_per_client": payload,
        "allreduce_equivalent_bytes": round(allreduce),
        "allreduce_over_sent": round(allreduce / sent, 1),
        "step_time_s": round(step_time, 3),
        "alone_step_time_s": round(alone["step_s"], 3),
        "train_s_per_step": round(train_s, 3),
        "forward_backward_s_per_step": round(fb_s, 3),
        "coordination_s_per_step": round(step_time - train_s, 3),
        "profile": profile,
        "alone_profile": alone["phases"],
        "wall_s": round(wall, 1),
    }))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
