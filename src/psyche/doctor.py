"""``psyche doctor``: is this machine ready to join a run?

Each check looks at one thing a contributor needs (the software, the device, the
node key, the coordinator and its run, the run's data, memory, disk, the P2P
endpoint) and returns :class:`Finding` lines; one check failing never stops the
others, so a newcomer sees every problem at once, each on one line with what to
do about it. Nothing is created: a missing key is reported as "will be created",
and the P2P check binds an endpoint and closes it again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from psyche.config import RunConfig
    from psyche.coordinator.state import CoordinatorState

Status = Literal["ok", "warn", "FAIL"]

# Training holds the fp32 weights, their gradients and DisTrO's two buffers per
# parameter (error feedback and the decoded update): four copies of the model.
TRAIN_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``status`` of ``check``, and what was found or what to do."""

    status: Status
    check: str
    detail: str

    def line(self) -> str:
        """The finding as the one line ``psyche doctor`` prints."""
        return f"{self.status:>4}  {self.check}: {self.detail}"


@dataclass
class Context:
    """What the checks learn from each other (the run's config once the coordinator gave it)."""

    server: str | None = None
    run_id: str | None = None
    config: RunConfig | None = None
    state: CoordinatorState | None = None
    wait: float = 0.0
    """Seconds to keep trying a coordinator that does not answer yet."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"


def check_software() -> list[Finding]:
    """The Python packages a client imports, with their versions; a missing one names the install."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    found, missing = [f"python {sys.version.split()[0]}"], []
    for module, dist in (("torch", "torch"), ("transformers", "transformers"), ("iroh", "iroh")):
        try:
            importlib.import_module(module)
            found.append(f"{dist} {version(dist)}")
        except (ImportError, PackageNotFoundError) as exc:
            missing.append(f"{dist} ({exc.__class__.__name__}: {exc})")
    if missing:
        return [Finding("FAIL", "software", f"cannot import {', '.join(missing)}; run `make install` "
                        "(or pip install -e .) in the project folder")]
    return [Finding("ok", "software", ", ".join(found))]


def check_device(spec: str) -> list[Finding]:
    """Whether ``spec`` (or the automatic choice) is a device this machine has."""
    from psyche.train.device import device_problem, resolve_device

    device = resolve_device(spec)
    if problem := device_problem(device):
        return [Finding("FAIL", "device", problem)]
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(idx)
        detail = f"{device}: {torch.cuda.get_device_name(idx)}, {_mb(free)} of {_mb(total)} free"
    else:
        detail = device
    notes = (["chosen automatically"] if spec == "auto" else []) + ([] if torch.cuda.is_available() else ["no CUDA device here"])
    return [Finding("ok", "device", detail + (f" ({'; '.join(notes)})" if notes else ""))]


def check_key(path: Path) -> list[Finding]:
    """Whether the node key file is usable; a missing one is fine (the client creates it)."""
    from psyche.identity import Identity, IdentityError

    if not path.exists():
        return [Finding("ok", "key", f"{path} does not exist yet; `psyche client --key {path}` creates it "
                        f"(or `psyche keygen {path}`)")]
    try:
        ident = Identity.load(path)
    except IdentityError as exc:
        return [Finding("FAIL", "key", str(exc))]
    except OSError as exc:
        return [Finding("FAIL", "key", f"{path}: {exc.strerror}")]
    return [Finding("ok", "key", f"{path}: node {ident.public_key.hex()[:16]}…")]


