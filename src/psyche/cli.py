"""The ``psyche`` command.

Each subcommand validates its input once and turns a user error into one line
naming the field, peer or step, with a nonzero exit code and no traceback.
Heavy imports (torch, transformers, iroh) happen inside the command that needs
them, so ``psyche --help`` and ``psyche validate-config`` stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core

from psyche.console import console, err_console, fail, fail_config, line_printer, load_node_key
from psyche.httplimits import Limits, Rate, parse_rate

if TYPE_CHECKING:
    from psyche.coordinator import Instruction

# Commands in the order a newcomer meets them, in groups; `psyche --help` lists them so.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "Start here": ("demo", "doctor"),
    "Run a network": ("server", "client", "data-server", "dashboard", "pause", "resume", "authorize", "revoke"),
    "Data, models and keys": ("tokenize", "validate-config", "train", "generate", "serve", "keygen"),
    "On Solana": ("localnet", "solana"),
    "Measure": ("bench", "testbed"),
}


class _GroupedCommands(typer.core.TyperGroup):
    """Lists the subcommands in :data:`COMMAND_GROUPS` order, one section per group."""

    def format_commands(self, ctx, formatter) -> None:
        known = {name for names in COMMAND_GROUPS.values() for name in names}
        groups = dict(COMMAND_GROUPS)
        groups["Other"] = tuple(n for n in self.list_commands(ctx) if n not in known)
        for title, names in groups.items():
            # The whole first sentence: write_dl wraps it rather than cutting it off.
            rows = [(n, cmd.get_short_help_str(limit=300)) for n in names
                    if (cmd := self.get_command(ctx, n)) is not None and not cmd.hidden]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    name="psyche",
    cls=_GroupedCommands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: one line per option with a metavar that says what to pass, greppable when piped.
    rich_markup_mode=None,
)


def serve_http(app_, *, host: str, port: int, banner: str, limits: Limits | None = None) -> None:
    """Print ``banner`` and serve the ASGI ``app_`` with uvicorn until Ctrl-C, uvicorn enforcing
    its part of ``limits`` (the app's own; default: the defaults): WebSocket message size, keep-alive."""
    import uvicorn

    from psyche.httplimits import uvicorn_options

    console.print(banner, highlight=False)
    # A feed a peer never closed must not keep Ctrl-C waiting: drop such connections after 5 s.
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                **uvicorn_options(limits or Limits()))


def request_rate(option: str, value: str) -> Rate | None:
    """The rate ``--option`` names (None for ``off``); exits with one line naming the option otherwise."""
    try:
        return parse_rate(value)
    except ValueError as exc:
        fail(f"--{option}: {exc}")


# What anyone may send a server of ours unless told otherwise (psyche.httplimits).
DEFAULT_LIMITS = Limits()


# The torch device option, the same on every command that computes.
DeviceOpt = Annotated[str, typer.Option(metavar="DEVICE", help="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")]

# What `psyche client` uses unless told otherwise, and so what `psyche doctor` checks by default.
CLIENT_KEY = Path("client.key")
CLIENT_BIND = "127.0.0.1:0"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"psyche {version('psyche')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print psyche's version and exit.")] = False,
) -> None:
    """Psyche in Python: train language models together over the internet.

    New here? `psyche demo` runs a whole network on this machine; `psyche doctor
    --server URL` tells you whether this machine is ready to join a run.
    """


def require_device(device: str, *, option: str = "--device") -> str:
    """The device ``device`` names (``auto``: cuda if present, else cpu); exits with one
    line (naming ``option``) unless it is a torch device this machine has."""
    from psyche.train.device import device_problem, resolve_device

    device = resolve_device(device)
    if problem := device_problem(device):
        fail(f"{option} {problem}")
    return device


def require_port(host: str, port: int) -> None:
    """Exit with a clear line unless a server could listen on ``host:port``; call before creating anything."""
    from psyche.localports import port_problem

    if problem := port_problem(host, port):
        fail(f"{problem}; is another server running there? Pass another --port")


@app.command("validate-config")
def validate_config(
    path: Annotated[Path, typer.Argument(metavar="CONFIG", hidden=True, help="A run config TOML file.")],
) -> None:
    """Check the run config file CONFIG; print OK or every violated rule with its field.

    A local data.location (relative to the config file's folder) must be a token folder
    whose vocabulary fits model.vocab_size; an http(s):// or psyche:// one is not contacted.
    """
    from psyche.config import ConfigError, load_config
    from psyche.data import data_problems, is_checked_offline, not_built_yet

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        fail_config(exc)
    if problems := data_problems(cfg):
        fail_config(ConfigError(problems, str(path)))
    loc = cfg.data_location()
    if not is_checked_offline(cfg):
        data = "remote, not checked here: each client checks it when it opens it"
    elif not_built_yet(loc):
        data = "not built yet: psyche train, client and demo build it from Debian's fortunes on first use"
    else:
        data = "a token folder that fits the model"
    console.print(f"OK  {path}  (run {cfg.run_id}, digest {cfg.digest()[:12]}; data {loc}: {data})",
                  highlight=False, markup=False)


# Subcommands registered by their own modules' authors go below; keep each a thin
# wrapper that imports its implementation lazily.
# --- commands ---


