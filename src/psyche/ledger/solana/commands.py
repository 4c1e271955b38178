"""The ``psyche localnet`` and ``psyche solana ...`` commands (thin: parse, call, print).

Kept import-light (typer and :mod:`psyche.console` at module level) because
``psyche.cli`` registers the ``solana`` sub-app when it loads.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from psyche.console import fail, fail_config

solana_app = typer.Typer(name="solana", help="Runs coordinated on Solana: create, inspect, pause, resume, authorize, revoke.",
                         no_args_is_help=True, add_completion=False, rich_markup_mode=None)

RpcOpt = Annotated[str, typer.Option("--rpc", metavar="URL", help="Solana JSON-RPC URL (psyche localnet: http://127.0.0.1:8899).")]
RunIdOpt = Annotated[str, typer.Option("--run-id", metavar="ID", help="The run's id (its config name).")]
KeypairOpt = Annotated[Path, typer.Option("--keypair", metavar="FILE", help="Signer key: a psyche key file or a Solana keypair JSON.")]
ProgramOpt = Annotated[str | None, typer.Option("--program-id", metavar="ADDRESS", help="Where the run program is deployed (default: localnet's).")]


def _program(program_id: str | None):
    from solders.pubkey import Pubkey

    from psyche.ledger.solana.wire import DEFAULT_PROGRAM_ID

    try:
        return DEFAULT_PROGRAM_ID if program_id is None else Pubkey.from_string(program_id)
    except ValueError:
        fail(f"--program-id: {program_id!r} is not a base58 public key")


def _is_local(url: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def _keypair(path: Path, *, create: bool = False):
    from psyche.ledger.solana.keys import load_keypair

    try:
        return load_keypair(path, create=create)
    except ValueError as exc:
        fail(f"--keypair: {exc}")


def _run(coro):
    from psyche.ledger.base import InstructionRefused, LedgerUnavailable
    from psyche.ledger.solana.replay import ReplayError

    try:
        return asyncio.run(coro)
    except InstructionRefused as exc:
        fail(f"refused: {exc}")
    except LedgerUnavailable as exc:
        fail(f"chain unavailable: {exc}")
    except ReplayError as exc:
        fail(f"inconsistent history: {exc}")


@solana_app.command("create-run")
def create_run_cmd(
    config: Annotated[Path, typer.Option("--config", metavar="FILE", help="The run config TOML.")],
    rpc: RpcOpt,
    keypair: KeypairOpt,
    program_id: ProgramOpt = None,
) -> None:
    """Create the run on chain; the keypair becomes its authority (may pause and resume)."""
    from psyche.config import ConfigError, load_config
    from psyche.coordinator import CoordinatorSettings
    from psyche.ledger.solana.ledger import create_run
    from psyche.ledger.solana.wire import run_address

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail_config(exc)
    kp = _keypair(keypair, create=True)
    pid = _program(program_id)
    settings = CoordinatorSettings.from_config(cfg)
    sig = _run(create_run(rpc, kp, cfg.run_id, settings, config_digest=cfg.digest(), program_id=pid,
                          airdrop=_is_local(rpc)))
    typer.echo(f"created run {cfg.run_id} at {run_address(cfg.run_id, pid)[0]} (authority {kp.pubkey()}, tx {sig})")


async def _state(rpc: str, run_id: str, program_id) -> dict:
    from psyche.coordinator import phase_deadline
    from psyche.ledger.solana.chain import connect
    from psyche.ledger.solana.ledger import RunSync

    chain = connect(rpc)
    try:
        sync = RunSync(chain, run_id, program_id=program_id)
        verified = await sync.verify()
    finally:
        await chain.close()
    r = sync.replay
    ignored: dict[str, int] = {}
    applied = 0
    for outs in r.outcomes.values():
        for o in outs:
            if o.error is None:
                applied += 1
            else:
                ignored[o.error] = ignored.get(o.error, 0) + 1
    out: dict = {"run_id": run_id, "address": str(r.address), "entries": r.count, "applied": applied,
                 "ignored": ignored, "chain": r.chain.hex(), "verified": verified}
    if r.coordinator is not None:
        s = r.coordinator.state
        out.update(run_state=s.run_state.value, epoch=s.epoch, step=s.step, clients=len(s.clients),
                   pending=len(s.pending), authority=s.authority.hex(), phase_deadline=phase_deadline(s),
                   config_digest=r.config_digest, digest=r.coordinator.digest())
    return out


@solana_app.command("state")
def state_cmd(run_id: RunIdOpt, rpc: RpcOpt, program_id: ProgramOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Replay the run from the chain and print its state and digest (anyone can check it)."""
    out = _run(_state(rpc, run_id, _program(program_id)))
    if out["entries"] == 0:
        fail(f"run {run_id!r} not found at {rpc} (address {out['address']})")
    if as_json:
        typer.echo(json.dumps(out, sort_keys=True))
        return
    for key in ("run_id", "address", "run_state", "epoch", "step", "clients", "pending", "entries", "applied",
                "ignored", "verified", "digest"):
        if key in out:
            typer.echo(f"{key:>10}: {out[key]}")


