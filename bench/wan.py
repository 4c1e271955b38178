"""Benchmark: Psyche over a WAN against PyTorch DDP and a lone node, on this machine's testbed.

Three nodes, each with the same CPU share (``--cpu``, default 0.5 of a core), on
links shaped by :mod:`psyche.testbed` (one row per link: 20 Mbit/s with 0.5 %
loss in each direction of every link, and 100 Mbit/s), the same ~12.5M-parameter
LLaMA and the same global batch (8 sequences of 128 tokens per node per step):

- ``psyche``: a coordinator server and 3 ``psyche client`` processes (DisTrO,
  1-bit top-8, overlapped), each client on its own node;
- ``ddp``: the baseline a user would otherwise run: ``torch.distributed`` DDP
  (gloo) with AdamW, one process per node, on the same nodes and links
  (:mod:`psyche.testing.ddp_worker`);
- ``alone``: one process with the same CPU share and no network, training one
  node's share of each step, compressing it and applying 3 results
  (:mod:`psyche.testing.lone`); measured once, it is every row's baseline
  (``psyche_over_alone``). ``alone_loaded`` is the same on the 3 nodes at once:
  no network, but the machine's cores, caches and memory bandwidth shared as
  during the run (``psyche_over_alone_loaded``), which on a 2-core machine is
  the figure that isolates what the network costs.

Per row: ``step_s`` (median wall time of a step: Psyche's from the server's step
start times, DDP's from its ranks), ``bytes_per_node_step`` (bytes a node's link
sent per step, from the interface counters: everything, coordinator traffic and
protocol overheads included), ``utilization`` (forward/backward seconds over
wall time), ``speedup_vs_ddp`` (DDP step ÷ Psyche step) and
``psyche_over_alone`` (Psyche step ÷ lone step). Latency is not emulated (the
kernel has no delay qdisc).

``--loss-steps N`` (default 0: off) adds the validation loss at equal tokens of
DisTrO against the best of an AdamW LR sweep, from the in-process simulation
(:mod:`psyche.testing.distro_sim`) of the same model, peers and batch.

Needs root and the testbed's kernel features; prints one JSON line.
``--quick`` runs fewer steps.
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

import tomli_w  # noqa: E402

from psyche.config import RunConfig  # noqa: E402
from psyche.testbed import Link, Node, Testbed, missing_requirement  # noqa: E402
from psyche.testing.lone import lone_on_testbed  # noqa: E402
from psyche.testing.network import Network, client_node, small_config  # noqa: E402

NODES = 3
PER_NODE = 8
MODEL = {"hidden_size": 320, "intermediate_size": 864, "num_hidden_layers": 8, "num_attention_heads": 5,
         "num_key_value_heads": 5, "seq_len": 128}
ROWS = {"20mbit_loss0.5": Link(20, 0.5), "100mbit": Link(100)}


def wan_config(data: Path, steps: int) -> RunConfig:
    """The run every row trains: the WAN model, 3 clients, ``PER_NODE`` sequences each per step."""
    # Start-up (torch, the model) on 0.6 of a core takes tens of seconds; a round of this
    # model a few seconds. The limits are generous so that only the links set the pace.
    return small_config("wan", data=data, model=MODEL, total_steps=steps, warmup_time=60, cooldown_time=10,
                        max_round_train_time=60, global_batch_size_start=NODES * PER_NODE,
                        global_batch_size_end=NODES * PER_NODE, init_min_clients=NODES, min_clients=NODES - 1)


def testbed(link: Link, cpu: float) -> Testbed:
    # The server is the run's coordinator, not a trainer: its link is shaped like the others',
    # its CPU is not limited (it uses little).
    return Testbed([Node("server", link, control=True)]
                   + [Node(client_node(i), link, cpu=cpu) for i in range(NODES)])


def tx_bytes(bed: Testbed) -> int:
    return sum(bed.bytes(client_node(i))[0] for i in range(NODES))


def psyche_row(bed: Testbed, cfg: RunConfig, root: Path) -> dict:
    """A real run on the testbed; its step time, bytes and utilization."""
    from psyche.ledger.status import round_seconds
    from psyche.ledger.store import Store

    net = Network(root, cfg, bed=bed)
    samples: list[tuple[int, int]] = []  # (step, bytes all clients had sent) while training

    def sample(s: dict) -> None:
        # Counters are read once per step, status once a second: the driver shares the
        # machine with the nodes, and polling harder showed up in their step times.
        if s["state"] in ("RoundTrain", "RoundWitness") and (not samples or samples[-1][0] != s["step"]):
            samples.append((s["step"], tx_bytes(bed)))

    try:
        net.run_to_end(NODES, timeout=1800, every=1.0, watch=sample)
    finally:
        net.stop()
    store = Store(root / "run.sqlite")
    starts = store.step_times(cfg.run_id)
    # A step's validation report replaces its training report and carries the same fields.
    reports = [r for _, _, r, _ in store.reports(cfg.run_id)]
    later = [r for _, step, r, _ in store.reports(cfg.run_id) if step >= 2]
    store.close()
    # The first step pays the start-up (model build, first connections): left out.
    gaps = [t for step in sorted(starts)[1:] if (t := round_seconds(starts, step)) is not None]
    # Utilization over the same steps: from step 2's start to the last step's end.
    spans = [t for step, t in starts.items() if t[1] is not None and step >= 2]
    rounds_wall = max(e for _, e in spans) - min(s for s, _ in spans)
    fb = sum(r["forward_backward_seconds"] for r in later) / NODES
    first, last = samples[0], samples[-1]
    per_step = (last[1] - first[1]) / max(1, last[0] - first[0]) / NODES
    profiles = [net.profile(i) for i in range(NODES)]
    return {"step_s": round(statistics.median(gaps), 3), "bytes_per_node_step": round(per_step),
            "payload_bytes_per_node_step": round(statistics.median(r["result_bytes"] for r in reports)),
            "utilization": round(fb / rounds_wall, 4),
            "weights_identical": len({p["weights_sha256"] for p in profiles}) == 1,
            "steps": len(starts)}


def ddp_row(bed: Testbed, cfg_path: Path, root: Path, steps: int) -> dict:
    """DDP with AdamW, one rank per node; its step time, bytes and utilization."""
    procs = []
    for r in range(NODES):
        node = client_node(r)
        procs.append(bed.spawn(node, [sys.executable, "-m", "psyche.testing.ddp_worker", "--config", str(cfg_path),
                                      "--rank", str(r), "--world", str(NODES), "--master-addr", bed.ip(client_node(0)),
                                      "--master-port", "29500", "--steps", str(steps), "--ifname", "eth0",
                                      "--count-bytes", "eth0", "--out", str(root / f"ddp-{r}.json")],
                               log=root / f"ddp-{r}.log", env=dict(os.environ)))
    for r, p in enumerate(procs):
        if p.wait(3600) != 0:
            raise SystemExit(f"DDP rank {r} failed; log: {root / f'ddp-{r}.log'}")
    reports = [json.loads((root / f"ddp-{r}.json").read_text()) for r in range(NODES)]
    # Step 1 pays gloo's and the allocator's first-time costs: left out.
    step = statistics.median(max(rep["step_s"][i] + rep["data_s"][i] for rep in reports) for i in range(1, steps))
    sent = [b - a for rep in reports for a, b in zip(rep["tx_bytes"][1:], rep["tx_bytes"][2:])]
    local = sum(sum(rep["local_s"][1:]) for rep in reports) / NODES
    wall = sum(max(rep["step_s"][i] + rep["data_s"][i] for rep in reports) for i in range(1, steps))
    return {"step_s": round(step, 3), "bytes_per_node_step": round(statistics.median(sent)),
            "utilization": round(local / wall, 4), "steps": steps}


def alone_row(bed: Testbed, cfg_path: Path, root: Path, steps: int, *, nodes: int = 1) -> dict:
    """One node's work with no network, on ``nodes`` nodes of the testbed at once (each its CPU share)."""
    reps = lone_on_testbed(bed, [client_node(i) for i in range(nodes)], cfg_path, root, clients=NODES, steps=steps,
                           name=f"alone-{nodes}")
    return {"step_s": round(statistics.median(t for rep in reps for t in rep["step_times"][1:]), 3),
            "utilization": round(statistics.median(rep["utilization"] for rep in reps), 4), "params": reps[0]["params"]}


