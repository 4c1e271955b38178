"""A real run as separate processes: a coordinator server and clients, on loopback or on a testbed.

:class:`Network` starts ``psyche server`` and ``psyche client`` processes (nothing
mocked) and watches the run through the server's status API. On loopback every
process is on 127.0.0.1; with ``bed`` (a :class:`psyche.testbed.Testbed` holding a
node ``server`` with a control link and nodes ``c0``, ``c1``, ...) each process runs
on its node, behind that node's shaped link and CPU share, and the driver reaches
the server over the control link.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from psyche.config import RunConfig, parse_config
from psyche.localports import free_port
from psyche.testbed import Testbed

SERVER_PORT = 8000
"""The server's port on a testbed (its node is its own host)."""


def small_config(name: str, *, data: Path, model: dict | None = None, **coordinator: Any) -> RunConfig:
    """A CPU-quick run: a ~0.6M-parameter LLaMA on the fortunes token folder (``model`` overrides its shape)."""
    # Cooldown: the clock counts whole seconds, so 4 s gives the checkpointer 3 to 4 s to save.
    c = dict(warmup_time=20, cooldown_time=4, max_round_train_time=20, round_witness_time=3, epoch_time=600,
             total_steps=10, init_min_clients=3, min_clients=2, witness_nodes=0, global_batch_size_start=12,
             global_batch_size_end=12, waiting_for_members_extra_time=1, checkpointers=1)
    c.update(coordinator)
    shape = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "seq_len": 64}
    shape.update(model or {})
    return parse_config({
        "name": name,
        "coordinator": c,
        "model": shape,
        "data": {"location": str(data)},
        "lr": {"kind": "constant", "peak_lr": 3e-3, "warmup_steps": 0, "final_lr": 3e-3},
        "optimizer": {"micro_batch_size": 4},
    })


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (its children too), or to ``proc`` alone when
    it leads no group of its own; a process already gone is left alone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def healthy(url: str) -> bool:
    """Whether a psyche server answers ``GET /healthz`` at ``url`` now."""
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_serving(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Wait until the server ``proc`` started answers at ``url`` (True), or it exited or
    ``timeout`` seconds passed (False)."""
    deadline = time.time() + timeout
    while not healthy(url):
        if time.time() > deadline or proc.poll() is not None:
            return False
        time.sleep(0.2)
    return True


def client_node(i: int) -> str:
    """The testbed node that client ``i`` runs on."""
    return f"c{i}"


@dataclass
class Network:
    """A server and clients started as separate processes under ``root`` (on ``bed`` if given)."""

    root: Path
    cfg: RunConfig
    bed: Testbed | None = None
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = SERVER_PORT if self.bed is not None else free_port()

    @property
    def url(self) -> str:
        """Where this driver reaches the server."""
        host = self.bed.control_ip("server") if self.bed is not None else "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def client_url(self) -> str:
        """Where the clients reach the server (across the testbed's links)."""
        host = self.bed.ip("server") if self.bed is not None else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _spawn(self, name: str, args: list[str], *, node: str = "server",
               program: tuple[str, ...] = ("psyche.cli",)) -> subprocess.Popen:
        """Start ``psyche ARGS`` as process ``name`` (on testbed node ``node``), logging to ``logs/NAME.log``.
        ``program``: the module (and its own leading arguments) that runs ``ARGS``."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        log = self.root / "logs" / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        argv = [sys.executable, "-m", *program, *args]
        if self.bed is not None:
            proc = self.bed.spawn(node, argv, log=log, env=env)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_server(self, *extra: str, wait: float = 60) -> None:
        """Start (or restart, on the same database) the coordinator server and wait until it answers.
        ``extra``: more ``psyche server`` options (``--inference-url URL``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "run.toml"
        cfg_path.write_text(tomli_w.dumps(self.cfg.model_dump(mode="json", exclude_none=True)))
        host = "0.0.0.0" if self.bed is not None else "127.0.0.1"
        self._spawn("server", ["server", "--config", str(cfg_path), "--db", str(self.root / "run.sqlite"),
                               "--port", str(self.port), "--host", host, "--key", str(self.root / "server.key"), *extra])
        self.wait(lambda: healthy(self.url), wait, "server up")

    def start_client(self, i: int, *extra: str, cheat: str | None = None) -> None:
        """Start client ``i`` (key ``client-i.key``; its profile is written to ``profiles/client-i.json`` on exit).
        ``cheat``: a kind of :mod:`psyche.testing.adversaries` whose client publishes results that way."""
        bind = [] if self.bed is None else ["--bind", f"{self.bed.ip(client_node(i))}:0"]
        program = ("psyche.cli",) if cheat is None else ("psyche.testing.adversaries", cheat)
        self._spawn(f"client-{i}", [
            "client", "--server", self.client_url, "--key", str(self.root / f"client-{i}.key"),
            "--checkpoint-dir", str(self.root / "checkpoint"), "--profile", str(self.profile_path(i)), *bind, *extra],
            node=client_node(i), program=program)

    def profile_path(self, i: int) -> Path:
        return self.root / "profiles" / f"client-{i}.json"

    def profile(self, i: int) -> dict:
        """What client ``i`` wrote on exit (``psyche client --profile``)."""
        return json.loads(self.profile_path(i).read_text())

    def kill(self, name: str) -> None:
        """SIGKILL a process (and forget it, so waits do not count it as a failure)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def status(self) -> dict:
        """The run's status document (the server's status API)."""
        return httpx.get(f"{self.url}/api/runs/{self.cfg.run_id}", timeout=10).json()

    def try_status(self) -> dict | None:
        """:meth:`status`, or None while the server does not answer."""
        try:
            return self.status()
        except (httpx.TransportError, ValueError):
            return None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.3) -> None:
        """Poll ``predicate`` every ``every`` seconds until true; fail (with every log) if a process
        errors out or time is up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            for name, p in self.procs.items():
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.log(name)}")
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {self.try_status()}\n"
                             + "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs))

    def wait_state(self, predicate: Callable[[dict], bool], timeout: float, what: str, *,
                   every: float = 0.3) -> dict:
        """Poll the status every ``every`` seconds until ``predicate(status)``; return that status."""
        box: dict = {}

        def check() -> bool:
            s = self.try_status()
            if s is not None and predicate(s):
                box["s"] = s
                return True
            return False

        self.wait(check, timeout, what, every=every)
        return box["s"]

    def run_to_end(self, clients: int, *, timeout: float, every: float = 1.0,
                   watch: Callable[[dict], None] | None = None) -> dict:
        """Start the server and clients ``0 .. clients-1``, poll the status every ``every`` seconds
        (``watch`` sees each) until the run is Finished, wait for the clients to exit; return the
        status then (the server still runs: :meth:`stop` it)."""
        self.start_server()
        for i in range(clients):
            self.start_client(i)

        def finished(s: dict) -> bool:
            if watch is not None:
                watch(s)
            return s["state"] == "Finished"

        self.wait_state(finished, timeout, "the run to finish", every=every)
        for i in range(clients):
            self.wait_exit(f"client-{i}", 120)
        return self.status()

    def wait_exit(self, name: str, timeout: float = 60) -> int:
        """Wait for process ``name`` to exit; return its exit code."""
        return self.procs[name].wait(timeout)

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def client_id(self, i: int) -> str:
        from psyche.identity import Identity

        return Identity.load(self.root / f"client-{i}.key").public_key.hex()

    def stop(self) -> None:
        """SIGINT every process still running, then SIGKILL what has not exited after 10 s."""
        for p in self.procs.values():
            if p.poll() is None:
                _signal(p, signal.SIGINT)
        deadline = time.time() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()