def _authority_cmd(instr, run_id: str, rpc: str, keypair: Path, program_id: str | None) -> None:
    from psyche.ledger.solana.ledger import SolanaLedger

    async def go() -> None:
        ledger = SolanaLedger(rpc, run_id, _keypair(keypair), program_id=_program(program_id), auto_tick=False,
                              airdrop=_is_local(rpc))
        try:
            await ledger.submit(instr)
        finally:
            await ledger.close()

    _run(go())
    whom = f" {instr.key.hex()[:16]}" if hasattr(instr, "key") else ""
    typer.echo(f"{type(instr).__name__.lower()}d{whom} in run {run_id}" if whom else
               f"{type(instr).__name__.lower()}d run {run_id}")


@solana_app.command("pause")
def pause_cmd(run_id: RunIdOpt, rpc: RpcOpt, keypair: KeypairOpt, program_id: ProgramOpt = None) -> None:
    """Authority only: stop the run at the end of the current round."""
    from psyche.coordinator import Pause

    _authority_cmd(Pause(), run_id, rpc, keypair, program_id)


@solana_app.command("resume")
def resume_cmd(run_id: RunIdOpt, rpc: RpcOpt, keypair: KeypairOpt, program_id: ProgramOpt = None) -> None:
    """Authority only: restart a paused run."""
    from psyche.coordinator import Resume

    _authority_cmd(Resume(), run_id, rpc, keypair, program_id)


GranteeArg = Annotated[str, typer.Argument(metavar="KEY", hidden=True, help="The key a right is for.")]


@solana_app.command("authorize")
def authorize_cmd(grantee: GranteeArg, run_id: RunIdOpt, rpc: RpcOpt, keypair: KeypairOpt,
                  expires: Annotated[str | None, typer.Option(metavar="TERM", help="When the right ends: 3600 "
                                                              "(seconds), 30m, 12h, 7d, 2w or never (default: never; "
                                                              "an authorizer must give one).")] = None,
                  authorizer: Annotated[bool, typer.Option("--authorizer", help="Authority only: let KEY grant join "
                                                           "rights itself, for terms no longer than this one.")] = False,
                  program_id: ProgramOpt = None) -> None:
    """Gated runs: let KEY join the run (or, with --authorizer, grant others that right).

    KEY: a Solana address, 64 hex digits, or a key file.
    """
    import time

    from psyche.console import parse_public_key, parse_term
    from psyche.coordinator import Authorize, Delegate

    who = parse_public_key(grantee)
    until = parse_term(expires, int(time.time()))
    instr = Delegate(key=who, expires_at=until) if authorizer else Authorize(key=who, expires_at=until)
    _authority_cmd(instr, run_id, rpc, keypair, program_id)


@solana_app.command("revoke")
def revoke_cmd(grantee: GranteeArg, run_id: RunIdOpt, rpc: RpcOpt, keypair: KeypairOpt,
               program_id: ProgramOpt = None) -> None:
    """Gated runs: take back KEY's join right (and, by the authority, its delegation).

    KEY: a Solana address, 64 hex digits, or a key file.
    """
    from psyche.console import parse_public_key
    from psyche.coordinator import Revoke

    _authority_cmd(Revoke(key=parse_public_key(grantee)), run_id, rpc, keypair, program_id)


def run_localnet(*, host: str, port: int, slot_time: float) -> int:
    """Serve a local chain until interrupted; prints the RPC URL and program id once ready."""
    from psyche.ledger.solana.localnet import serve

    def ready(url: str, validator) -> None:
        print(f"psyche localnet: RPC {url}  program {validator.program_id}", flush=True)

    try:
        asyncio.run(serve(host=host, port=port, slot_time=slot_time, on_ready=ready))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    return 0
