"""One step convention wherever a person reads a step number.

Step ``k`` is the ``k``-th optimizer update (from 1), and the step a run "is at" is the
number of steps completed: 0 before any training, ``total_steps`` once finished. Checked
on ``psyche train`` (its output, metrics.jsonl and checkpoint, across a resume) and on
the coordinator server (``/metrics`` and the line it logs when it resumes a stored run).
The dashboard's side is checked in a real browser by tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from fastapi.testclient import TestClient

from psyche.config import parse_config
from psyche.coordinator import Coordinator, RunState, apply_entry
from psyche.data import tokenize_corpus
from psyche.ledger.server import CoordinatorServer, create_app
from psyche.ledger.store import Store
from psyche.testing.coordinator_swarm import Swarm
from psyche.train.schedule import lr_at

# --- psyche train ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("steps")
    rng = np.random.default_rng(2)
    words = "one two three four five six seven eight nine ten".split()
    (root / "corpus.txt").write_text("\n%\n".join(" ".join(rng.choice(words, int(rng.integers(5, 25))))
                                                for _ in range(300)))
    tokenize_corpus(corpus=[root / "corpus.txt"], vocab_size=280, out_dir=root / "tok", progress=False)
    return root / "tok"


def train_config(tmp_path: Path, tokens: Path) -> tuple[Path, object]:
    cfg = {"name": "steps-test",
           "coordinator": {"total_steps": 4, "global_batch_size_start": 4, "global_batch_size_end": 4},
           "model": {"vocab_size": 280, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "seq_len": 16},
           "data": {"location": str(tokens)},
           "lr": {"kind": "cosine", "warmup_steps": 2, "peak_lr": 3e-3, "final_lr": 3e-4},
           "optimizer": {"kind": "adamw", "micro_batch_size": 2}}
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path, parse_config(cfg)


def psyche(*args) -> tuple[int, list[str]]:
    """Run the real ``psyche`` command; its exit code and its output lines (stdout + stderr)."""
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "psyche.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_numbers_its_steps_from_1_and_resumes_with_the_next(tmp_path, tokens):
    config, cfg = train_config(tmp_path, tokens)
    out = tmp_path / "run"
    code, lines = psyche("train", "--config", config, "--out", out, "--eval-every", 2, "--device", "cpu")
    assert code == 0, "\n".join(lines)
    said = [line for line in lines if re.match(r"(val loss (before|after)|step \d+:)", line)]
    assert [s.split(":")[0] for s in said] == ["val loss before training", "step 2", "step 4"], lines
    rows = metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # every 2nd update, and the last
    # Step k is the k-th update: it has the LR the schedule gives the k-th update (lr_at counts from 0).
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(k - 1, cfg.lr, 4) for k in (1, 2, 3, 4)])
    state = json.loads((out / "checkpoint" / "psyche_state.json").read_text())
    assert state["step"] == 4  # steps completed, as a client's checkpoint records it

    # Resuming runs on with step 5 (and the LR of the 5th update), appending to the metrics.
    code, lines = psyche("train", "--config", config, "--out", out, "--steps", 6, "--eval-every", 2,
                         "--resume", out / "checkpoint", "--device", "cpu")
    assert code == 0, "\n".join(lines)
    assert any(", resuming after step 4" in line for line in lines), lines
    said = [line.split(":")[0] for line in lines if re.match(r"(val loss (before|after)|step \d+:)", line)]
    assert said == ["val loss after step 4", "step 6"], lines
    rows = metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[4:]] == pytest.approx([lr_at(k - 1, cfg.lr, 6) for k in (5, 6)])
    assert json.loads((out / "checkpoint" / "psyche_state.json").read_text())["step"] == 6
    assert any(re.fullmatch(rf"val loss [\d.]+ -> [\d.]+; checkpoint written to {re.escape(str(out / 'checkpoint'))}", line)
               for line in lines), lines


# --- the coordinator server ------------------------------------------------------------

RUN_CFG = parse_config({
    "name": "steps-run",
    "coordinator": {"init_min_clients": 3, "min_clients": 2, "witness_nodes": 0, "total_steps": 3,
                    "global_batch_size_start": 6, "global_batch_size_end": 6, "checkpointers": 1,
                    "warmup_time": 10, "cooldown_time": 5, "max_round_train_time": 10, "round_witness_time": 2,
                    "epoch_time": 600, "waiting_for_members_extra_time": 1},
    "lr": {"warmup_steps": 1},
})


def stored_run(db: Path, until) -> Coordinator:
    """Play honest clients on a fresh run until ``until(coordinator)``, and store its log in ``db``
    as a server would have (one entry and snapshot per applied instruction)."""
    run_id = RUN_CFG.run_id
    genesis = Coordinator.new(run_id, RUN_CFG, authority=bytes(32), now=0)
    swarm = Swarm(Coordinator.from_bytes(genesis.to_bytes()))
    swarm.join(range(3))
    swarm.run_until(until)
    store = Store(db)
    store.create_run(run_id, RUN_CFG.model_dump(mode="json"), bytes(32), genesis.to_bytes(), genesis.digest())
    coord = Coordinator.from_bytes(genesis.to_bytes())
    for seq, entry in enumerate(swarm.log, 1):
        assert apply_entry(coord, entry).error is None
        store.append(run_id, seq, signer=entry.signer, body=entry.body, now=entry.now, seed=entry.seed,
                     state=coord.to_bytes(), digest=coord.digest())
    store.close()
    return coord


def scraped_step(server: CoordinatorServer) -> tuple[str, float]:
    """The help line and the value of ``psyche_run_step`` from ``GET /metrics``."""
    text = TestClient(create_app(server)).get("/metrics").text
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP psyche_run_step "))
    value = next(line for line in text.splitlines() if line.startswith("psyche_run_step{"))
    return help_line, float(value.rsplit(" ", 1)[1])


def api_steps(server: CoordinatorServer) -> int:
    """``steps_completed`` of the run in ``GET /api/runs`` (what the dashboard and demo show)."""
    (run,) = TestClient(create_app(server)).get("/api/runs").json()
    return run["steps_completed"]


def resumed_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed run")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_new_run_is_at_step_0(tmp_path, caplog):
    server = CoordinatorServer(Store(tmp_path / "run.sqlite"))
    server.create_run(RUN_CFG, bytes(32))
    help_line, value = scraped_step(server)
    assert value == 0 == api_steps(server)
    assert "completed" in help_line
    server.store.close()
    with caplog.at_level(logging.INFO, logger="psyche"):
        CoordinatorServer(Store(tmp_path / "run.sqlite"))
    assert resumed_line(caplog) == "resumed run steps-run at seq 0 after step 0 of 3 (WaitingForMembers)"


def test_while_step_2_trains_the_run_is_at_step_1(tmp_path, caplog):
    def training_step_2(c: Coordinator) -> bool:
        return c.state.run_state is RunState.RoundTrain and c.state.step == 2

    coord = stored_run(tmp_path / "run.sqlite", training_step_2)
    with caplog.at_level(logging.INFO, logger="psyche"):
        server = CoordinatorServer(Store(tmp_path / "run.sqlite"))
    seq = server.hosts["steps-run"].seq
    assert resumed_line(caplog) == f"resumed run steps-run at seq {seq} after step 1 of 3 (RoundTrain)"
    assert scraped_step(server)[1] == 1 == api_steps(server) and coord.state.step == 2


def test_a_finished_run_is_at_its_last_step(tmp_path, caplog):
    coord = stored_run(tmp_path / "run.sqlite", lambda c: c.state.run_state is RunState.Finished)
    assert coord.state.step == 4  # the coordinator's own count: the round that would come next
    with caplog.at_level(logging.INFO, logger="psyche"):
        server = CoordinatorServer(Store(tmp_path / "run.sqlite"))
    seq = server.hosts["steps-run"].seq
    assert resumed_line(caplog) == f"resumed run steps-run at seq {seq} after step 3 of 3 (Finished)"
    assert scraped_step(server)[1] == 3 == api_steps(server)
