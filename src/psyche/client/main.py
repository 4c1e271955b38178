"""``psyche client``: wire a ledger, a P2P node and a trainer into a running node.

A refusal (an unreachable server, a missing run, an unusable key or config) is one
``error:`` line through :mod:`psyche.console`, as for every other command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console

from psyche.config import ConfigError, RunConfig, parse_config
from psyche.console import fail, fail_config, line_printer, load_node_key
from psyche.ledger.base import Ledger
from psyche.ledger.remote import server_url_problem, unreachable_message

if TYPE_CHECKING:
    from psyche.client.trainer import LocalTrainer
    from psyche.identity import Identity


def _get_json(url: str, path: str) -> tuple[int, Any]:
    """``GET url + path`` as JSON, and its HTTP status; exits with one line if the server
    cannot be reached or does not answer like a psyche server."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}{path}", timeout=10)
    except httpx.TransportError as exc:
        fail(unreachable_message(url, exc))
    try:
        return resp.status_code, resp.json()
    except ValueError:
        fail(f"{url} answered GET {path} with HTTP {resp.status_code} and no JSON; "
             "is --server the URL of `psyche server`?")


def server_run_id(url: str, run_id: str | None) -> str:
    """``run_id``, or the id of the server's only run; exits with one clear line otherwise."""
    if (problem := server_url_problem(url)) is not None:
        fail(problem)
    if run_id is not None:
        return run_id
    code, runs = _get_json(url, "/api/runs")
    if code != 200 or not isinstance(runs, list):
        fail(f"{url} answered GET /api/runs with HTTP {code}; is --server the URL of `psyche server`?")
    if not runs:
        fail(f"the server at {url} hosts no run; start it with `psyche server --config RUN.toml`")
    if len(runs) > 1:
        fail(f"the server at {url} hosts {len(runs)} runs; pass --run-id (one of {[r.get('run_id') for r in runs]})")
    return runs[0]["run_id"]


def _server_run(url: str, run_id: str | None) -> tuple[str, RunConfig]:
    """The run id and config the server hosts (the only run, if no id is given)."""
    run_id = server_run_id(url, run_id)
    code, status = _get_json(url, f"/api/runs/{run_id}")
    if code != 200 or not isinstance(status, dict) or "config" not in status:
        why = status.get("message") if isinstance(status, dict) and status.get("message") else f"HTTP {code}"
        fail(f"{url}: run {run_id!r}: {why}")
    return run_id, parse_config(status["config"], f"run {run_id} config from {url}")


def _bind_host(bind: str) -> str:
    """``bind`` with port 0: where a throwaway endpoint dials from to reach the same network."""
    return f"{bind.rsplit(':', 1)[0]}:0"


async def _run(args: dict, console: Console) -> int:
    from psyche.train.model import import_model_code

    # Transformers takes seconds to import: let that overlap joining and waiting for the run.
    threading.Thread(target=import_model_code, name="import-model-code", daemon=True).start()
    from psyche.client.trainer import LocalTrainer
    from psyche.data import DataError

    key_path = Path(args["key"])
    ledger: Ledger | None = None
    run_id: str | None = None
    if args["server"] is not None:
        from psyche.ledger.remote import ServerLedger

        # Nothing is created before the server answered and the run is found: an existing key is
        # checked first (its problems are the user's to fix either way), a missing one made last.
        identity = load_node_key(key_path) if key_path.exists() else None
        run_id, cfg = _server_run(args["server"], args["run_id"])
    else:
        from urllib.parse import urlparse

        from psyche.config import load_config
        from psyche.ledger.solana.ledger import SolanaLedger
        from psyche.ledger.solana.keys import load_keypair

        if args["run_id"] is None or args["config"] is None:
            fail("--solana needs --run-id and --config (the run's config file)")
        cfg = load_config(args["config"])  # a bad config is told before a key is created
        identity = load_node_key(key_path, create=True)
        try:
            keypair = load_keypair(key_path, create=True)
        except ValueError as exc:
            fail(f"--key {exc}")
        local = urlparse(args["solana"]).hostname in ("127.0.0.1", "localhost", "::1")
        ledger = SolanaLedger(args["solana"], args["run_id"], keypair, airdrop=local)
        await ledger.state()
        digest = ledger.sync.replay.config_digest
        if digest and digest != cfg.digest():
            fail(f"{args['config']} is not the config run {args['run_id']!r} was created with "
                 f"(digest {cfg.digest()[:12]} vs {digest[:12]} on chain)")
    devices = args["devices"]
    try:
        if len(devices) > 1:
            from psyche.client.ranks import NodeTrainer, RankFailure

            try:
                trainer: LocalTrainer = NodeTrainer(cfg, devices=devices, data_location=args["data"])
            except RankFailure as exc:
                fail(f"this node's ranks: {exc}")
        else:
            trainer = LocalTrainer(cfg, device=devices[0], data_location=args["data"])
    except DataError as exc:
        fail(" ".join(str(exc).split()))
    try:
        return await _run_node(args, console, cfg, identity, ledger, trainer, key_path, run_id)
    finally:
        trainer.close()


