"""``psyche demo``: a whole network on this machine.

Starts a coordinator server and N client processes (iroh between them, direct
loopback addresses), trains a real small LLaMA on the bundled English corpus,
shows progress, and on finishing leaves in ``--out``:

- ``checkpoint/``   a ``save_pretrained`` folder that ``AutoModelForCausalLM`` loads
- ``metrics.jsonl`` one JSON object per step: step, loss, val_loss (when measured),
                    tokens_per_sec, bytes_sent, clients
- ``profiles/``      per client, where its time went (``psyche client --profile``)
- ``run.toml``, ``run.sqlite``, ``keys/``, ``logs/``: the run's config, database, keys and logs
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w
from rich.console import Console
from rich.live import Live
from rich.table import Table

from psyche.config import RunConfig, load_config, parse_config
from psyche.localports import free_port, port_problem

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "tiny-fortunes.toml"


def demo_config(base: RunConfig, *, clients: int, steps: int, data_location: str) -> RunConfig:
    """The base config resized for ``clients`` local clients and ``steps`` steps."""
    data = base.model_dump(mode="json")
    c = data["coordinator"]
    c["total_steps"] = steps
    c["init_min_clients"] = clients
    c["min_clients"] = max(1, min(c["min_clients"], clients - 1 if clients > 1 else 1))
    c["witness_nodes"] = min(c["witness_nodes"], c["min_clients"]) if c["witness_nodes"] else 0
    c["checkpointers"] = min(c["checkpointers"], c["min_clients"])
    c["global_batch_size_start"] = max(c["global_batch_size_start"], clients)
    c["global_batch_size_end"] = max(c["global_batch_size_end"], c["global_batch_size_start"])
    data["lr"]["warmup_steps"] = min(data["lr"]["warmup_steps"], max(0, steps - 1))
    data["data"]["location"] = data_location
    return parse_config(data, "demo config")


@dataclass
class Processes:
    """The child processes of the demo, stopped together."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def failed(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs if p.poll() not in (None, 0)]

    def stop_all(self, timeout: float = 10.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + timeout
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def write_metrics(status: dict, path: Path) -> int:
    """Write ``metrics.jsonl`` from the server's run history; returns the number of lines."""
    rows = status.get("history", [])
    with open(path, "w") as f:
        for h in rows:
            row = {
                "step": h["step"],
                "loss": h.get("loss"),
                "tokens_per_sec": h.get("tokens_per_sec"),
                "bytes_sent": h.get("bytes_per_step"),
                "clients": h.get("clients"),
            }
            if h.get("val_loss") is not None:
                row["val_loss"] = h["val_loss"]
            f.write(json.dumps(row) + "\n")
    return len(rows)


def run_summary_line(status: dict) -> str | None:
    """One line on what a finished run achieved: validation loss, and bytes sent against an fp32 all-reduce."""
    hist = status.get("history") or []
    vals = [h["val_loss"] for h in hist if h.get("val_loss") is not None]
    ratios = [h["compression_ratio"] for h in hist if h.get("compression_ratio")]
    parts = []
    if len(vals) >= 2:
        parts.append(f"validation loss {vals[0]:.2f} → {vals[-1]:.2f}")
    if ratios:
        per_client = statistics.median(h["bytes_per_step"] / h["clients"] for h in hist if h.get("clients"))
        parts.append(f"{per_client:,.0f} bytes of results per client per step, "
                     f"{statistics.median(ratios):,.0f}× fewer than an fp32 all-reduce")
    return "; ".join(parts) or None


def steps_done(status: dict) -> int:
    """Optimizer steps a run has completed, from its Status API document (0 before any training)."""
    return int(status.get("steps_completed") or 0)


def _progress_table(status: dict, url: str) -> Table:
    t = Table(title=f"psyche demo — run {status.get('run_id')} — dashboard {url}", expand=False)
    for col in ("state", "epoch", "steps done", "loss", "val loss", "clients", "tokens/s", "bytes/step"):
        t.add_column(col)
    hist = status.get("history") or [{}]
    last = hist[-1]
    vals = [h["val_loss"] for h in hist if h.get("val_loss") is not None]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    healthy = sum(1 for c in status.get("clients", []) if c.get("state") == "Healthy")
    t.add_row(
        str(status.get("state")), str(status.get("epoch")), f"{steps_done(status)}/{status.get('total_steps')}",
        fmt(last.get("loss"), ".3f"), fmt(vals[-1] if vals else None, ".3f"), str(healthy),
        fmt(last.get("tokens_per_sec"), ".0f"), fmt(last.get("bytes_per_step"), ",.0f"),
    )
    return t


def run_demo(*, clients: int = 3, steps: int = 40, out: Path = Path("runs/demo"), port: int | None = None,
             config: Path | None = None, timeout: float = 1800.0, console: Console | None = None) -> int:
    """Run the whole local network; returns the process exit code (0 when the run Finished).

    Raises :class:`~psyche.config.ConfigError` before creating anything if ``config`` is not a valid run config."""
    from psyche.data import ensure_default_dataset, not_built_yet

    console = console or Console()
    if port is not None and (problem := port_problem("127.0.0.1", port)):
        console.print(f"[red]error:[/] {problem}; pass another --port, or none to use a free one")
        return 1
    base = load_config(config or DEFAULT_CONFIG)
    location = base.data_location()  # a folder written in the config file is relative to that file
    if not_built_yet(location):
        location = str(ensure_default_dataset(location).resolve())
    cfg = demo_config(base, clients=clients, steps=steps, data_location=str(Path(location).resolve()) if Path(location).exists() else location)
    out = out.resolve()
    for sub in ("keys", "logs", "profiles"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "run.toml").write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    db = out / "run.sqlite"
    if db.exists():
        db.unlink()  # a demo starts a fresh run; `psyche server` keeps databases for restarts
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    ckpt = out / "checkpoint"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Several processes on 2 cores: one torch thread each keeps them from fighting.
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = Processes()
    try:
        server = procs.start("server", ["server", "--config", str(out / "run.toml"), "--db", str(db), "--port", str(port),
                                        "--key", str(out / "keys" / "server.key")], out / "logs" / "server.log", env)
        if not _wait_http(url + "/healthz", 60, server):
            console.print(f"[red]the coordinator server did not start[/]; its log: {out / 'logs' / 'server.log'}")
            return 1
        console.print(f"coordinator server at [bold]{url}[/] (dashboard: {url}/)")
        for i in range(clients):
            procs.start(f"client-{i}", ["client", "--server", url, "--run-id", cfg.run_id,
                                         "--key", str(out / "keys" / f"client-{i}.key"),
                                         "--checkpoint-dir", str(ckpt),
                                         "--profile", str(out / "profiles" / f"client-{i}.json")],
                        out / "logs" / f"client-{i}.log", env)
        status = _follow(url, cfg.run_id, procs, console, timeout)
    finally:
        procs.stop_all()
    if status is None or status.get("state") != "Finished":
        console.print("[red]the run did not finish[/]; logs are in " + str(out / "logs"))
        return 1
    n = write_metrics(status, out / "metrics.jsonl")
    console.print(f"finished {steps_done(status)} steps; {n} metric rows in {out / 'metrics.jsonl'}")
    if summary := run_summary_line(status):
        console.print(summary, highlight=False)
    if not (ckpt / "config.json").exists():
        console.print(f"[red]no checkpoint was written to {ckpt}[/]")
        return 1
    console.print(f"checkpoint: [bold]{ckpt}[/]  (try: psyche generate --checkpoint {ckpt} --prompt 'The')")
    console.print(f"serve it over the OpenAI API: psyche serve --checkpoint {ckpt}", highlight=False)
    return 0


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bool:
    """Wait until ``url`` answers 200 (True), or ``proc`` serving it exits or the time is up (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def _follow(url: str, run_id: str, procs: Processes, console: Console, timeout: float) -> dict | None:
    deadline = time.time() + timeout
    status: dict | None = None
    try:
        with Live(console=console, refresh_per_second=2) as live:
            while time.time() < deadline:
                try:
                    status = httpx.get(f"{url}/api/runs/{run_id}", timeout=5).json()
                    live.update(_progress_table(status, url))
                except (httpx.TransportError, ValueError):
                    pass
                if status and status.get("state") == "Finished":
                    # Give the checkpointing client a moment to finish writing.
                    _wait_clients(procs, 60)
                    return status
                if failed := procs.failed():
                    console.print(f"[red]process(es) exited with errors: {failed}[/]")
                    return status
                time.sleep(0.5)
    finally:
        if not console.is_terminal:
            console.line()  # rich leaves the last frame of a Live without a line end when not on a terminal
    console.print(f"[red]timed out after {timeout:.0f}s[/]")
    return status


def _wait_clients(procs: Processes, timeout: float) -> None:
    deadline = time.time() + timeout
    for name, p in procs.procs:
        if name.startswith("client"):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
