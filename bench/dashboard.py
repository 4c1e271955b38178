"""What live dashboard viewers cost the coordinator server.

Starts ``psyche server`` and two real ``psyche client`` processes training a
small LLaMA, then measures the server process's CPU time (``/proc/PID/stat``)
in alternating windows: no viewers (the baseline: the server hosting a live
run) and N viewers, each a WebSocket on ``/api/runs/{id}/live`` that decodes
every push and applies the deltas as the page does. Prints one JSON line:

    viewers, window_s, windows          the set-up
    server_cpu_baseline_pct             server CPU (% of one core) with no viewer
    server_cpu_viewers_pct              the same with N viewers
    push_cost_pct                       the difference: what the viewers cost
    ratio                               viewers / baseline
    steps_baseline, steps_viewers       steps trained in each (the load was alike)
    pushes_per_viewer_per_s, push_bytes_per_viewer_per_s, snapshot_bytes
    page_bytes                          the page and its assets, as served

The goal (issue 6): ``push_cost_pct`` < 5 with 20 viewers.

    python bench/dashboard.py [--viewers 20] [--window 10] [--windows 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from psyche.config import parse_config  # noqa: E402
from psyche.dashboard.feed import apply_delta  # noqa: E402
from psyche.data import ensure_default_dataset  # noqa: E402
from psyche.demo import free_port  # noqa: E402
from psyche.testing.network import wait_serving  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_config(data: Path, steps: int):
    return parse_config({
        "name": "bench-dashboard",
        "coordinator": dict(warmup_time=20, cooldown_time=2, max_round_train_time=20, round_witness_time=3,
                            epoch_time=3600, total_steps=steps, init_min_clients=2, min_clients=1, witness_nodes=1,
                            global_batch_size_start=8, global_batch_size_end=8, waiting_for_members_extra_time=1,
                            checkpointers=1),
        "model": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "seq_len": 64},
        "data": {"location": str(data)},
        "lr": {"kind": "constant", "peak_lr": 3e-3, "warmup_steps": 0, "final_lr": 3e-3},
        "optimizer": {"micro_batch_size": 4},
    })


class Viewer:
    """One dashboard viewer: follows the live feed and keeps the document up to date."""

    def __init__(self, url: str):
        self.url = url
        self.pushes = 0
        self.bytes = 0
        self.snapshot_bytes = 0
        self.doc = None

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        async with connect(self.url, max_size=2**26) as ws:
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                msg = json.loads(raw)
                if msg["type"] == "snapshot":
                    self.doc = msg["data"]
                    self.snapshot_bytes = len(raw)
                elif msg["type"] == "delta":
                    self.doc = apply_delta(self.doc, msg)
                else:
                    continue
                self.pushes += 1
                self.bytes += len(raw)


async def window(pid: int, url: str, run_id: str, seconds: float, viewers: int) -> dict:
    """Server CPU over ``seconds`` with ``viewers`` connected (connections made before the window)."""
    stop = asyncio.Event()
    vs = [Viewer(url.replace("http://", "ws://") + f"/api/runs/{run_id}/live") for _ in range(viewers)]
    tasks = [asyncio.create_task(v.run(stop)) for v in vs]
    if viewers:
        while any(v.doc is None for v in vs):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the connection burst (snapshots, refreshes) is not the steady cost
    async with httpx.AsyncClient() as http:
        step0 = (await http.get(f"{url}/api/runs/{run_id}")).json()["step"]
        pushes0 = sum(v.pushes for v in vs)
        bytes0 = sum(v.bytes for v in vs)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(seconds)
        c1, t1 = cpu_seconds(pid), time.perf_counter()
        pushes = sum(v.pushes for v in vs) - pushes0
        nbytes = sum(v.bytes for v in vs) - bytes0
        step1 = (await http.get(f"{url}/api/runs/{run_id}")).json()["step"]
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"cpu": c1 - c0, "wall": t1 - t0, "steps": step1 - step0, "pushes": pushes, "bytes": nbytes,
            "snapshot_bytes": max((v.snapshot_bytes for v in vs), default=0)}


def page_bytes(url: str) -> int:
    html = httpx.get(url + "/").content
    assets = re.findall(rb'(?:src|href)="(/static/[^"]+)"', html)
    return len(html) + sum(len(httpx.get(url + a.decode()).content) for a in assets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", type=int, default=20)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per measuring window")
    ap.add_argument("--windows", type=int, default=2, help="pairs of (baseline, viewers) windows")
    args = ap.parse_args()

    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="psyche-bench-dashboard-"))
    cfg = run_config(data, steps=100_000)  # trains through every window; stopped at the end
    (tmp / "run.toml").write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *cli: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "psyche.cli", *cli], stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT, start_new_session=True)
        procs.append(p)
        return p

    try:
        server = spawn("server", "server", "--config", str(tmp / "run.toml"), "--db", str(tmp / "run.sqlite"),
                       "--port", str(port), "--key", str(tmp / "server.key"))
        if not wait_serving(url, server):
            raise SystemExit(f"server did not start; see {tmp / 'server.log'}")
        for i in range(2):
            spawn(f"client-{i}", "client", "--server", url, "--key", str(tmp / f"client-{i}.key"))
        deadline = time.time() + 240
        while httpx.get(f"{url}/api/runs/{cfg.run_id}").json()["step"] < 3:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"the run did not start training; logs in {tmp}")
            time.sleep(0.5)

        base, view = [], []
        for _ in range(args.windows):
            base.append(asyncio.run(window(server.pid, url, cfg.run_id, args.window, 0)))
            view.append(asyncio.run(window(server.pid, url, cfg.run_id, args.window, args.viewers)))
        pct = lambda ws: 100 * sum(w["cpu"] for w in ws) / sum(w["wall"] for w in ws)  # noqa: E731
        wall_v = sum(w["wall"] for w in view)
        b, v = pct(base), pct(view)
        print(json.dumps({
            "viewers": args.viewers,
            "window_s": args.window,
            "windows": args.windows,
            "server_cpu_baseline_pct": round(b, 2),
            "server_cpu_viewers_pct": round(v, 2),
            "push_cost_pct": round(v - b, 2),
            "ratio": round(v / b, 3) if b else None,
            "steps_baseline": sum(w["steps"] for w in base),
            "steps_viewers": sum(w["steps"] for w in view),
            "pushes_per_viewer_per_s": round(sum(w["pushes"] for w in view) / args.viewers / wall_v, 2),
            "push_bytes_per_viewer_per_s": round(sum(w["bytes"] for w in view) / args.viewers / wall_v),
            "snapshot_bytes": max(w["snapshot_bytes"] for w in view),
            "page_bytes": page_bytes(url),
        }))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