async def _run_node(args: dict, console: Console, cfg: RunConfig, identity: Identity | None, ledger: Ledger | None,
                    trainer: LocalTrainer, key_path: Path, run_id: str | None) -> int:
    """Join and follow the run with ``trainer`` until it ends (what :func:`_run` returns).
    ``ledger`` None: the server's (``args["server"]``, run ``run_id``), built once the key is known."""
    from psyche.client.ports import TrainerFailure
    from psyche.client.runtime import ClientRuntime, KeyInUse
    from psyche.p2p import P2PNode
    from psyche.p2p.node import describe_address, endpoint_answers

    me = identity if identity is not None else load_node_key(key_path, create=True)
    say = line_printer(f"[dim]{me.public_key.hex()[:8]}[/]", console)
    if ledger is None:
        from psyche.ledger.remote import ServerLedger

        assert run_id is not None
        ledger = ServerLedger(args["server"], run_id, me, say=say)
    node = await P2PNode.start(me, cfg.run_id, bind=args["bind"], upload_rate=args["upload_rate"],
                               download_rate=args["download_rate"])
    caps = [f"{what} ≤ {rate / 1e6:,.2f} MB/s" for what, rate in (("uploads", node.upload_rate), ("downloads", node.download_rate))
            if rate is not None]
    say(f"client {me.public_key.hex()} for run {cfg.run_id}; p2p address ready" + (f" ({', '.join(caps)})" if caps else ""))
    if trainer.ranks > 1:
        say(f"this node trains on {trainer.ranks} ranks ({', '.join(args['devices'])}) through torch.distributed; "
            "to the run it is one node")
    bind = _bind_host(args["bind"])
    runtime = ClientRuntime(ledger, node, trainer, me, checkpoint_dir=args["checkpoint_dir"], say=say,
                            key_probe=lambda address: endpoint_answers(me.public_key, address, bind=bind))
    task = asyncio.create_task(runtime.run())
    loop = asyncio.get_running_loop()

    def stop() -> None:
        runtime.stop()
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        return await task
    except asyncio.CancelledError:
        say("stopped")
        return 130
    except KeyInUse as exc:
        fail(exc.line(str(key_path), describe_address(exc.address)))
    except TrainerFailure as exc:  # it withdrew first
        fail(str(exc))
    finally:
        _write_profile(runtime, args["profile"], say)
        await node.close()
        await ledger.close()


def _write_profile(runtime, path: Path | None, say) -> None:
    """Say how busy this node was and, with ``--profile``, write where its time went as JSON."""
    prof = runtime.profile()
    if prof is None:
        return
    say(f"trained {prof['steps_trained']} steps; forward/backward {prof['utilization']:.0%} of "
        f"{prof['wall_s']:.0f}s wall time, CPU {prof['cpu_share']:.0%} of a core")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof, indent=1) + "\n")


def run_client(*, server: str | None, solana: str | None, run_id: str | None, key: Path, devices: list[str],
               checkpoint_dir: Path | None, data: str | None, bind: str, console: Console,
               config: Path | None = None, profile: Path | None = None,
               upload_rate: float | None = None, download_rate: float | None = None) -> int:
    """Run one node until the run finishes (0) or it is stopped (130); a user error exits
    with one ``error:`` line (code 1, see :func:`psyche.console.fail`).

    ``devices``: the device of each of this node's ranks (several: :class:`psyche.client.ranks.NodeTrainer`).
    ``profile``: write where this node's time went (JSON, see :mod:`psyche.client.timing`) on exit.
    ``upload_rate`` / ``download_rate``: caps on this node's P2P traffic in bytes per second.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = dict(server=server, solana=solana, run_id=run_id, key=key, devices=devices,
                checkpoint_dir=checkpoint_dir, data=data, bind=bind, config=config, profile=profile,
                upload_rate=upload_rate, download_rate=download_rate)
    try:
        return asyncio.run(_run(args, console))
    except ConfigError as exc:  # the --config file, or a config this psyche cannot read from the server
        fail_config(exc)