def check_coordinator(ctx: Context) -> list[Finding]:
    """Whether the coordinator server answers, which run it hosts, and whether that run can be joined."""
    import httpx

    from psyche.config import ConfigError, parse_config
    from psyche.coordinator import Coordinator
    from psyche.ledger.remote import server_url_problem, transport_problem

    url = ctx.server or ""
    if problem := server_url_problem(url):
        return [Finding("FAIL", "coordinator", problem)]
    base = url.rstrip("/")
    deadline = time.monotonic() + ctx.wait
    while True:
        try:
            runs = httpx.get(f"{base}/api/runs", timeout=10).json()
            break
        except httpx.TransportError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)  # --wait: a server still starting refuses connections for a moment
                continue
            waited = f" after waiting {ctx.wait:g} s" if ctx.wait else ""
            return [Finding("FAIL", "coordinator", f"cannot reach {url}{waited} ({transport_problem(exc)}); is "
                            "`psyche server` running there, and does this machine reach that address?")]
        except ValueError:
            return [Finding("FAIL", "coordinator", f"{url} answered, but not as a psyche server (not JSON)")]
    ids = [r.get("run_id") for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
    if ctx.run_id is None:
        if len(ids) != 1:
            return [Finding("FAIL", "coordinator", f"{url} hosts {len(ids)} runs; pass --run-id (one of {ids})")]
        ctx.run_id = ids[0]
    elif ctx.run_id not in ids:
        return [Finding("FAIL", "coordinator", f"{url} has no run {ctx.run_id!r} (it hosts {ids})")]
    try:
        status = httpx.get(f"{base}/api/runs/{ctx.run_id}", timeout=10).json()
        ctx.config = parse_config(status["config"], f"run {ctx.run_id} config from {url}")
        ctx.state = Coordinator.from_bytes(httpx.get(f"{base}/api/runs/{ctx.run_id}/state", timeout=10).content).state
    except httpx.TransportError as exc:
        return [Finding("FAIL", "coordinator", f"{url}: {transport_problem(exc)}")]
    except ConfigError as exc:
        return [Finding("FAIL", "coordinator", f"{line} (this psyche cannot read the run's config; update psyche)")
                for line in exc.lines()]
    state, done, total = status.get("state"), status.get("steps_completed"), status.get("total_steps")
    detail = (f"{url} reachable; run {ctx.run_id} is {state}, {done} of {total} steps done, "
              f"{len(status.get('clients', []))} member(s), {len(status.get('pending', []))} waiting to start")
    if state == "Finished":
        return [Finding("FAIL", "coordinator", detail + "; it has finished, there is nothing to join")]
    if state == "Paused":
        return [Finding("warn", "coordinator", detail + "; a client joins now and trains once the authority resumes it")]
    return [Finding("ok", "coordinator", detail)]


def check_access(state: CoordinatorState, key: Path) -> list[Finding]:
    """Whether this node's key may join the run: any key in an open run; in a gated one a key
    holding a grant (a missing one fails, with the command the run's authority would run)."""
    import time

    from psyche.coordinator import access
    from psyche.identity import Identity, IdentityError

    if not access.gated(state):
        return []
    try:
        me = Identity.load(key).public_key
    except (IdentityError, OSError):
        return [Finding("FAIL", "access", f"run {state.run_id} is gated: create the key first (psyche keygen "
                        f"{key}) and ask the run's authority to grant it (psyche authorize KEY)")]
    if access.may_join(state, me, int(time.time())):
        return [Finding("ok", "access", f"run {state.run_id} is gated and {key} holds a grant to join")]
    return [Finding("FAIL", "access", f"run {state.run_id} is gated and {key} holds no grant to join: ask the run's "
                    f"authority to run `psyche authorize {me.hex()}`")]


def check_config(path: Path, ctx: Context) -> list[Finding]:
    """Whether the local run config file is valid (and, with a coordinator, the one it runs)."""
    from psyche.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return [Finding("FAIL", "config", line) for line in exc.lines()]
    if ctx.config is not None and ctx.config.digest() != cfg.digest():
        return [Finding("FAIL", "config", f"{path} is not the config of run {ctx.run_id} (digest "
                        f"{cfg.digest()[:12]} vs the server's {ctx.config.digest()[:12]})")]
    if ctx.config is None:
        ctx.config = cfg
    return [Finding("ok", "config", f"{path}: run {cfg.run_id}, digest {cfg.digest()[:12]}")]


def check_data(cfg: RunConfig, location: str | None) -> list[Finding]:
    """Whether the run's token data (or ``location`` instead) opens here with a vocabulary
    that fits the model; a remote location is contacted (validate-config does not)."""
    from psyche.data import DataError, data_problems, not_built_yet, providers_for

    where = location if location is not None else cfg.data_location()
    if problems := data_problems(cfg, location=location):
        return [Finding("FAIL", "data", f"{p.field}: {p.message}") for p in problems]
    if not_built_yet(where):
        return [Finding("ok", "data", f"{where} is not built yet: the client builds it from Debian's fortunes "
                        "on first use")]
    try:
        data = providers_for(cfg, location=where)
    except DataError as exc:
        return [Finding("FAIL", "data", str(exc))]
    return [Finding("ok", "data", f"{where}: {len(data.train):,} training and {len(data.val):,} validation "
                    f"sequences of {cfg.model.seq_len} tokens")]


def model_parameters(cfg: RunConfig) -> int:
    """How many parameters the run's model has (built on the meta device: no memory, no init)."""
    import torch

    from psyche.train.model import count_parameters, llama_config, quiet_transformers

    quiet_transformers()
    from transformers import AutoConfig, LlamaForCausalLM

    conf = AutoConfig.from_pretrained(cfg.model.checkpoint) if cfg.model.checkpoint else llama_config(cfg.model)
    with torch.device("meta"):
        model = LlamaForCausalLM(conf)
    return count_parameters(model)


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n: int, device: str) -> list[Finding]:
    """Whether the device holds a model of ``n`` parameters, its gradients and the optimizer's buffers."""
    from psyche.train.device import resolve_device

    need = n * TRAIN_BYTES_PER_PARAM
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        have: int | None = torch.cuda.mem_get_info(torch.device(device).index or 0)[0]
        where = f"free on {device}"
    else:
        have, where = _available_memory(), "available"
    detail = (f"model {n / 1e6:,.2f}M parameters: training needs about {_mb(need)} "
              f"(weights, gradients, optimizer buffers) plus activations")
    if have is None:
        return [Finding("ok", "memory", detail)]
    detail += f"; {_mb(have)} {where}"
    if need > have:
        return [Finding("FAIL", "memory", detail + "; use a machine or device with more memory")]
    if need > 0.8 * have:
        return [Finding("warn", "memory", detail + "; activations may not fit: lower optimizer.micro_batch_size")]
    return [Finding("ok", "memory", detail)]


