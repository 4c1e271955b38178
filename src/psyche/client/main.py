"""``psyche client``: wire a ledger, a P2P node and a trainer into a running node."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path

import httpx
from rich.console import Console

from psyche.config import ConfigError, RunConfig, parse_config


def server_run_id(url: str, run_id: str | None) -> str:
    """``run_id``, or the id of the server's only run; SystemExit with a clear line otherwise."""
    if run_id is not None:
        return run_id
    try:
        runs = httpx.get(f"{url.rstrip('/')}/api/runs", timeout=10).json()
    except httpx.TransportError as exc:
        raise SystemExit(f"error: cannot reach the coordinator server at {url}: {exc!r}") from None
    if len(runs) != 1:
        raise SystemExit(f"error: the server hosts {len(runs)} runs; pass --run-id (one of {[r['run_id'] for r in runs]})")
    return runs[0]["run_id"]


def _server_run(url: str, run_id: str | None) -> tuple[str, RunConfig]:
    """The run id and config the server hosts (the only run, if no id is given)."""
    run_id = server_run_id(url, run_id)
    try:
        status = httpx.get(f"{url.rstrip('/')}/api/runs/{run_id}", timeout=10)
    except httpx.TransportError as exc:
        raise SystemExit(f"error: cannot reach the coordinator server at {url}: {exc!r}") from None
    if status.status_code != 200:
        raise SystemExit(f"error: {url}: run {run_id!r}: {status.json().get('message', status.text)}")
    return run_id, parse_config(status.json()["config"], f"run {run_id} config from {url}")


async def _run(args: dict, console: Console) -> int:
    from psyche.train.model import import_model_code

    # Transformers takes seconds to import: let that overlap joining and waiting for the run.
    threading.Thread(target=import_model_code, name="import-model-code", daemon=True).start()
    from psyche.client.runtime import ClientRuntime, KeyInUse
    from psyche.client.trainer import LocalTrainer
    from psyche.p2p import Identity, P2PNode
    from psyche.p2p.errors import IdentityError

    try:
        identity = Identity.load_or_create(args["key"])
    except IdentityError as exc:
        raise SystemExit(f"error: --key {exc}") from None
    if args["server"] is not None:
        from psyche.ledger.remote import ServerLedger

        run_id, cfg = _server_run(args["server"], args["run_id"])
        ledger = ServerLedger(args["server"], run_id, identity)
    else:
        from urllib.parse import urlparse

        from psyche.config import load_config
        from psyche.ledger.solana.ledger import SolanaLedger
        from psyche.ledger.solana.keys import load_keypair

        if args["run_id"] is None or args["config"] is None:
            raise SystemExit("error: --solana needs --run-id and --config (the run's config file)")
        cfg = load_config(args["config"])
        try:
            keypair = load_keypair(Path(args["key"]), create=True)
        except ValueError as exc:
            raise SystemExit(f"error: --key {exc}") from None
        local = urlparse(args["solana"]).hostname in ("127.0.0.1", "localhost", "::1")
        ledger = SolanaLedger(args["solana"], args["run_id"], keypair, airdrop=local)
        await ledger.state()
        digest = ledger.sync.replay.config_digest
        if digest and digest != cfg.digest():
            raise SystemExit(f"error: {args['config']} is not the config run {args['run_id']!r} was created with "
                             f"(digest {cfg.digest()[:12]} vs {digest[:12]} on chain)")
    say = lambda msg: console.print(f"[dim]{identity.public_key.hex()[:8]}[/] {msg}", highlight=False)  # noqa: E731
    trainer = LocalTrainer(cfg, device=args["device"], data_location=args["data"])
    node = await P2PNode.start(identity, cfg.run_id, bind=args["bind"], upload_rate=args["upload_rate"],
                               download_rate=args["download_rate"])
    caps = [f"{what} ≤ {rate / 1e6:,.2f} MB/s" for what, rate in (("uploads", node.upload_rate), ("downloads", node.download_rate))
            if rate is not None]
    say(f"client {identity.public_key.hex()} for run {cfg.run_id}; p2p address ready" + (f" ({', '.join(caps)})" if caps else ""))
    runtime = ClientRuntime(ledger, node, trainer, identity, checkpoint_dir=args["checkpoint_dir"], say=say)
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
        say(f"[red]error:[/] {exc}")
        return 1
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


def run_client(*, server: str | None, solana: str | None, run_id: str | None, key: Path, device: str,
               checkpoint_dir: Path | None, data: str | None, bind: str, console: Console,
               config: Path | None = None, profile: Path | None = None,
               upload_rate: float | None = None, download_rate: float | None = None) -> int:
    """Run one node until the run finishes (0), it is stopped (130), or a user error (1).

    ``profile``: write where this node's time went (JSON, see :mod:`psyche.client.timing`) on exit.
    ``upload_rate`` / ``download_rate``: caps on this node's P2P traffic in bytes per second.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = dict(server=server, solana=solana, run_id=run_id, key=key, device=device,
                checkpoint_dir=checkpoint_dir, data=data, bind=bind, config=config, profile=profile,
                upload_rate=upload_rate, download_rate=download_rate)
    try:
        return asyncio.run(_run(args, console))
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