@app.command("dashboard")
def dashboard_cmd(
    server: Annotated[str, typer.Option(metavar="URL", help="Coordinator server URL to follow, e.g. http://HOST:8000")],
    port: Annotated[int, typer.Option(metavar="PORT", help="Local port to serve the dashboard on.")] = 8080,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve the live dashboard here for a remote coordinator server."""
    from psyche.dashboard import create_proxy_app

    require_port(host, port)

    try:
        app_ = create_proxy_app(server)
    except ValueError as exc:
        fail(str(exc))
    serve_http(app_, host=host, port=port, banner=f"psyche dashboard for {server} at http://{host}:{port}/")


@app.command("keygen")
def keygen_cmd(
    path: Annotated[Path, typer.Argument(metavar="FILE", hidden=True, help="Key file to create (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
) -> None:
    """Create a node key in FILE (mode 0600) and print its public key.

    The key is ed25519: the node's iroh endpoint id and the key it signs with.
    """
    from psyche.identity import Identity, IdentityError

    ident = Identity.generate()
    try:
        ident.save(path, overwrite=force)
    except IdentityError as exc:
        fail(f"{exc} (use --force to replace it)" if "already exists" in exc.problem else str(exc))
    except OSError as exc:
        fail(f"{path}: {exc.strerror}")
    console.print(ident.public_key.hex(), highlight=False)


@app.command("localnet")
def localnet_cmd(
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port for the JSON-RPC (0: a free one).")] = 8899,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind (keep it loopback: the faucet is free).")] = "127.0.0.1",
    slot_ms: Annotated[int, typer.Option(metavar="MS", min=10, help="Milliseconds per slot (block).")] = 400,
) -> None:
    """A local Solana chain (LiteSVM) behind the standard JSON-RPC, with the run program deployed."""
    from psyche.ledger.solana.commands import run_localnet

    raise typer.Exit(run_localnet(host=host, port=port, slot_time=slot_ms / 1000))


from psyche.ledger.solana.commands import solana_app  # noqa: E402  (typer only; heavy imports stay inside)

app.add_typer(solana_app, name="solana")


bench_app = typer.Typer(help="Benchmarks that print one JSON line.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")


@bench_app.command("distro")
def bench_distro_cmd(
    peers: Annotated[int, typer.Option(metavar="N", help="Simulated DisTrO peers.")] = 4,
    steps: Annotated[int, typer.Option(metavar="N", help="Optimizer steps (DisTrO and each AdamW run).")] = 300,
    quick: Annotated[bool, typer.Option(help="A CI-sized run (overrides --steps).")] = False,
    topk: Annotated[int, typer.Option(metavar="K", help="DCT coefficients kept per chunk × chunk tile.")] = 2,
    chunk: Annotated[int, typer.Option(metavar="N", help="DCT tile edge.")] = 32,
    one_bit: Annotated[bool, typer.Option(help="Send signs only.")] = True,
    overlapped: Annotated[bool, typer.Option(help="Apply step t-1's results at step t.")] = False,
    lr: Annotated[float | None, typer.Option(metavar="LR", help="DisTrO peak LR (default: DisTrO.DEFAULT_LR).")] = None,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Folder for the loss-curve PNG.")] = Path("bench/out"),
) -> None:
    """Simulated DisTrO network in one process vs AdamW on the same tokens: one JSON line."""
    import json

    from psyche.testing.distro_sim import bench, config_from

    if peers < 1 or steps < 1 or topk < 1 or chunk < 1:
        fail(f"--peers, --steps, --topk and --chunk must be >= 1 (got {peers}, {steps}, {topk}, {chunk})")
    overrides: dict[str, int | float | bool] = dict(peers=peers, steps=150 if quick else steps, topk=topk, chunk=chunk,
                     one_bit=one_bit, overlapped=overlapped)
    if lr is not None:
        overrides["distro_lr"] = lr
    cfg = config_from(**overrides)
    report = bench(cfg, out_dir=out, on_eval=lambda name, step, loss: err_console.print(
        f"{name:>16}  step {step:>5}  val loss {loss:.4f}", highlight=False))
    print(json.dumps(report))


testbed_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
app.add_typer(testbed_app, name="testbed", help="A WAN on this machine (root): nodes in network namespaces "
              "behind shaped, lossy links with CPU shares, to run a network on.")


def _testbed_link_text(mbit: float | None, loss: float) -> str:
    return f"{'unshaped' if mbit is None else f'{mbit:g} Mbit/s'}, loss {loss:g} %"


@testbed_app.command("up")
def testbed_up_cmd(
    clients: Annotated[int, typer.Option(metavar="N", min=1, max=249, help="Client nodes c0 .. cN-1.")] = 3,
    mbit: Annotated[float, typer.Option(metavar="RATE", help="Each client's link rate, Mbit/s in each direction.")] = 20,
    loss: Annotated[float, typer.Option(metavar="PERCENT", help="Share of packets each client's link drops, in each direction.")] = 0.5,
    cpu: Annotated[float, typer.Option(metavar="CORES", help="Each client's CPU share, in cores.")] = 0.6,
    server_mbit: Annotated[str, typer.Option(metavar="RATE|none", help="The server node's link rate, Mbit/s (none: unshaped, no loss).")] = "none",
    run: Annotated[bool, typer.Option("--run", help="Also start a run on it: a coordinator server on node server and a client on each client node.")] = False,
    steps: Annotated[int, typer.Option(metavar="N", min=1, help="With --run: optimizer steps to train.")] = 40,
    out: Annotated[Path, typer.Option(metavar="DIR", help="With --run: folder for the run's config, database, keys, logs and checkpoint.")] = Path("runs/testbed"),
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="With --run: base run config (default: config/tiny-fortunes.toml).")] = None,
) -> None:
    """Create a testbed that stays up until `psyche testbed down`.

    Its nodes: server (reachable from here over an unshaped control link) and clients
    c0 .. cN-1, each behind its shaped, lossy link and CPU share. Latency is not emulated.
    """
    from psyche.testbed import Link, Node, Testbed, TestbedError, TestbedUnavailable, missing_requirement
    from psyche.testing.network import client_node

    server_rate: float | None = None
    if server_mbit.strip().lower() != "none":
        try:
            server_rate = float(server_mbit)
        except ValueError:
            fail(f"--server-mbit must be a rate in Mbit/s or none (got {server_mbit!r})")
    # The testbed's own rules, each told with the option that broke it.
    checks = {"--mbit": lambda: Link(mbit=mbit), "--loss": lambda: Link(loss=loss),
              "--cpu": lambda: Node("c0", cpu=cpu), "--server-mbit": lambda: Link(mbit=server_rate)}
    for option, check in checks.items():
        try:
            check()
        except ValueError as exc:
            fail(f"{option}: {exc}")
    if (problem := missing_requirement()) is not None:
        fail(problem)  # before --run builds the data set
    cfg = None
    if run:
        from psyche.config import ConfigError, load_config
        from psyche.data import DataError, ensure_default_dataset, not_built_yet
        from psyche.demo import DEFAULT_CONFIG, demo_config

        try:
            base = load_config(config or DEFAULT_CONFIG)
            location = base.data_location()  # a folder written in the config file is relative to that file
            if not_built_yet(location):
                location = str(ensure_default_dataset(location).resolve())
            if Path(location).exists():
                location = str(Path(location).resolve())  # the processes on the nodes may start elsewhere
            cfg = demo_config(base, clients=clients, steps=steps, data_location=location)
        except ConfigError as exc:
            fail_config(exc)
        except DataError as exc:
            fail(str(exc))

    nodes = [Node("server", Link(mbit=server_rate), control=True)]
    nodes += [Node(client_node(i), Link(mbit=mbit, loss=loss), cpu=cpu) for i in range(clients)]
    bed = Testbed(nodes)
    try:
        bed.up(keep=True)
    except TestbedUnavailable as exc:
        fail(str(exc))
    except TestbedError as exc:
        fail(f"could not create the testbed: {exc}")
    console.print(f"testbed {bed.tag} is up until `psyche testbed down`:", highlight=False, markup=False)
    for node in nodes:
        control = f"  control {bed.control_ip(node.name)}" if node.control else ""
        console.print(f"  {node.name:<8} netns {bed.netns(node.name):<22} {bed.ip(node.name):<11} "
                      f"link {_testbed_link_text(node.link.mbit, node.link.loss):<26} "
                      f"cpu {'unlimited' if node.cpu is None else f'{node.cpu:g} cores'}{control}",
                      highlight=False, markup=False)
    ns, group = bed.netns(client_node(0)), bed.cgroup(client_node(0))
    console.print(f"From here, node server is at {bed.control_ip('server')} (unshaped); the nodes reach each other "
                  "at their addresses above.\n"
                  f"Run a command on {client_node(0)}:  ip netns exec {ns} ip -br addr\n"
                  f"... inside its CPU share, and killed by `psyche testbed down`:  "
                  f"sh -c 'echo $$ > {group}/cgroup.procs && exec ip netns exec {ns} COMMAND'",
                  highlight=False, markup=False)
    if cfg is None:
        return

    from psyche.testing.network import Network

    root = out.resolve()
    (root / "profiles").mkdir(parents=True, exist_ok=True)
    (root / "run.sqlite").unlink(missing_ok=True)  # a fresh run; `psyche server` keeps databases for restarts
    net = Network(root, cfg, bed=bed)
    try:
        net.start_server()
    except AssertionError:
        bed.down()
        fail(f"the coordinator server did not start on node server (the testbed is removed); "
             f"its log: {root / 'logs' / 'server.log'}")
    for i in range(clients):
        net.start_client(i)
    # Not net.stop(): the processes stay, in their nodes' cgroups, until `psyche testbed down`.
    console.print(f"Run {cfg.run_id} started: {clients} clients, {steps} steps. Dashboard: {net.url}/\n"
                  f"Logs: {root / 'logs'}", highlight=False, markup=False)


@testbed_app.command("status")
def testbed_status_cmd() -> None:
    """List the testbeds up on this machine, one line each."""
    from psyche.testbed import leftovers
    from psyche.testbed.bed import PREFIX, registered
    from psyche.testbed.system import CGROUP_CPU, cgroup_pids

    tags = []
    for reg in registered():
        if reg.problem is not None:
            console.print(f"{reg.tag}  {reg.problem}", highlight=False, markup=False)
            continue
        tags.append(reg.tag)
        held = "kept until `psyche testbed down`" if reg.owner is None else f"owned by process {reg.owner}"
        procs = sum(len(cgroup_pids(CGROUP_CPU / f"{PREFIX}{reg.tag}" / n)) for n in reg.nodes)
        reach = "".join(f", {n} at {ip}" for n, ip in reg.control.items())
        console.print(f"{reg.tag}  {held}  nodes {', '.join(reg.nodes)}  {procs} processes{reach}",
                      highlight=False, markup=False)
    strays = [x for x in leftovers() if not any(f"{PREFIX}{t}" in x for t in tags)]
    if strays:
        console.print(f"left without a registry entry (`psyche testbed down` removes them): {', '.join(strays)}",
                      highlight=False, markup=False)
    elif not tags:
        console.print("no testbed is up", highlight=False, markup=False)


@testbed_app.command("down")
def testbed_down_cmd() -> None:
    """Remove every testbed on this machine, with every process on its nodes."""
    from psyche.testbed import TestbedError, leftovers, sweep

    try:
        removed = sweep(everything=True)
    except (TestbedError, OSError) as exc:
        fail(f"could not remove every testbed: {exc}")
    for tag in removed:
        console.print(f"removed testbed {tag}", highlight=False, markup=False)
    if not removed:
        console.print("no testbed was up", highlight=False, markup=False)
    if left := leftovers():
        fail(f"still on this machine after removing the testbeds: {', '.join(left)}")


@app.command("tokenize")
def tokenize_cmd(
    corpus: Annotated[list[Path] | None, typer.Option(metavar="PATH", help="A text file, or a folder of them (repeatable; see above). Default: Debian's fortunes, /usr/share/games/fortunes.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(metavar="FILE", help="An existing tokenizer.json (with an <|endoftext|> token) to use instead of training a BPE.")] = None,
    vocab_size: Annotated[int, typer.Option(metavar="N", min=258, help="Vocabulary of the BPE trained when no --tokenizer is given.")] = 4096,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Token folder to write (train.bin, val.bin, tokenizer.json, meta.json); a token folder already there is replaced, any other non-empty folder or file refused.")] = Path("data/fortunes"),
    val_fraction: Annotated[float, typer.Option(metavar="FRACTION", min=0.0, max=0.5, help="Share of documents held out for validation (val.bin), picked by a hash of each document's text.")] = 0.05,
) -> None:
    """Turn a text corpus into flat token files and a tokenizer (a token folder).

    Files read: each --corpus file, whatever its name, as UTF-8 text (bytes that are
    not UTF-8 become U+FFFD); for a --corpus folder, the regular files directly in it
    (not its subfolders), in name order, skipping symlinks and *.dat files (fortune
    indexes). Without --corpus: every fortune file in /usr/share/games/fortunes
    (Debian package fortunes).

    Documents: a file with a line that is exactly % (the fortune format) is cut at
    those lines; any other file at blank lines (paragraphs). Backspace overstriking
    is rendered as a terminal shows it, other control characters except tab are
    dropped, trailing spaces and surrounding blank lines are stripped and empty
    documents dropped. Each document is followed by the <|endoftext|> token.

    Without --tokenizer, a byte-level BPE of --vocab-size tokens is trained on the
    training documents (the same corpus gives the same tokenizer).
    """
    from psyche.data import DataError, tokenize_corpus

    try:
        meta = tokenize_corpus(corpus=corpus or None, tokenizer=tokenizer, vocab_size=vocab_size, out_dir=out,
                               val_fraction=val_fraction, console=console)
    except DataError as exc:
        fail(str(exc))
    s = meta["splits"]
    console.print(f"wrote {out}: {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens "
                  f"({meta['dtype']}, vocab {meta['vocab_size']})", highlight=False)


@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Option(metavar="FILE", help="Run config TOML.")] = Path("config/tiny-fortunes.toml"),
    steps: Annotated[int | None, typer.Option(metavar="N", min=1, help="Total steps (default: coordinator.total_steps).")] = None,
    out: Annotated[Path | None, typer.Option(metavar="DIR", help="Output folder (default: runs/<run name>).")] = None,
    optimizer: Annotated[str | None, typer.Option(metavar="adamw|distro", help="adamw or distro (default: the config's, adamw if DisTrO is absent).")] = None,
    device: DeviceOpt = "auto",
    data: Annotated[str | None, typer.Option(metavar="LOCATION", help="Override data.location.")] = None,
    eval_every: Annotated[int | None, typer.Option(metavar="N", min=1, help="Steps between validation losses (default: steps/5).")] = None,
    checkpoint_every: Annotated[int, typer.Option(metavar="N", min=0, help="Steps between checkpoints (0: only at the end).")] = 0,
    resume: Annotated[Path | None, typer.Option(metavar="DIR", help="Checkpoint folder to resume from.")] = None,
) -> None:
    """Train the run's model on this machine alone; write metrics.jsonl and a checkpoint."""
    from psyche.config import ConfigError, load_config
    from psyche.data import DataError

    match optimizer:
        case None | "adamw" | "distro":
            kind = optimizer
        case _:
            fail(f"--optimizer must be adamw or distro (got {optimizer!r})")
    device = require_device(device)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail_config(exc)
    from psyche.data import data_problems

    if problems := data_problems(cfg, location=data):
        # Before train() makes its output folder: a refusal leaves nothing behind.
        fail_config(ConfigError(problems, str(config) if data is None else "--data"))
    from psyche.train import CheckpointError, TrainingError, train

    try:
        result = train(cfg, out_dir=out or Path("runs") / cfg.name, steps=steps, optimizer=kind, device=device,
                       data_location=data, eval_every=eval_every, checkpoint_every=checkpoint_every,
                       resume=resume, console=console)
    except (DataError, CheckpointError, TrainingError) as exc:
        fail(str(exc))
    console.print(f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint}", highlight=False)


@app.command("generate")
def generate_cmd(
    checkpoint: Annotated[Path, typer.Option(metavar="DIR", help="Checkpoint folder (save_pretrained form).")],
    prompt: Annotated[str, typer.Option(metavar="TEXT", help="Text to continue (empty: a new document).")] = "",
    max_new_tokens: Annotated[int, typer.Option(metavar="N", min=0, help="Most tokens to generate.")] = 100,
    temperature: Annotated[float, typer.Option(metavar="T", min=0.0, help="Sampling temperature (0: greedy).")] = 0.8,
    top_k: Annotated[int, typer.Option(metavar="K", min=0, help="Sample among the k likeliest tokens (0: all).")] = 50,
    seed: Annotated[int, typer.Option(metavar="N", help="Sampling seed: the same seed gives the same text.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Stream text from a checkpoint."""
    import sys

    from psyche.generate import GenerateError, Generator, checkpoint_folder_problem

    device = require_device(device)
    if problem := checkpoint_folder_problem(checkpoint):
        fail(f"--checkpoint {problem}")  # before transformers and the model load: a typo is told at once
    try:
        gen = Generator.from_checkpoint(checkpoint, device=device)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in gen.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k or None, seed=seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except GenerateError as exc:
        fail(str(exc))
    sys.stdout.write("\n")


@app.command("serve")
def serve_cmd(
    checkpoint: Annotated[Path | None, typer.Option(metavar="DIR", help="Checkpoint folder to serve (save_pretrained form).")] = None,
    watch: Annotated[bool, typer.Option(help="With --checkpoint: swap to each newer checkpoint written into the folder (e.g. by psyche train).")] = False,
    follow: Annotated[str | None, typer.Option(metavar="URL", help="Instead: follow a run on this coordinator server, serving each newer checkpoint it publishes.")] = None,
    follow_solana: Annotated[str | None, typer.Option(metavar="URL", help="Instead: follow a run on Solana at this RPC URL (with --run-id).")] = None,
    run_id: Annotated[str | None, typer.Option(metavar="ID", help="The run to follow (default with --follow: the server's only run).")] = None,
    name: Annotated[str | None, typer.Option(metavar="NAME", help="The model id clients ask for (default: the run's name).")] = None,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port to listen on.")] = 8200,
    device: DeviceOpt = "auto",
    max_batch: Annotated[int, typer.Option(metavar="N", min=1, max=256, help="Completions decoded together in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option(metavar="N", min=1, help="Completions that may wait for a batch; beyond it requests get 429.")] = 64,
    poll: Annotated[float, typer.Option(metavar="SECONDS", min=0.1, help="How often a followed run is asked for a newer checkpoint.")] = 5.0,
    engine_kind: Annotated[str, typer.Option("--engine", metavar="KIND", help="auto (vllm on a CUDA device where vLLM is installed, else transformers), transformers or vllm.")] = "auto",
    rate_limit_address: Annotated[str, typer.Option(metavar="N/SECONDS", help="Requests one client address may make in any SECONDS (over it: 429 with Retry-After), or off.")] = str(DEFAULT_LIMITS.address_rate),
) -> None:
    """Serve a checkpoint, or a live run's newest one, over the OpenAI API (/v1/completions, /v1/chat/completions)."""
    import logging
    from dataclasses import replace

    from psyche.generate import checkpoint_folder_problem

    if sum(x is not None for x in (checkpoint, follow, follow_solana)) != 1:
        fail("pass exactly one of --checkpoint DIR, --follow URL or --follow-solana URL")
    if checkpoint is not None and (problem := checkpoint_folder_problem(checkpoint)):
        fail(f"--checkpoint {problem}")
    if watch and checkpoint is None:
        fail("--watch watches the --checkpoint folder; pass --checkpoint DIR (--follow and --follow-solana follow by themselves)")
    if follow_solana is not None and run_id is None:
        fail("--follow-solana needs --run-id (the run to follow)")
    if follow is not None:
        from psyche.client.main import server_run_id
        from psyche.ledger.remote import server_url_problem

        if (problem := server_url_problem(follow, option="--follow")) is not None:
            fail(problem)
        run_id = server_run_id(follow, run_id)
    if engine_kind not in ("auto", "transformers", "vllm"):
        fail(f"--engine must be auto, transformers or vllm (got {engine_kind!r})")
    limits = replace(DEFAULT_LIMITS, address_rate=request_rate("rate-limit-address", rate_limit_address))
    device = require_device(device)
    from psyche.serve.vllm_engine import vllm_available

    if engine_kind == "auto":
        engine_kind = "vllm" if device.startswith("cuda") and vllm_available() else "transformers"
    if engine_kind == "vllm" and not vllm_available():
        fail("--engine vllm: vLLM is not installed here (pip install 'psyche[vllm]' on a machine with CUDA GPUs)")
    if engine_kind == "vllm" and not device.startswith("cuda"):
        fail(f"--engine vllm runs on CUDA GPUs, not on --device {device}")
    require_port(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of a followed run

    from psyche.serve.app import create_app
    from psyche.serve.engine import Engine, InferenceEngine

    engine: InferenceEngine
    if engine_kind == "vllm":
        from psyche.serve.vllm_engine import VLLMEngine

        engine = VLLMEngine(max_queue=max_queue)
    else:
        engine = Engine(device=device, max_batch=max_batch, max_queue=max_queue)
    background = None
    if checkpoint is not None:
        try:
            engine.swap(engine.load(checkpoint, name=name))
        except (OSError, ValueError) as exc:
            fail(f"--checkpoint {checkpoint}: cannot load it ({exc})")
        what = f"{engine.served.name} (step {engine.served.step}) from {checkpoint}" if engine.served else ""
    if follow is not None or follow_solana is not None or watch:
        from psyche.serve.follow import CheckpointSource, FolderSource, Follower, ServerSource, SolanaSource

        source: CheckpointSource
        if checkpoint is not None:
            source = FolderSource(checkpoint)
            name = engine.served.name if engine.served else name
        elif follow is not None:
            assert run_id is not None
            source = ServerSource(follow, run_id)
        else:
            assert run_id is not None
            source = SolanaSource(follow_solana or "", run_id)
        follower = Follower(source, engine, name=name, poll_s=poll,
                            say=line_printer("serve:", console))
        background = follower.run
        what = f"the newest checkpoint of {source.describe()}" if checkpoint is None else f"{what}, watched"
    url = f"http://{host}:{port}"
    serve_http(create_app(engine, limits=limits, background=background), host=host, port=port, limits=limits,
               banner=f"psyche serve at {url}/v1 (the OpenAI API, on {engine_kind}; try: curl {url}/v1/models): {what}")


@app.command("server")
def server_cmd(
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="Run config TOML to host (created if not in the database).")] = None,
    db: Annotated[Path, typer.Option(metavar="FILE", help="SQLite database; reuse it to continue runs after a restart.")] = Path("psyche.sqlite"),
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind.")] = "127.0.0.1",
    key: Annotated[Path, typer.Option(metavar="FILE", help="The server's ed25519 key (the run authority); created if missing.")] = Path("server.key"),
    rate_limit_address: Annotated[str, typer.Option(metavar="N/SECONDS", help="Requests one client address may make in any SECONDS (HTTP and WebSocket together; over it: 429 with Retry-After), or off.")] = str(DEFAULT_LIMITS.address_rate),
    rate_limit_key: Annotated[str, typer.Option(metavar="N/SECONDS", help="Signed instructions and reports one key may send in any SECONDS, or off.")] = str(DEFAULT_LIMITS.key_rate),
    inference_url: Annotated[str | None, typer.Option(metavar="URL", help="Where the run's model answers: a `psyche serve` (or any OpenAI-compatible server) at http(s)://HOST:PORT. Each run's page on the dashboard then gets a Try it box streaming completions from it.")] = None,
) -> None:
    """Host a run's coordinator over HTTP + WebSocket, persisted in SQLite, with the dashboard."""
    import logging
    from dataclasses import replace

    from psyche.config import ConfigError, load_config
    from psyche.ledger.remote import server_url_problem
    from psyche.ledger.server import create_app, open_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Check what was asked before creating anything: bad options, a bad config or a busy port
    # leave no key or database behind.
    limits = replace(DEFAULT_LIMITS, address_rate=request_rate("rate-limit-address", rate_limit_address),
                     key_rate=request_rate("rate-limit-key", rate_limit_key))
    if inference_url is not None and (problem := server_url_problem(inference_url, option="--inference-url")):
        fail(problem)
    require_port(host, port)
    cfg = None
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            fail_config(exc)
    elif not db.exists():
        fail(f"{db} does not exist; pass --config RUN.toml to create a run in it")
    ident = load_node_key(key, create=True)
    try:
        server = open_server(cfg, db, authority=ident.public_key, host_key=ident.public_key, inference_url=inference_url)
    except ConfigError as exc:  # a run stored by a psyche whose config rules differ
        fail_config(exc)
    if not server.hosts:
        fail(f"{db} holds no run; pass --config RUN.toml to create one")
    from psyche.dashboard import mount_dashboard

    app_ = create_app(server, extra_routes=mount_dashboard, limits=limits)
    serve_http(app_, host=host, port=port, banner=f"psyche server: runs {sorted(server.hosts)} at http://{host}:{port}/",
               limits=limits)


def _authority_instruction(server: str, run_id: str | None, key: Path, instruction_name: str,
                           instr: Instruction | None = None, *, done: str = "accepted") -> None:
    """Sign ``instr`` (default: Pause or Resume, by ``instruction_name``) with ``key`` and send it
    to ``server``'s run; exits with one line if the server is away or refuses it."""
    import asyncio

    from psyche.client.main import server_run_id
    from psyche.coordinator import Pause, Resume
    from psyche.ledger.base import InstructionRefused, LedgerUnavailable
    from psyche.ledger.remote import ServerLedger

    ident = load_node_key(key)
    rid = server_run_id(server, run_id)
    if instr is None:
        instr = Pause() if instruction_name == "pause" else Resume()

    async def send() -> None:
        ledger = ServerLedger(server, rid, ident)
        try:
            await ledger.submit(instr)
        finally:
            await ledger.close()

    try:
        asyncio.run(send())
    except LedgerUnavailable as exc:
        fail(str(exc))
    except InstructionRefused as exc:
        fail(f"run {rid}: {instruction_name} refused: {exc}")
    console.print(f"run {rid}: {instruction_name} {done}", highlight=False)


@app.command("pause")
def pause_cmd(
    server: Annotated[str, typer.Option(metavar="URL", help="Coordinator server URL.")],
    key: Annotated[Path, typer.Option(metavar="FILE", help="The run authority's key (the server's --key).")] = Path("server.key"),
    run_id: Annotated[str | None, typer.Option(metavar="ID", help="Run to pause (default: the server's only run).")] = None,
) -> None:
    """Pause a server-hosted run at the end of the current round (authority only)."""
    _authority_instruction(server, run_id, key, "pause")


@app.command("resume")
def resume_cmd(
    server: Annotated[str, typer.Option(metavar="URL", help="Coordinator server URL.")],
    key: Annotated[Path, typer.Option(metavar="FILE", help="The run authority's key (the server's --key).")] = Path("server.key"),
    run_id: Annotated[str | None, typer.Option(metavar="ID", help="Run to resume (default: the server's only run).")] = None,
) -> None:
    """Resume a paused server-hosted run; clients rejoin and the LR warms up again (authority only)."""
    _authority_instruction(server, run_id, key, "resume")


# What `psyche authorize` and `psyche revoke` take alike.
GranteeArg = Annotated[str, typer.Argument(metavar="KEY", hidden=True, help="The key a right is for.")]
ServerUrlOpt = Annotated[str, typer.Option(metavar="URL", help="Coordinator server URL.")]
GrantorKeyOpt = Annotated[Path, typer.Option(metavar="FILE", help="The run authority's key (the server's --key), or "
                                             "an authorizer's.")]
GrantRunOpt = Annotated[str | None, typer.Option(metavar="ID", help="The run (default: the server's only run).")]


@app.command("authorize")
def authorize_cmd(
    grantee: GranteeArg,
    server: ServerUrlOpt,
    key: GrantorKeyOpt = Path("server.key"),
    run_id: GrantRunOpt = None,
    expires: Annotated[str | None, typer.Option(metavar="TERM", help="When the right ends: 3600 (seconds), 30m, "
                                                "12h, 7d, 2w or never (default: never; an authorizer must give one).")] = None,
    authorizer: Annotated[bool, typer.Option("--authorizer", help="Authority only: let KEY grant join rights "
                                             "itself, for terms no longer than this one.")] = False,
) -> None:
    """Gated runs: let KEY join the run (or, with --authorizer, grant others that right).

    KEY: 64 hex digits (as `psyche keygen` and the dashboard show it), a Solana address, or a key file.
    """
    import time

    from psyche.console import parse_public_key, parse_term
    from psyche.coordinator import Authorize, Delegate

    who = parse_public_key(grantee)
    until = parse_term(expires, int(time.time()))
    instr = Delegate(key=who, expires_at=until) if authorizer else Authorize(key=who, expires_at=until)
    term = "without end" if until == 0 else f"until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}"
    _authority_instruction(server, run_id, key, "delegate" if authorizer else "authorize", instr,
                           done=f"{who.hex()[:16]} may {'grant join rights' if authorizer else 'join'} {term}")


@app.command("revoke")
def revoke_cmd(
    grantee: GranteeArg,
    server: ServerUrlOpt,
    key: GrantorKeyOpt = Path("server.key"),
    run_id: GrantRunOpt = None,
) -> None:
    """Gated runs: take back KEY's join right (and, by the authority, its delegation); a member leaves at the end of the round.

    KEY: 64 hex digits, a Solana address, or a key file.
    """
    from psyche.console import parse_public_key
    from psyche.coordinator import Revoke

    who = parse_public_key(grantee)
    _authority_instruction(server, run_id, key, "revoke", Revoke(key=who),
                           done=f"{who.hex()[:16]} may no longer join")


@app.command("client")
def client_cmd(
    server: Annotated[str | None, typer.Option(metavar="URL", help="Coordinator server URL, e.g. http://127.0.0.1:8000 "
                                                    "(required: this or --solana).")] = None,
    run_id: Annotated[str | None, typer.Option(metavar="ID", help="Run to join (default: the server's only run).")] = None,
    key: Annotated[Path, typer.Option(metavar="FILE", help="This node's ed25519 key file; created if missing.")] = CLIENT_KEY,
    device: DeviceOpt = "auto",
    checkpoint_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Where to write checkpoints when selected.")] = None,
    data: Annotated[str | None, typer.Option(metavar="LOCATION", help="Override the run's data location (path, http URL, psyche://).")] = None,
    bind: Annotated[str, typer.Option(metavar="HOST:PORT", help="P2P bind address.")] = CLIENT_BIND,
    solana: Annotated[str | None, typer.Option(metavar="URL", help="Solana RPC URL (required instead of --server for a run on Solana).")] = None,
    keypair: Annotated[Path | None, typer.Option(metavar="FILE", help="Solana keypair file (with --solana; default: --key).")] = None,
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="The run's config TOML (with --solana; checked against the chain).")] = None,
    profile: Annotated[Path | None, typer.Option(metavar="FILE", help="On exit, write where this node's time went (JSON).")] = None,
    max_upload_rate: Annotated[str | None, typer.Option(metavar="RATE", help="Cap this node's P2P uploads (results and model parts), bytes/s: e.g. 500K, 2.5M, 1MiB/s.")] = None,
    max_download_rate: Annotated[str | None, typer.Option(metavar="RATE", help="Cap this node's P2P downloads, same form as --max-upload-rate.")] = None,
    nproc_per_node: Annotated[int | None, typer.Option(metavar="N", help="Train on N local ranks (torch.distributed: one per GPU, or N CPU processes); to the run they are one node.")] = None,
    devices: Annotated[str | None, typer.Option(metavar="LIST", help="The device of each rank, e.g. cuda:0,cuda:1 (instead of --device).")] = None,
) -> None:
    """Join a run and train: follow the coordinator, exchange results with peers, checkpoint."""
    from psyche.client.main import run_client
    from psyche.ledger.remote import server_url_problem
    from psyche.p2p.ratelimit import parse_rate

    if (server is None) == (solana is None):
        fail("pass exactly one of --server URL or --solana URL")
    # Also checked where the client first uses it; here it is told before torch loads.
    if server is not None and (problem := server_url_problem(server)) is not None:
        fail(problem)
    from psyche.train.device import node_devices

    try:
        ranks = node_devices(require_device(device) if devices is None else "cpu", nproc_per_node, devices)
    except ValueError as exc:
        fail(str(exc))
    for d in dict.fromkeys(ranks):
        require_device(d, option="--devices" if devices is not None else "--device")
    rates = {}
    for name, value in (("max-upload-rate", max_upload_rate), ("max-download-rate", max_download_rate)):
        try:
            rates[name] = None if value is None else parse_rate(value)
        except ValueError as exc:
            fail(f"--{name}: {exc}")
    code = run_client(server=server, solana=solana, run_id=run_id, key=keypair or key, devices=ranks,
                      checkpoint_dir=checkpoint_dir, data=data, bind=bind, console=console, config=config,
                      profile=profile, upload_rate=rates["max-upload-rate"], download_rate=rates["max-download-rate"])
    raise typer.Exit(code)


@app.command("demo")
def demo_cmd(
    clients: Annotated[int, typer.Option(metavar="N", min=1, max=16, help="Client processes to start.")] = 3,
    steps: Annotated[int, typer.Option(metavar="N", min=1, help="Optimizer steps to train.")] = 40,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Folder for the checkpoint, metrics, logs and database.")] = Path("runs/demo"),
    port: Annotated[int | None, typer.Option(metavar="PORT", help="Server port (default: a free one).")] = None,
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="Base run config (default: config/tiny-fortunes.toml).")] = None,
) -> None:
    """Run a whole network here: a coordinator server and N clients training a small LLaMA."""
    from psyche.config import ConfigError
    from psyche.demo import run_demo

    try:
        code = run_demo(clients=clients, steps=steps, out=out, port=port, config=config, console=console)
    except ConfigError as exc:
        fail_config(exc)
    raise typer.Exit(code)


@app.command("data-server")
def data_server_cmd(
    data: Annotated[Path, typer.Option(metavar="DIR", help="Token folder (what `psyche tokenize` wrote).")] = Path("data/fortunes"),
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port.")] = 8100,
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to bind.")] = "127.0.0.1",
    rate_limit_address: Annotated[str, typer.Option(metavar="N/SECONDS", help="Requests one client address may make in any SECONDS (over it: 429 with Retry-After), or off.")] = str(DEFAULT_LIMITS.address_rate),
) -> None:
    """Serve a token folder to remote clients (data.location = "psyche://HOST:PORT")."""
    from dataclasses import replace

    from psyche.data.errors import DataError
    from psyche.data.server import create_data_app

    limits = replace(DEFAULT_LIMITS, address_rate=request_rate("rate-limit-address", rate_limit_address))
    require_port(host, port)

    try:
        app_ = create_data_app(data, limits=limits)
    except DataError as exc:
        fail(str(exc))
    serve_http(app_, host=host, port=port, banner=f"psyche data-server: {data} at psyche://{host}:{port}", limits=limits)


@app.command("doctor")
def doctor_cmd(
    server: Annotated[str | None, typer.Option(metavar="URL", help="The coordinator server of the run to join.")] = None,
    run_id: Annotated[str | None, typer.Option(metavar="ID", help="Run to check (default: the server's only run).")] = None,
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="A run config TOML to check (alone, or against the server's run).")] = None,
    key: Annotated[Path, typer.Option(metavar="FILE", help="The node key `psyche client` would use.")] = CLIENT_KEY,
    device: DeviceOpt = "auto",
    data: Annotated[str | None, typer.Option(metavar="LOCATION", help="Data location `psyche client --data` would use.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Where checkpoints would be written (default: here).")] = None,
    bind: Annotated[str, typer.Option(metavar="HOST:PORT", help="P2P bind address `psyche client --bind` would use.")] = CLIENT_BIND,
    wait: Annotated[float, typer.Option(metavar="SECONDS", min=0, help="Keep trying a coordinator that does not answer yet (one just started) this long.")] = 0,
) -> None:
    """Check that this machine, its key, the run's data and the network are ready to join a run.

    Prints one line per check (ok, warn or FAIL, with what to do) and exits 1 if any
    check failed. Creates nothing.
    """
    from psyche.doctor import diagnose

    if server is not None and wait:
        console.print(f"waiting up to {wait:g} s for the coordinator at {server} to answer", highlight=False)
    findings = diagnose(server=server, run_id=run_id, config=config, key=key, device=device, data=data,
                        checkpoint_dir=checkpoint_dir, bind=bind, wait=wait)
    for f in findings:
        out = err_console if f.status == "FAIL" else console
        out.print(f.line(), highlight=False, markup=False)
    failed = [f for f in findings if f.status == "FAIL"]
    if failed:
        fail(f"{len(failed)} problem(s) above: fix each FAIL line, then run psyche doctor again")
    console.print("ready: " + (f"`psyche client --server {server}` can join" if server else "this machine can train"),
                  highlight=False, markup=False)


def main() -> None:
    """Entry point of the ``psyche`` console script."""
    app(prog_name="psyche")


if __name__ == "__main__":
    main()
