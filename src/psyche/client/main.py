"""``psyche client``: wire a ledger, a P2P node and a trainer into a running node."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import httpx
from rich.console import Console

from psyche.config import ConfigError, RunConfig, parse_config
from psyche.ledger.remote import server_url_problem, unreachable_message


def _get_json(url: str, path: str):
    """``GET url + path`` as JSON, and its HTTP status; SystemExit with one line if the server
    cannot be reached or does not answer like a psyche server."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}{path}", timeout=10)
    except httpx.TransportError as exc:
        raise SystemExit(f"error: {unreachable_message(url, exc)}") from None
    try:
        return resp.status_code, resp.json()
    except ValueError:
        raise SystemExit(f"error: {url} answered GET {path} with HTTP {resp.status_code} and no JSON; "
                         "is --server the URL of `psyche server`?") from None


def server_run_id(url: str, run_id: str | None) -> str:
    """``run_id``, or the id of the server's only run; SystemExit with a clear line otherwise."""
    if (problem := server_url_problem(url)) is not None:
        raise SystemExit(f"error: {problem}")
    if run_id is not None:
        return run_id
    code, runs = _get_json(url, "/api/runs")
    if code != 200 or not isinstance(runs, list):
        raise SystemExit(f"error: {url} answered GET /api/runs with HTTP {code}; is --server the URL of `psyche server`?")
    if len(runs) != 1:
        raise SystemExit(f"error: the server at {url} hosts {len(runs)} runs; pass --run-id "
                         f"(one of {[r.get('run_id') for r in runs]})" if runs else
                         f"error: the server at {url} hosts no run; start it with `psyche server --config RUN.toml`")
    return runs[0]["run_id"]


def _server_run(url: str, run_id: str | None) -> tuple[str, RunConfig]:
    """The run id and config the server hosts (the only run, if no id is given)."""
    run_id = server_run_id(url, run_id)
    code, status = _get_json(url, f"/api/runs/{run_id}")
    if code != 200 or not isinstance(status, dict) or "config" not in status:
        why = status.get("message") if isinstance(status, dict) and status.get("message") else f"HTTP {code}"
        raise SystemExit(f"error: {url}: run {run_id!r}: {why}")
    return run_id, parse_config(status["config"], f"run {run_id} config from {url}")


def _load_key(path: Path, *, create: bool):
    """The node key in ``path`` (None if missing and not ``create``); SystemExit naming the problem."""
    from psyche.identity import Identity, IdentityError

    try:
        if not create and not path.exists():
            return None
        return Identity.load_or_create(path) if create else Identity.load(path)
    except IdentityError as exc:
        raise SystemExit(f"error: --key {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: --key {path}: {exc.strerror}") from None


def _bind_host(bind: str) -> str:
    """``bind`` with port 0: where a throwaway endpoint dials from to reach the same network."""
    return f"{bind.rsplit(':', 1)[0]}:0"


async def _run(args: dict, console: Console) -> int:
    from psyche.train.model import import_model_code

    # Transformers takes seconds to import: let that overlap joining and waiting for the run.
    threading.Thread(target=import_model_code, name="import-model-code", daemon=True).start()
    from psyche.client.runtime import ClientRuntime, KeyInUse
    from psyche.client.trainer import LocalTrainer
    from psyche.data import DataError
    from psyche.p2p import P2PNode
    from psyche.p2p.node import describe_address, endpoint_answers

    key_path = Path(args["key"])
    if args["server"] is not None:
        from psyche.ledger.remote import ServerLedger

        # Nothing is created before the server answered and the run is found: an existing key is
        # checked first (its problems are the user's to fix either way), a missing one made last.
        identity = _load_key(key_path, create=False)
        run_id, cfg = _server_run(args["server"], args["run_id"])
        ledger = None
    else:
        from urllib.parse import urlparse

        from psyche.config import load_config
        from psyche.ledger.solana.ledger import SolanaLedger
        from psyche.ledger.solana.keys import load_keypair

        if args["run_id"] is None or args["config"] is None:
            raise SystemExit("error: --solana needs --run-id and --config (the run's config file)")
        identity = _load_key(key_path, create=True)
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
    try:
        trainer = LocalTrainer(cfg, device=args["device"], data_location=args["data"])
    except DataError as exc:
        raise SystemExit("error: " + " ".join(str(exc).split())) from None
    if identity is None:
        identity = _load_key(key_path, create=True)
    say = lambda msg: console.print(f"[dim]{identity.public_key.hex()[:8]}[/] {msg}", highlight=False)  # noqa: E731
    if ledger is None:
        ledger = ServerLedger(args["server"], run_id, identity, say=say)
    node = await P2PNode.start(identity, cfg.run_id, bind=args["bind"], upload_rate=args["upload_rate"],
                               download_rate=args["download_rate"])
    caps = [f"{what} ≤ {rate / 1e6:,.2f} MB/s" for what, rate in (("uploads", node.upload_rate), ("downloads", node.download_rate))
            if rate is not None]
    say(f"client {identity.public_key.hex()} for run {cfg.run_id}; p2p address ready" + (f" ({', '.join(caps)})" if caps else ""))
    bind = _bind_host(args["bind"])
    runtime = ClientRuntime(ledger, node, trainer, identity, checkpoint_dir=args["checkpoint_dir"], say=say,
                            key_probe=lambda address: endpoint_answers(identity.public_key, address, bind=bind))
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
        where = describe_address(exc.address)
        if exc.taken_over:
            line = (f"another process registered {key_path} at {where} while this one ran; "
                    f"two nodes cannot share a key: stop one, or give each node its own --key")
        else:
            line = (f"{key_path} is in use by a live node at {where} (another psyche client?); "
                    f"give each node its own key: --key other.key")
        print(f"error: {line}", file=sys.stderr, flush=True)
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