def check_disk(folder: Path, n: int | None) -> list[Finding]:
    """Whether the checkpoint folder (or the nearest existing parent) is writable, with room for
    checkpoints of a model of ``n`` parameters (None: room not judged)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return [Finding("FAIL", "disk", f"{probe} is not writable; pass a --checkpoint-dir you can write to")]
    free = shutil.disk_usage(probe).free
    detail = f"{folder}: {_mb(free)} free"
    if n is not None:
        # A checkpoint is the fp32 weights of ``n`` parameters; keep room for two while one is written.
        need = 2 * 4 * n
        if free < need:
            return [Finding("FAIL", "disk", f"{detail}; checkpoints need about {_mb(need)}")]
        detail += f" (checkpoints need about {_mb(need)})"
    return [Finding("ok", "disk", detail)]


def check_p2p(bind: str) -> list[Finding]:
    """Whether a P2P endpoint binds at ``bind`` (then closes it again).

    The probe uses a throwaway key: an endpoint with the node's own key could be taken
    for the node by its peers if that node is running."""
    from psyche.p2p.errors import TransportError
    from psyche.identity import Identity
    from psyche.p2p.iroh_transport import IrohTransport

    async def probe() -> str:
        transport = await IrohTransport.bind(Identity.generate().secret_bytes, bind=bind)
        try:
            return transport.address
        finally:
            await transport.close()

    try:
        address = asyncio.run(probe())
    except TransportError as exc:
        return [Finding("FAIL", "p2p", f"{exc}; pass another --bind HOST:PORT")]
    return [Finding("ok", "p2p", f"endpoint bound at {bind} (address {address[:24]}…)")]


def check_peers(state: CoordinatorState, key: Path, bind: str, *, sample: int = 3) -> list[Finding]:
    """Whether this node's key is free (no live node registered with it) and whether the
    run's members answer over P2P from here (a handshake with up to ``sample`` of them)."""
    from psyche.coordinator import queries as q
    from psyche.identity import Identity, IdentityError
    from psyche.p2p.node import describe_address, endpoint_answers

    me = None
    if key.exists():
        try:
            me = Identity.load(key).public_key
        except IdentityError:
            pass  # the key check already said what is wrong with it
    # Members of the epoch, then those who joined and wait for the next one.
    known: list[tuple[bytes, str | None]] = [(c.id, c.p2p_address) for c in q.healthy_clients(state)]
    known += [(p, q.address_of(state, p)) for p in state.pending]
    members = [(pk, addr) for pk, addr in known if pk != me and addr][:sample]
    # This key and where the run last saw it, if it did: a live node there holds the key.
    own = [(me, addr)] if me is not None and (addr := q.address_of(state, me)) else []

    async def probe() -> tuple[list[bool], bool]:
        found = await asyncio.gather(*(endpoint_answers(pk, addr, bind=bind) for pk, addr in members + own))
        return list(found[:len(members)]), any(found[len(members):])

    answered, in_use = asyncio.run(probe())
    out = []
    if in_use:
        out.append(Finding("FAIL", "key", f"{key} is in use by a live node at {describe_address(own[0][1])} "
                           f"(another psyche client?); give each node its own key: --key other.key"))
    if not members:
        out.append(Finding("ok", "peers", "no other member to reach yet"))
    elif not any(answered):
        out.append(Finding("FAIL", "peers", f"none of {len(members)} member(s) answered over P2P from here (e.g. "
                           f"{describe_address(members[0][1])}); check that this machine reaches their addresses "
                           "(firewall, --bind)"))
    else:
        out.append(Finding("ok" if all(answered) else "warn", "peers",
                           f"{sum(answered)} of {len(members)} member(s) answered over P2P from here"))
    return out


