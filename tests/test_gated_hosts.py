"""Gated runs on the two remote hosts (issue 17): the server, driven by `psyche authorize` /
`psyche revoke`, and Solana, where the rule is the replay's. An ungranted key is refused, a
granted one joins; the rule is the coordinator's (tests/test_coordinator_access.py), so both
hosts enforce it alike."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from psyche.cli import app as cli_app
from psyche.config import parse_config
from psyche.coordinator import Authorize, CoordinatorSettings, Join, encode_instruction
from psyche.demo import free_port
from psyche.identity import Identity
from psyche.ledger.envelope import sign_request
from psyche.ledger.server import CoordinatorServer, create_app
from psyche.ledger.store import Store

CFG = parse_config({
    "name": "gated",
    "coordinator": {"init_min_clients": 2, "min_clients": 1, "total_steps": 5, "access": "gated",
                    "global_batch_size_start": 4, "global_batch_size_end": 4},
    "lr": {"warmup_steps": 1},
})


def post_join(client: TestClient, ident: Identity):
    body = sign_request(ident, "gated", "instruction", encode_instruction(Join(p2p_address="addr")))
    return client.post("/api/runs/gated/instructions", content=body)


def test_a_gated_server_run_takes_granted_keys_only(tmp_path):
    authority, member, deputy, newcomer, stranger = (Identity.generate() for _ in range(5))
    keys = {}
    for name, ident in (("server", authority), ("deputy", deputy), ("stranger", stranger)):
        keys[name] = tmp_path / f"{name}.key"
        ident.save(keys[name])
    server = CoordinatorServer(Store(tmp_path / "run.sqlite"), host_key=authority.public_key, tick_interval=0.05)
    server.create_run(CFG, authority.public_key)
    state = lambda: server.hosts["gated"].coordinator.state  # noqa: E731
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    runner = CliRunner()
    try:
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        cli = lambda *args: runner.invoke(cli_app, [*args, "--server", url])  # noqa: E731
        with TestClient(create_app(server)) as client:
            refused = post_join(client, member)
            assert refused.status_code == 409 and refused.json()["error"] == "Unauthorized"
            assert "psyche authorize" in refused.json()["message"]
            # Only the authority grants; a grant lets the key in.
            no = cli("authorize", member.public_key.hex(), "--key", str(keys["stranger"]))
            assert no.exit_code == 1 and "Unauthorized" in no.output
            ok = cli("authorize", member.public_key.hex(), "--key", str(keys["server"]))
            assert ok.exit_code == 0 and "may join without end" in ok.output, ok.output
            assert post_join(client, member).status_code == 200
            # A deputy grants for a term no longer than its own, and must give one.
            ok = cli("authorize", str(keys["deputy"]), "--authorizer", "--expires", "1d", "--key", str(keys["server"]))
            assert ok.exit_code == 0, ok.output
            no = cli("authorize", newcomer.public_key.hex(), "--key", str(keys["deputy"]))
            assert no.exit_code == 1 and "must expire" in no.output
            ok = cli("authorize", newcomer.public_key.hex(), "--expires", "2h", "--key", str(keys["deputy"]))
            assert ok.exit_code == 0, ok.output
            assert post_join(client, newcomer).status_code == 200
            assert post_join(client, stranger).status_code == 409
            # The status shows the gate and its grants; a revoked key leaves the waiting list.
            status = client.get("/api/runs/gated").json()
            assert status["access"] == "gated"
            assert {g["id"] for g in status["grants"]} == {member.public_key.hex(), newcomer.public_key.hex()}
            assert [a["id"] for a in status["authorizers"]] == [deputy.public_key.hex()]
            assert all(g["expires_at"] for g in status["authorizers"])
            ok = cli("revoke", member.public_key.hex(), "--key", str(keys["server"]))
            assert ok.exit_code == 0, ok.output
            assert state().pending == [newcomer.public_key]
            bad = cli("authorize", "not-a-key", "--key", str(keys["server"]))
            assert bad.exit_code == 1 and "64 hex digits" in bad.output
            bad = cli("authorize", member.public_key.hex(), "--expires", "soon", "--key", str(keys["server"]))
            assert bad.exit_code == 1 and "--expires" in bad.output
    finally:
        uv.should_exit = True
        thread.join(10)


def test_a_gated_solana_run_takes_granted_keys_only():
    pytest.importorskip("solders")
    from solders.keypair import Keypair

    from psyche.ledger.base import InstructionRefused
    from psyche.ledger.solana.chain import SvmChain
    from psyche.ledger.solana.ledger import RunSync, SolanaLedger, create_run

    run = asyncio.run
    chain = SvmChain()
    authority, member, stranger = Keypair(), Keypair(), Keypair()
    for kp in (authority, member, stranger):
        run(chain.airdrop(kp.pubkey(), 10**10))
    settings = CoordinatorSettings(init_min_clients=2, min_clients=1, access="gated")
    run(create_run(chain, authority, "gated-sol", settings))
    as_member = SolanaLedger(chain, "gated-sol", member, auto_tick=False)
    as_authority = SolanaLedger(chain, "gated-sol", authority, auto_tick=False)
    as_stranger = SolanaLedger(chain, "gated-sol", stranger, auto_tick=False)
    with pytest.raises(InstructionRefused) as refused:
        run(as_member.submit(Join(p2p_address="m")))
    assert refused.value.error == "Unauthorized"
    with pytest.raises(InstructionRefused):
        run(as_stranger.submit(Authorize(key=bytes(stranger.pubkey()))))
    run(as_authority.submit(Authorize(key=bytes(member.pubkey()))))
    run(as_member.submit(Join(p2p_address="m")))
    # Anyone replaying the chain sees the same gate: the member waits, the stranger does not.
    sync = RunSync(chain, "gated-sol")
    assert run(sync.verify()) is True
    coord = sync.replay.coordinator
    assert coord.state.pending == [bytes(member.pubkey())]
    assert not coord.is_member(bytes(stranger.pubkey()))


def test_doctor_says_whether_this_key_may_join_a_gated_run(tmp_path):
    from psyche.coordinator import Coordinator
    from psyche.doctor import check_access

    authority, me = Identity.generate(), Identity.generate()
    key = tmp_path / "client.key"
    me.save(key)
    coord = Coordinator.new("gated", CFG, authority=authority.public_key, now=0)
    [finding] = check_access(coord.state, key)
    assert finding.status == "FAIL" and f"psyche authorize {me.public_key.hex()}" in finding.detail
    assert coord.apply(Authorize(key=me.public_key), authority.public_key, 1, bytes(32)) is None
    [finding] = check_access(coord.state, key)
    assert finding.status == "ok"
    open_run = Coordinator.new("open", parse_config({"name": "open", "lr": {"warmup_steps": 1}}),
                               authority=authority.public_key, now=0)
    assert check_access(open_run.state, key) == []
