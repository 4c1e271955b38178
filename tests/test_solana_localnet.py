"""``psyche localnet`` over HTTP in a subprocess: the same client code a real cluster's RPC gets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair

from psyche.coordinator import Join
from psyche.ledger.base import InstructionRefused
from psyche.ledger.solana.chain import ChainRefused, RpcChain
from psyche.ledger.solana.keys import load_keypair
from psyche.ledger.solana.ledger import SolanaLedger, send_instruction
from psyche.ledger.solana.wire import DEFAULT_PROGRAM_ID, run_address

PSYCHE = [sys.executable, "-m", "psyche.cli"]
RUN_TOML = """
name = "onchain"
[coordinator]
warmup_time = 2
cooldown_time = 1
max_round_train_time = 3
round_witness_time = 1
epoch_time = 1000
total_steps = 3
init_min_clients = 2
min_clients = 1
[lr]
warmup_steps = 1
"""


@pytest.fixture(scope="module")
def localnet():
    proc = subprocess.Popen([*PSYCHE, "localnet", "--port", "0", "--slot-ms", "50"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "RPC http://" in line, line + proc.stderr.read()
        yield line.split("RPC ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PSYCHE, *args], capture_output=True, text=True, timeout=120)


def test_run_on_localnet_through_the_cli_and_rpc(localnet: str, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(RUN_TOML)
    authority_key = tmp_path / "authority.key"
    created = cli("solana", "create-run", "--config", str(config), "--rpc", localnet, "--keypair", str(authority_key))
    assert created.returncode == 0, created.stderr
    authority = load_keypair(authority_key)
    assert str(authority.pubkey()) in created.stdout

    async def participate() -> str:
        member = Keypair()
        ledger = SolanaLedger(localnet, "onchain", member, airdrop=True, poll_interval=0.05, auto_tick=False)
        try:
            await ledger.submit(Join(p2p_address="ticket"))
            # Malformed data is refused by the program at preflight, with its error code over JSON-RPC.
            bad = Instruction(DEFAULT_PROGRAM_ID, b"PSY\x01\x09" + bytes(32),
                              [AccountMeta(member.pubkey(), True, False),
                               AccountMeta(run_address("onchain")[0], False, True)])
            with pytest.raises(ChainRefused) as refused:
                await send_instruction(ledger.chain, member, bad)
            assert refused.value.program_error == 5
            with pytest.raises(InstructionRefused) as not_authority:
                from psyche.coordinator import Pause

                await ledger.submit(Pause())
            assert not_authority.value.error == "Unauthorized"
            state = await ledger.state()
            assert state.is_member(bytes(member.pubkey()))
            return state.digest()
        finally:
            await ledger.close()

    digest = asyncio.run(participate())
    shown = cli("solana", "state", "--run-id", "onchain", "--rpc", localnet, "--json")
    assert shown.returncode == 0, shown.stderr
    state = json.loads(shown.stdout)
    assert state["digest"] == digest and state["verified"] is True
    assert state["run_state"] == "WaitingForMembers" and state["pending"] + state["clients"] == 1
    assert state["ignored"] == {"Unauthorized": 1}

    paused = cli("solana", "pause", "--run-id", "onchain", "--rpc", localnet, "--keypair", str(authority_key))
    assert paused.returncode == 0, paused.stderr
    again = cli("solana", "create-run", "--config", str(config), "--rpc", localnet, "--keypair", str(authority_key))
    assert again.returncode == 1 and "RunExists" in again.stderr and "Traceback" not in again.stderr
    missing = cli("solana", "state", "--run-id", "nope", "--rpc", localnet)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_rpc_chain_reports_an_unreachable_endpoint() -> None:
    from psyche.ledger.base import LedgerUnavailable

    async def probe() -> None:
        chain = RpcChain("http://127.0.0.1:9", timeout=2)
        try:
            await chain.latest_blockhash()
        finally:
            await chain.close()

    with pytest.raises(LedgerUnavailable):
        asyncio.run(probe())
