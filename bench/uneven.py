"""Benchmark: speed-aware shares against an equal split, with one node a third as fast, on this machine's testbed.

Three ``psyche client`` nodes with CPU quotas ``--cpu`` (default 0.6, 0.6 and 0.2
of a core: one node a third as fast as the others; the server and this driver
share the rest of the machine) on unshaped testbed links train the same run
twice, once per rule of ``[coordinator] shares``:

- ``even``: each round's batch cut in equal shares, so every round waits for the
  slow node;
- ``speed``: cut in proportion to the throughput the coordinator learns from
  witnessed deliveries (:mod:`psyche.coordinator.shares`).

The baseline is each node's **solo speed**: the node alone at its quota does a
round's whole work as a lone node would (forward/backward on the global batch,
compress, verify and apply its own result: :func:`psyche.testing.lone.lone_trainer`
with one client), in tokens/s; the three are measured at once, the machine as
loaded as during the runs. ``ideal_step_s`` = global batch tokens ÷ Σ solo speeds:
a step's time if the work were cut perfectly and nothing else cost anything.

Per mode: ``step_s``, the mean wall time of a round over the steady state (the
rounds after the first ``--skip``, in which the speed estimates are learnt), from
the server's step spans, and ``step_time_over_ideal``; ``rounds_s``, every round's
time; ``val_loss``, the validation loss of the last step (the status history):
both modes train the same steps of the same global batch, so at equal tokens;
``shares``, each node's mean fraction of the batch over the steady state (the
coordinator's round plans); ``throughput``, the coordinator's last estimates
(tokens per second of round time); ``train_s``, each node's mean seconds to train
its share (forward/backward and compress, from its reports); ``profiles``, where
each node's time went over the whole run (``psyche client --profile``: share of
wall time per phase, ``other`` = waiting). Nodes are listed in ``--cpu`` order.

Needs root and the testbed's kernel features (else prints one JSON line with
``skipped``); prints one JSON line. ``--quick`` runs fewer steps.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import tomli_w  # noqa: E402

from psyche.config import RunConfig  # noqa: E402
from psyche.testbed import Link, Node, Testbed, missing_requirement  # noqa: E402
from psyche.testing.lone import lone_on_testbed  # noqa: E402
from psyche.testing.network import Network, client_node, small_config  # noqa: E402

MODEL = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "seq_len": 128}
"""A ~1.9M-parameter LLaMA: a step of the global batch takes seconds, not minutes, at a fifth of a core."""
BATCH = 384
"""Sequences per step. Solo, DisTrO's per-step costs (compress, verify, apply) were 5 % of a step
at 96 sequences and 1.2 % at 384 (on 0.6 and 0.2 of a core alike); a round's coordination
(ticks, witnessing, the exchange) costs a few tenths of a second whatever the batch."""
MODES = ("even", "speed")


def uneven_config(data: Path, steps: int, batch: int, shares: str) -> RunConfig:
    """The run both modes train: ``batch`` sequences per step among 3 clients, cut by ``shares``."""
    # Start-up (torch, the model) takes tens of seconds at a fifth of a core, and the even
    # split's round about 15 s: the limits are generous so that no round is cut short (a
    # missed batch would be re-queued and change what each mode trains).
    return small_config(f"uneven-{shares}", data=data, model=MODEL, total_steps=steps, warmup_time=120,
                        cooldown_time=10, max_round_train_time=120, epoch_time=3600,
                        global_batch_size_start=batch, global_batch_size_end=batch, init_min_clients=3,
                        min_clients=2, shares=shares)


def testbed(cpus: list[float], mbit: float | None) -> Testbed:
    # The server coordinates and does not train: its CPU is not limited (it uses little).
    return Testbed([Node("server", Link(mbit), control=True)]
                   + [Node(client_node(i), Link(mbit), cpu=c) for i, c in enumerate(cpus)])


def write_config(cfg: RunConfig, path: Path) -> Path:
    path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def solo(bed: Testbed, cfg_path: Path, out: Path, *, nodes: int, batch: int, steps: int) -> dict:
    """Each node's solo speed: a lone trainer doing the whole global batch at the node's quota."""
    reps = lone_on_testbed(bed, [client_node(i) for i in range(nodes)], cfg_path, out, clients=1, steps=steps,
                           name="solo")
    # The first step pays one-time costs (allocations, first calls): left out.
    step_s = [statistics.median(rep["step_times"][1:]) for rep in reps]
    return {"step_s": [round(t, 3) for t in step_s],
            "tokens_per_sec": [round(batch * MODEL["seq_len"] / t, 1) for t in step_s],
            "fixed_share": [round(1 - rep["phases"].get("forward_backward", 0) - rep["phases"].get("data", 0), 4)
                            for rep in reps],
            "params": reps[0]["params"]}


def mode_run(bed: Testbed, cfg: RunConfig, root: Path, *, nodes: int, skip: int) -> dict:
    """A real run on the testbed; its steady-state step time, shares, estimates and last validation loss."""
    from psyche.coordinator.queries import round_shares
    from psyche.coordinator.state import decode_state
    from psyche.ledger.status import round_seconds
    from psyche.ledger.store import Store

    net = Network(root, cfg, bed=bed)
    plans: dict[int, dict[str, tuple[float, int]]] = {}  # step -> client id -> (fraction, estimate)

    def read_plans(s: dict) -> None:
        # The state (its last 4 rounds) is read once per step, the status once a second:
        # the driver shares the machine with the nodes.
        if s["state"] not in ("RoundTrain", "RoundWitness") or s["step"] in plans:
            return
        try:
            raw = httpx.get(f"{net.url}/api/runs/{cfg.run_id}/state", timeout=10).content
        except httpx.TransportError:
            return
        state = decode_state(raw)
        for r in state.rounds:
            if r.step not in plans and r.trainers:
                plans[r.step] = {sh.client.hex(): (sh.fraction, sh.throughput) for sh in round_shares(state, r.step)}

    try:
        status = net.run_to_end(nodes, timeout=1800, every=1.0, watch=read_plans)
        ids = [net.client_id(i) for i in range(nodes)]
        profiles = [net.profile(i) for i in range(nodes)]
    finally:
        net.stop()
    store = Store(root / "run.sqlite")
    spans = store.step_times(cfg.run_id)
    reports = store.reports(cfg.run_id)
    store.close()
    steps = sorted(spans)
    rounds = [round_seconds(spans, step) for step in steps]
    steady = [t for step, t in zip(steps, rounds) if step > skip and t is not None]
    steady_steps = [step for step in steps if step > skip and step in plans]
    train_s = [[r["train_seconds"] for signer, step, r, _ in reports if signer.hex() == cid and step > skip]
               for cid in ids]
    vals = [row for row in status["history"] if row["val_loss"] is not None]
    last_plan = plans[max(plans)]
    return {"step_s": round(statistics.mean(steady), 3), "step_s_median": round(statistics.median(steady), 3),
            "rounds_s": [round(t, 2) if t is not None else None for t in rounds],
            "val_loss": round(vals[-1]["val_loss"], 4), "val_loss_step": vals[-1]["step"],
            "shares": [round(statistics.mean(plans[s][cid][0] for s in steady_steps), 3) for cid in ids],
            "throughput": [last_plan[cid][1] for cid in ids],
            "train_s": [round(statistics.mean(t), 2) if t else None for t in train_s],
            "tokens": status["tokens_trained"], "steps": len(steps),
            "weights_identical": len({p["weights_sha256"] for p in profiles}) == 1,
            "profiles": [{"cpu_share": p["cpu_share"], "utilization": p["utilization"],
                          "phases": {k: v["share"] for k, v in p["phases"].items()}, "other": p["other"]["share"]}
                         for p in profiles]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="0.6,0.6,0.2",
                    help="CPU quota of each client node, in cores, comma-separated (the server and this driver "
                         "share what is left of the machine)")
    ap.add_argument("--steps", type=int, default=16, help="steps per mode")
    ap.add_argument("--skip", type=int, default=4,
                    help="first rounds left out of the step time and shares (the speed estimates are learnt)")
    ap.add_argument("--batch", type=int, default=BATCH, help="global batch, sequences per step")
    ap.add_argument("--solo-steps", type=int, default=2, help="steps of each solo measurement (the first is left out)")
    ap.add_argument("--mbit", type=float, default=None, help="shape every link to this rate (default: unshaped)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"which share rules to run (of {', '.join(MODES)})")
    ap.add_argument("--quick", action="store_true", help="8 steps per mode, 3 of them skipped")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs' folders here (default: a temp dir)")
    args = ap.parse_args()
    try:
        cpus = [float(c) for c in args.cpu.split(",")]
    except ValueError:
        ap.error(f"--cpu: comma-separated numbers of cores, got {args.cpu!r}")
    modes = [m for m in args.modes.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {unknown}; the modes are {', '.join(MODES)}")
    steps, skip = (8, 3) if args.quick else (args.steps, args.skip)
    if not 0 <= skip < steps - 1:
        ap.error(f"--skip must leave at least 2 of the {steps} steps (got {skip})")
    if (problem := missing_requirement()) is not None:
        print(json.dumps({"bench": "uneven", "skipped": f"needs the testbed: {problem}"}))
        return
    from psyche.data import ensure_default_dataset

    data = ensure_default_dataset(Path("data/fortunes"), progress=False).resolve()
    tmp = tempfile.TemporaryDirectory(prefix="psyche-bench-uneven-") if args.out is None else None
    out = Path(tmp.name) if tmp else args.out
    out.mkdir(parents=True, exist_ok=True)
    nodes = len(cpus)
    t0 = time.perf_counter()
    tokens = args.batch * MODEL["seq_len"]
    report: dict = {"bench": "uneven", "cpu": cpus, "batch": args.batch, "seq_len": MODEL["seq_len"],
                    "steps": steps, "skip": skip, "mbit": args.mbit}
    with testbed(cpus, args.mbit) as bed:
        cfg_path = write_config(uneven_config(data, steps, args.batch, "even"), out / "solo.toml")
        alone = solo(bed, cfg_path, out, nodes=nodes, batch=args.batch, steps=args.solo_steps)
        ideal = tokens / sum(alone["tokens_per_sec"])
        report |= {"params": alone["params"], "solo_tokens_per_sec": alone["tokens_per_sec"],
                   "solo_step_s": alone["step_s"], "solo_fixed_share": alone["fixed_share"],
                   "ideal_step_s": round(ideal, 3)}
        print(f"solo: {json.dumps(report)}", file=sys.stderr, flush=True)
        for mode in modes:
            row = mode_run(bed, uneven_config(data, steps, args.batch, mode), out / mode, nodes=nodes, skip=skip)
            step_s = row.pop("step_s")
            report[mode] = {"step_s": step_s, "step_time_over_ideal": round(step_s / ideal, 3), **row}
            print(f"{mode}: {json.dumps(report[mode])}", file=sys.stderr, flush=True)
    if "even" in report and "speed" in report:
        report["val_loss_speed_over_even"] = round(report["speed"]["val_loss"] / report["even"]["val_loss"], 4)
        report["speedup_speed_over_even"] = round(report["even"]["step_s"] / report["speed"]["step_s"], 3)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
