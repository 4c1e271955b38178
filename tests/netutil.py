"""Helpers for end-to-end tests: a real coordinator server and real client processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

from psyche.config import RunConfig, parse_config
from psyche.demo import free_port

ROOT = Path(__file__).resolve().parents[1]


def small_config(name: str, *, data: Path, **coordinator) -> RunConfig:
    """A CPU-quick run: a ~0.6M-parameter LLaMA on the fortunes token folder."""
    # Cooldown: the clock counts whole seconds, so 4 s gives the checkpointer 3 to 4 s to save.
    c = dict(warmup_time=20, cooldown_time=4, max_round_train_time=20, round_witness_time=3, epoch_time=600,
             total_steps=10, init_min_clients=3, min_clients=2, witness_nodes=0, global_batch_size_start=12,
             global_batch_size_end=12, waiting_for_members_extra_time=1, checkpointers=1)
    c.update(coordinator)
    return parse_config({
        "name": name,
        "coordinator": c,
        "model": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "seq_len": 64},
        "data": {"location": str(data)},
        "lr": {"kind": "constant", "peak_lr": 3e-3, "warmup_steps": 0, "final_lr": 3e-3},
        "optimizer": {"micro_batch_size": 4},
    })


@dataclass
class Network:
    """A server and clients started as separate processes under ``root``."""

    root: Path
    cfg: RunConfig
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "logs" / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_server(self) -> None:
        cfg_path = self.root / "run.toml"
        cfg_path.write_text(tomli_w.dumps(self.cfg.model_dump(mode="json", exclude_none=True)))
        self._spawn("server", ["server", "--config", str(cfg_path), "--db", str(self.root / "run.sqlite"),
                               "--port", str(self.port), "--key", str(self.root / "server.key")])
        self.wait(lambda: self._healthy(), 60, "server up")

    def start_client(self, i: int, *extra: str) -> None:
        self._spawn(f"client-{i}", ["client", "--server", self.url, "--key", str(self.root / f"client-{i}.key"),
                                    "--checkpoint-dir", str(self.root / "checkpoint"), *extra])

    def kill(self, name: str) -> None:
        """SIGKILL a process (and forget it, so waits do not count it as a failure)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def status(self) -> dict:
        return httpx.get(f"{self.url}/api/runs/{self.cfg.run_id}", timeout=10).json()

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except (httpx.TransportError, ValueError):
            return None

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            for name, p in self.procs.items():
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.log(name)}")
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {self.try_status()}\n"
                             + "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs))

    def wait_state(self, predicate, timeout: float, what: str) -> dict:
        box: dict = {}

        def check() -> bool:
            s = self.try_status()
            if s is not None and predicate(s):
                box["s"] = s
                return True
            return False

        self.wait(check, timeout, what)
        return box["s"]

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def client_id(self, i: int) -> str:
        from psyche.identity import Identity

        return Identity.load(self.root / f"client-{i}.key").public_key.hex()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
