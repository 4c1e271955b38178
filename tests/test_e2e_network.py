"""Whole runs across separate processes: a coordinator server and real clients.

Each client is its own process with its own iroh endpoint, training a real small
LLaMA on the fortunes corpus; nothing is mocked. These tests take about a minute
each on a 2-core machine.
"""

from __future__ import annotations

import re
import signal

import msgspec
import pytest

from tests.netutil import Serve


pytestmark = pytest.mark.e2e


# States are polled every fraction of a second by a process that may be starved of CPU,
# so a wait never hangs on catching one short state: a round is either of its two halves,
# and "training has started" is any state past warmup.
IN_ROUND = ("RoundTrain", "RoundWitness")
BEFORE_TRAINING = ("Uninitialized", "WaitingForMembers", "Warmup")


def history_steps(status: dict) -> list[int]:
    return [h["step"] for h in status["history"]]


def test_three_clients_train_to_finished_and_checkpoint_loads(network):
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psyche.ledger.envelope import SignedRequest, sign_request
    from psyche.identity import Identity

    # A cooldown with room to spare: the checkpointer saves and reports within it on a loaded CI machine.
    net = network("e2e-full", total_steps=10, cooldown_time=8)
    net.start_server()
    # Someone serving the run's model over the OpenAI API while it trains (psyche serve --follow).
    serve = Serve("--follow", net.url, "--poll", "0.5", log=net.root / "logs" / "serve.log")
    net.procs["serve"] = serve.proc  # stopped with the run's processes whatever happens
    for i in range(3):
        net.start_client(i)
    net.wait_state(lambda s: s["state"] not in BEFORE_TRAINING, 120, "training to start")
    assert serve.models() == []  # nothing published yet: nothing to serve, and a request says so
    assert httpx.post(serve.url + "/v1/completions", json={"prompt": "The"}).json()["error"]["code"] == \
        "model_not_loaded"

    # Garbage and a forged signature are refused and change nothing.
    before = net.status()["digest"]
    url = f"{net.url}/api/runs/{net.cfg.run_id}/instructions"
    assert httpx.post(url, content=b"\x93garbage").status_code == 400
    member = Identity.load(net.root / "client-0.key")
    mallory = Identity.generate()
    from psyche.coordinator import Withdraw, encode_instruction

    req = msgspec.msgpack.decode(sign_request(mallory, net.cfg.run_id, "instruction", encode_instruction(Withdraw())),
                                 type=SignedRequest)
    forged = msgspec.msgpack.encode(msgspec.structs.replace(req, signer=member.public_key))
    r = httpx.post(url, content=forged)
    assert r.status_code == 400 and "signature" in r.json()["message"]
    assert net.status()["clients"][0]["state"] == "Healthy"
    del before

    final = net.wait_state(lambda s: s["state"] == "Finished", 300, "the run to finish")
    for i in range(3):
        net.procs[f"client-{i}"].wait(60)
        assert net.procs[f"client-{i}"].returncode == 0, net.log(f"client-{i}")
    assert history_steps(final) == list(range(1, 11))
    vals = [h["val_loss"] for h in final["history"] if h.get("val_loss") is not None]
    assert len(vals) >= 2 and vals[-1] < vals[0] - 0.05, vals
    assert all(h["clients"] == 3 for h in final["history"])
    assert final["checkpoints"], "no checkpoint recorded:\n" + "\n".join(net.log(f"client-{i}") for i in range(3))
    ckpt = net.root / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok("The", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()
    # The server following the run serves the checkpoint the run recorded, and says so.
    last = max(c["step"] for c in final["checkpoints"])
    net.wait(lambda: bool(serve.models()) and serve.models()[0]["psyche"]["step"] == last, 60,
             f"psyche serve --follow to load the checkpoint of step {last}")
    card = serve.models()[0]
    assert card["id"] == net.cfg.run_id and card["psyche"]["run_id"] == net.cfg.run_id
    answer = serve.client.completions.create(model=net.cfg.run_id, prompt="The", max_tokens=8)
    assert answer.system_fingerprint == f"psyche-step-{last}" and answer.usage.completion_tokens > 0
    serve.stop()
    assert "Traceback" not in serve.log.read_text()
    # All clients were healthy all epoch: each is paid by the tokens it trained and had accepted,
    # and together they share the whole epoch's reward (less integer rounding).
    pts = {c["id"]: c["points"] for c in final["accounts"]}
    reward = net.cfg.coordinator.epoch_reward
    assert all(v > 0 for v in pts.values()) and reward - len(pts) <= sum(pts.values()) <= reward, pts


def test_killed_client_is_dropped_and_rejoins_with_model_from_peers(network):
    # Epochs end by the clock, so the run is made too long to finish during the test: the
    # rejoin then happens however fast this machine trains.
    net = network("e2e-kill", total_steps=100_000, epoch_time=12, warmup_time=6, max_round_train_time=8,
                  min_clients=2)
    net.start_server()
    for i in range(3):
        net.start_client(i)
    s = net.wait_state(lambda s: s["state"] in IN_ROUND and s["step"] >= 3, 180, "step 3")
    victim = net.client_id(2)
    net.kill("client-2")
    step_at_kill = s["step"]
    # The run goes on without it: it is dropped (accused, or an idle witness) ...
    s = net.wait_state(lambda s: any(c["id"] == victim and c["state"] == "Dropped" for c in s["clients"]),
                       120, "client-2 to be dropped")
    epoch_killed = s["epoch"]
    points_when_dropped = {a["id"]: a["points"] for a in s["accounts"]}[victim]
    net.wait_state(lambda s: s["step"] >= step_at_kill + 1, 120, "the run to go on without client-2")
    # It earns nothing for the epoch it was dropped in.
    after = net.wait_state(lambda s: s["epoch"] > epoch_killed, 120, "the epoch to end")
    assert {a["id"]: a["points"] for a in after["accounts"]}[victim] == points_when_dropped
    # ... and it rejoins at a later epoch, fetching the model from its peers, and trains.
    net.start_client(2, "--max-download-rate", "50M", "--max-upload-rate", "20MiB/s")  # caps it shows, not feels
    net.wait_state(lambda s: s["epoch"] > epoch_killed and any(
        c["id"] == victim and c["state"] == "Healthy" for c in s["clients"]) and s["state"] not in BEFORE_TRAINING,
        180, "client-2 to rejoin")
    net.wait(lambda: "model fetched from" in net.log("client-2"), 60, "client-2 to fetch the model from peers")
    net.wait(lambda: ": trained samples" in net.log("client-2", tail=1_000_000).rsplit("model fetched from", 1)[-1], 120,
             "client-2 to train with the fetched model")
    assert "downloads ≤ 50.00 MB/s" in " ".join(net.log("client-2", tail=1_000_000).split())  # rich wraps lines
    now = net.wait_state(lambda s: not any(c["state"] == "Dropped" for c in s["clients"]) and any(
        c["id"] == victim and c["download_limit"] == 50e6 and c["upload_limit"] == 20 * 2**20 for c in s["clients"]),
        120, "every member healthy, and client-2's caps in the status")
    steps = history_steps(now)
    assert steps == sorted(set(steps)), "no step is reported twice"
    pts = {c["id"]: c["points"] for c in now["accounts"]}
    assert pts[victim] <= min(v for k, v in pts.items() if k != victim)


def test_server_restart_continues_the_run(network):
    net = network("e2e-restart", total_steps=40)
    net.start_server()
    for i in range(3):
        net.start_client(i)
    s = net.wait_state(lambda s: s["state"] in IN_ROUND and s["step"] >= 4, 180, "step 4")
    step_before = s["step"]
    net.kill("server")
    net.start_server()  # same database, same port
    after = net.status()
    assert after["step"] >= step_before, "the restarted server resumed where it was"
    net.wait_state(lambda s: s["step"] >= after["step"] + 2, 120, "training to go on after the restart")
    # Ctrl-C on a client withdraws it cleanly; the other two finish the run.
    quitter = net.client_id(2)
    quitting = net.procs.pop("client-2")
    quitting.send_signal(signal.SIGINT)
    assert quitting.wait(30) == 130
    assert "withdrew from the run" in net.log("client-2")
    net.wait_state(lambda s: any(c["id"] == quitter and c["state"] == "Withdrawn" for c in s["clients"])
                   or s["state"] == "Finished", 60, "client-2 to be Withdrawn")
    final = net.wait_state(lambda s: s["state"] == "Finished", 300, "the run to finish after the restart")
    assert history_steps(final) == list(range(1, 41)), "no step lost or repeated"
    for i in range(2):
        net.procs[f"client-{i}"].wait(60)
        assert net.procs[f"client-{i}"].returncode == 0, net.log(f"client-{i}")


def test_pause_and_resume_with_live_clients(network):
    import subprocess
    import sys

    # Enough steps that the pause lands mid-run even on a loaded machine.
    net = network("e2e-pause", total_steps=40, cold_start_warmup_steps=3)
    net.start_server()
    for i in range(3):
        net.start_client(i)
    net.wait_state(lambda s: s["state"] in IN_ROUND and s["step"] >= 3, 180, "step 3")

    def authority(cmd: str) -> None:
        done = subprocess.run([sys.executable, "-m", "psyche.cli", cmd, "--server", net.url,
                               "--key", str(net.root / "server.key")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    authority("pause")
    paused = net.wait_state(lambda s: s["state"] == "Paused", 120, "the run to pause")
    step_paused = paused["step"]
    authority("resume")
    final = net.wait_state(lambda s: s["state"] == "Finished", 300, "the run to finish after the resume")
    assert history_steps(final) == list(range(1, 41)), "no step lost or repeated across the pause"
    assert final["step"] >= step_paused
    for i in range(3):
        net.procs[f"client-{i}"].wait(60)
        assert net.procs[f"client-{i}"].returncode == 0, net.log(f"client-{i}")
        # Everyone kept its weights through the pause: the model was built once.
        assert net.log(f"client-{i}", tail=100_000).count("model initialised") == 1


# Two processes with one key: tests/test_newcomer_client.py (the live node keeps it).


def test_a_client_publishing_negated_results_is_condemned_and_never_applied(network):
    """Five real client processes; client 4 trains honestly but publishes its results negated
    (``python -m psyche.testing.adversaries negate client ...``). Its verifiers condemn its first
    result: nobody applies it, it is dropped, the run finishes, and the honest four end with
    bit-identical weights."""
    steps = 6
    net = network("e2e-cheat", total_steps=steps, init_min_clients=5, min_clients=3,
                  global_batch_size_start=20, global_batch_size_end=20)
    net.start_server()
    for i in range(4):
        net.start_client(i)
    net.start_client(4, cheat="negate")
    net.wait(lambda: (net.root / "client-4.key").exists(), 60, "the cheat's key")
    cheat = net.client_id(4)
    seen: dict = {}

    def condemned(s: dict) -> bool:
        row = next((c for c in s["clients"] if c["id"] == cheat), None)
        if row is not None and row["condemned_step"] is not None:
            seen.update(row=row, witness=s["witness_rounds"])
        return bool(seen)

    net.wait_state(condemned, 300, "the cheat to be condemned")
    row = seen["row"]
    assert row["state"] == "Dropped" and row["accepted_tokens"] == 0 and row["suspicion"] <= -500, row
    # Its first result was the one condemned: none of its results was ever applied.
    first = min(int(m) for m in re.findall(r"step (\d+): trained samples", net.log("client-4", 200_000)))
    assert row["condemned_step"] == first, (row, first)
    final = net.wait_state(lambda s: s["state"] == "Finished", 300, "the run to finish")
    assert [h["step"] for h in final["history"]] == list(range(1, steps + 1))
    assert sum(r["condemned"] for r in final["witness_rounds"]) == 1
    honest = [c for c in final["clients"] if c["id"] != cheat]
    assert all(c["state"] == "Healthy" and c["condemned_step"] is None for c in honest), honest
    for i in range(4):
        assert net.wait_exit(f"client-{i}", 120) == 0, net.log(f"client-{i}")
    profiles = [net.profile(i) for i in range(4)]
    assert {p["applied_step"] for p in profiles} == {steps}
    assert len({p["weights_sha256"] for p in profiles}) == 1
    assert "verification condemned its result" in net.log("client-4", 200_000)