def diagnose(*, server: str | None = None, run_id: str | None = None, config: Path | None = None,
             key: Path, device: str = "auto", data: str | None = None,
             checkpoint_dir: Path | None = None, bind: str, wait: float = 0.0) -> list[Finding]:
    """Run every check that the arguments make possible; return their findings in order.

    ``key`` and ``bind`` are what ``psyche client`` would use (the CLI's defaults are its).

    Without ``server`` or ``config`` the run-specific checks (data, memory) are skipped,
    and a ``warn`` finding says how to include them. ``wait``: seconds to keep trying a
    coordinator that does not answer yet (one just started).
    """
    findings = check_software()
    if findings[0].status == "FAIL":
        return findings
    findings += check_device(device)
    if findings[-1].status == "FAIL":
        device = "cpu"  # still size the model against this machine's memory
    findings += check_key(key)
    ctx = Context(server=server, run_id=run_id, wait=wait)
    if server is not None:
        findings += check_coordinator(ctx)
    if config is not None:
        findings += check_config(config, ctx)
    if ctx.state is not None:
        findings += check_access(ctx.state, key)
        findings += check_peers(ctx.state, key, bind)
    n_params = None
    if ctx.config is not None:
        findings += check_data(ctx.config, data)
        n_params = model_parameters(ctx.config)
        findings += check_memory(n_params, device)
    elif server is None and config is None:
        findings.append(Finding("warn", "run", "no --server or --config given: the run's data and memory "
                                "needs were not checked"))
    findings += check_disk(checkpoint_dir or Path.cwd(), n_params)
    findings += check_p2p(bind)
    return findings
