"""A whole run coordinated only through the chain: `psyche localnet`, no coordinator server.

Three client processes send their instructions as Solana transactions and each
rebuilds the run state by replaying the chain; their final digests must equal the
one `psyche solana state` computes independently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import tomli_w

from psyche.data import ensure_default_dataset
from tests.netutil import ROOT, Serve, small_config

pytestmark = pytest.mark.e2e
PSYCHE = [sys.executable, "-m", "psyche.cli"]


def test_three_clients_on_localnet_agree_on_the_final_state(tmp_path):
    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    cfg = small_config("sol-e2e", data=data, total_steps=6, warmup_time=30, round_witness_time=2)
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    localnet = subprocess.Popen([*PSYCHE, "localnet", "--port", "0", "--slot-ms", "100"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
    clients: list[subprocess.Popen] = []
    serve: Serve | None = None
    try:
        line = localnet.stdout.readline()
        assert "RPC http://" in line, line
        rpc = line.split("RPC ", 1)[1].split()[0]
        made = subprocess.run([*PSYCHE, "solana", "create-run", "--config", str(config), "--rpc", rpc,
                               "--keypair", str(tmp_path / "authority.key")], capture_output=True, text=True,
                              timeout=120, env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        # Someone serving the run's model while it trains, reading the run from the chain alone.
        serve = Serve("--follow-solana", rpc, "--run-id", cfg.run_id, "--poll", "1", log=tmp_path / "serve.log")
        logs = [tmp_path / f"client-{i}.log" for i in range(3)]
        for i, log in enumerate(logs):
            clients.append(subprocess.Popen(
                [*PSYCHE, "client", "--solana", rpc, "--run-id", cfg.run_id, "--config", str(config),
                 "--key", str(tmp_path / f"client-{i}.key"), "--checkpoint-dir", str(tmp_path / "ckpt")],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        for i, proc in enumerate(clients):
            assert proc.wait(timeout=400) == 0, logs[i].read_text()[-3000:]
        digests = set()
        for log in logs:
            text = " ".join(log.read_text().split())
            found = re.findall(r"final state digest ([0-9a-f]{64})", text)
            assert found, text[-2000:]
            digests.add(found[-1])
        state = subprocess.run([*PSYCHE, "solana", "state", "--run-id", cfg.run_id, "--rpc", rpc],
                               capture_output=True, text=True, timeout=120, env=env)
        assert state.returncode == 0, state.stdout + state.stderr
        outside = re.search(r"digest: ([0-9a-f]{64})", state.stdout).group(1)
        assert digests == {outside}
        assert "Finished" in state.stdout and "verified: True" in state.stdout
        assert (tmp_path / "ckpt" / "config.json").exists()
        written = [int(n) for log in logs
                   for n in re.findall(r"checkpoint after step (\d+) written", " ".join(log.read_text().split()))]
        assert written, "a checkpointer wrote the run's checkpoint"
        last = max(written)
        deadline = time.time() + 60
        while time.time() < deadline and not (serve.models() and serve.models()[0]["psyche"]["step"] == last):
            time.sleep(0.5)
        assert serve.models(), serve.log.read_text()
        card = serve.models()[0]
        assert card["psyche"] == {**card["psyche"], "run_id": cfg.run_id, "step": last}, serve.log.read_text()
        answer = serve.client.completions.create(model=card["id"], prompt="The", max_tokens=4)
        assert answer.system_fingerprint == f"psyche-step-{card['psyche']['step']}"
    finally:
        if serve is not None:
            serve.stop()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        localnet.terminate()
        localnet.wait(timeout=10)
