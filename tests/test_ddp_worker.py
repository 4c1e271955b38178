"""The DDP baseline worker: two ranks on loopback train in lockstep and end with the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import tomli_w

from psyche.localports import free_port
from tests.netutil import ROOT, small_config


def test_two_ranks_train_and_agree(tmp_path: Path, data_dir: Path) -> None:
    cfg = small_config("ddp-baseline", data=data_dir)
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "psyche.testing.ddp_worker", "--config", str(cfg_path), "--rank", str(rank),
             "--world", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--steps", "3",
             "--out", str(tmp_path / f"rank{rank}.json"), "--weights-digest"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    try:
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = "\n".join(f"--- rank {r}\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}" for r in range(2))
    assert codes == [0, 0], logs

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in reports)
    assert reports[0]["params"] == reports[1]["params"] > 0
    for r in reports:
        assert len(r["step_s"]) == len(r["local_s"]) == len(r["loss"]) == 3
        assert r["warmup"] == [True, False, False]
        assert all(math.isfinite(x) for x in r["loss"])
        assert all(0 < local <= step for local, step in zip(r["local_s"], r["step_s"]))
    # Different shares give different local losses, yet the averaged update leaves equal weights.
    assert reports[0]["loss"] != reports[1]["loss"]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]


def test_batch_not_divisible_by_world_is_one_line(tmp_path: Path, data_dir: Path) -> None:
    cfg = small_config("ddp-baseline", data=data_dir)  # global batch 12
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    r = subprocess.run([sys.executable, "-m", "psyche.testing.ddp_worker", "--config", str(cfg_path), "--rank", "0",
                        "--world", "5", "--master-addr", "127.0.0.1", "--master-port", "1", "--steps", "1",
                        "--out", str(tmp_path / "x.json")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "divisible by --world (5)" in r.stderr