def loss_comparison(steps: int) -> dict:
    """DisTrO vs the best AdamW of a sweep at equal tokens: the in-process simulation of this model and batch."""
    import torch

    from psyche.testing.distro_sim import compare, config_from

    torch.set_num_threads(1)  # as bench/convergence.py: deterministic, and beside other work
    sim = config_from(steps=steps, peers=NODES, batch_per_peer=PER_NODE, seq_len=MODEL["seq_len"],
                      hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
                      layers=MODEL["num_hidden_layers"], heads=MODEL["num_attention_heads"], tie_embeddings=False,
                      warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 4), adamw_lrs=(1e-3, 3e-3, 1e-2))
    report, _ = compare(sim)
    keep = ("distro_val_loss", "adamw_val_loss", "loss_ratio", "tokens", "steps", "adamw_lrs", "adamw_best_lr",
            "adamw_val_losses", "distro_config")
    return {"source": "in-process simulation (psyche.testing.distro_sim), same model, 3 peers x 8 sequences",
            **{k: report[k] for k in keep}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="Psyche steps per row")
    ap.add_argument("--ddp-steps", type=int, default=6, help="DDP steps per row")
    ap.add_argument("--cpu", type=float, default=0.5,
                    help="CPU share of each node, in cores (3 nodes, a server and this driver share the machine)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"which link rows (of {', '.join(ROWS)}; none: only --loss-steps)")
    ap.add_argument("--loss-steps", type=int, default=0, help="also compare validation loss (simulation) over N steps")
    ap.add_argument("--quick", action="store_true", help="8 Psyche steps, 4 DDP steps")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs' folders here (default: a temp dir)")
    args = ap.parse_args()
    names = [r for r in args.rows.split(",") if r and r != "none"]
    if unknown := [r for r in names if r not in ROWS]:
        ap.error(f"--rows: unknown {unknown}; the rows are {', '.join(ROWS)} (or none)")
    if names and (problem := missing_requirement()) is not None:
        raise SystemExit(f"bench/wan.py needs the testbed: {problem}")
    steps, ddp_steps = (8, 4) if args.quick else (args.steps, args.ddp_steps)
    from psyche.data import ensure_default_dataset

    data = ensure_default_dataset(Path("data/fortunes"), progress=False).resolve()
    tmp = tempfile.TemporaryDirectory(prefix="psyche-bench-wan-") if args.out is None else None
    out = Path(tmp.name) if tmp else args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = wan_config(data, steps)
    cfg_path = out / "wan.toml"
    cfg_path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    t0 = time.perf_counter()
    report: dict = {"bench": "wan", "nodes": NODES, "cpu_per_node": args.cpu, "sequences_per_node_step": PER_NODE,
                    "seq_len": MODEL["seq_len"], "latency": "not emulated"}
    rows: dict = {}
    if names:
        with testbed(Link(), args.cpu) as bed:
            alone = alone_row(bed, cfg_path, out, min(steps, 8))
            # The same, on the 3 nodes at once: this machine as loaded as during the run (its
            # cores, caches and memory shared by 3 trainers), with no network.
            alone_loaded = alone_row(bed, cfg_path, out, min(steps, 8), nodes=NODES)
        report |= {"params": alone["params"], "alone": alone, "alone_loaded": alone_loaded, "rows": rows}
    for name in names:
        link = ROWS[name]
        root = out / name
        root.mkdir(exist_ok=True)
        with testbed(link, args.cpu) as bed:
            psyche = psyche_row(bed, cfg, root / "psyche")
        with testbed(link, args.cpu) as bed:
            ddp = ddp_row(bed, cfg_path, root, ddp_steps)
        rows[name] = {"link": {"mbit": link.mbit, "loss_percent_each_direction": link.loss},
                      "psyche": psyche, "ddp": ddp,
                      "speedup_vs_ddp": round(ddp["step_s"] / psyche["step_s"], 2),
                      "psyche_over_alone": round(psyche["step_s"] / alone["step_s"], 3),
                      "psyche_over_alone_loaded": round(psyche["step_s"] / alone_loaded["step_s"], 3),
                      "bytes_ratio_ddp_over_psyche": round(ddp["bytes_per_node_step"] / psyche["bytes_per_node_step"], 1)}
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr)
    if args.loss_steps:
        report["val_loss"] = loss_comparison(args.loss_steps)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
