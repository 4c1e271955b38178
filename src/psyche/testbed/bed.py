"""A WAN on one machine: nodes in network namespaces on a shaped, lossy bridge, with CPU shares.

Topology (all of it created by :class:`Testbed`, named ``psytb-<tag>-...``)::

    node ns "psytb-<tag>-<name>"        hub ns "psytb-<tag>-hub"
      eth0 10.77.0.<i>/24  ──veth──  p-<name> ─┐
      (upload: tbf on eth0)         (download: tbf on p-<name>)
                                               ├── br0 (bridge; nftables: loss, link down)
      ...                           p-<other> ─┘

    root ns  psytb-<tag>-k<i> 10.78.x.y/30 ──veth── ctl0 in a node with control=True

- **Rate**: a token bucket (``tc tbf``) in each direction of a node's link.
- **Loss**: nftables on the bridge drops each packet a node sends, and each it
  receives, with the node's loss probability (a packet between two lossy nodes
  crosses two such links).
- **Down/up**: nftables drops everything the node sends or receives on the bridge
  (silently, as a cut cable upstream does; the node's own interface stays up).
- **CPU**: each node's processes run in a cgroup v1 ``cpu`` group with a quota of
  ``cpu`` cores; the quota can change while they run.
- **Control link**: a node created with ``control=True`` is also reachable from
  the root namespace (the test or benchmark driving it), unshaped, at
  :meth:`Testbed.control_ip`; nothing else is routed anywhere.
- **Latency is not emulated**: the kernel here has no delay qdisc (no netem).

Every process a node starts is in its cgroup, so :meth:`Testbed.down` finds and
kills them all, then removes the cgroups, namespaces and links. A testbed whose
owning process died without ``down`` is removed by the next :func:`sweep`
(``psyche testbed down``, and every new :class:`Testbed`); one made with
``up(keep=True)`` stays until ``psyche testbed down``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import secrets
import subprocess
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from psyche.testbed.system import (
    CGROUP_CPU,
    TestbedError,
    TestbedUnavailable,
    cgroup_create,
    cgroup_join,
    cgroup_pids,
    cgroup_remove,
    cgroup_set_cpu,
    interface_bytes,
    links_in_root,
    missing_requirement,
    netns_list,
    sh,
)

PREFIX = "psytb-"
REGISTRY = Path("/run/psyche-testbed")
BRIDGE_NET = "10.77.0"
CONTROL_NET = "10.78"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


@dataclass(frozen=True)
class Link:
    """A node's link to the bridge: ``mbit`` per direction (None: unshaped), ``loss`` percent
    of packets dropped in each direction, ``up`` False for a cut link."""

    mbit: float | None = None
    loss: float = 0.0
    up: bool = True

    def __post_init__(self) -> None:
        if self.mbit is not None and not self.mbit > 0:
            raise ValueError(f"link rate must be > 0 Mbit/s, got {self.mbit}")
        if not 0.0 <= self.loss <= 100.0:
            raise ValueError(f"link loss must be a percentage in [0, 100], got {self.loss}")


@dataclass(frozen=True)
class Node:
    """A machine of the testbed: its ``name`` (lowercase, ≤ 12 characters), its link, its CPU
    share in cores (None: no limit), and whether the driver reaches it over a control link."""

    name: str
    link: Link = field(default_factory=Link)
    cpu: float | None = None
    control: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"node name {self.name!r}: lowercase letters, digits and '-', "
                             "starting with a letter, at most 12 characters")
        if self.cpu is not None and not self.cpu > 0:
            raise ValueError(f"node {self.name}: cpu share must be > 0 cores, got {self.cpu}")


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Testbed:
    """Nodes in network namespaces joined by shaped links; use as a context manager.

    ``with Testbed([Node("server", control=True), Node("c0", Link(20, 0.5), cpu=0.6)]) as bed:``
    creates everything on entry (raising :class:`TestbedUnavailable` with one line if
    this machine cannot) and removes everything on exit, whatever happened inside.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, nodes: list[Node], *, queue_ms: int = 100) -> None:
        names = [n.name for n in nodes]
        if sum(n.control for n in nodes) > 10:
            raise ValueError("at most 10 nodes may have a control link (control=True)")
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        if not 1 <= len(nodes) <= 250:
            raise ValueError("a testbed holds 1 to 250 nodes")
        self.nodes = {n.name: n for n in nodes}
        self.queue_ms = queue_ms
        self.tag = secrets.token_hex(3)
        self._control: dict[str, tuple[str, str, str]] = {}  # node -> (root dev, root ip, node ip)
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._up = False
        self._owner: int | None = None

    # --- names ---------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}-hub"

    def netns(self, node: str) -> str:
        """The network namespace of ``node``."""
        self._node(node)
        return f"{PREFIX}{self.tag}-{node}"

    def ip(self, node: str) -> str:
        """``node``'s address on the bridge (where the other nodes reach it)."""
        return f"{BRIDGE_NET}.{list(self.nodes).index(self._node(node).name) + 1}"

    def control_ip(self, node: str) -> str:
        """Where the driver (root namespace) reaches ``node``; only for a node with ``control=True``."""
        if node not in self._control:
            raise KeyError(f"node {node!r} has no control link (create it with control=True)")
        return self._control[node][2]

    def cgroup(self, node: str) -> Path:
        """The cgroup holding ``node``'s processes."""
        return CGROUP_CPU / f"{PREFIX}{self.tag}" / self._node(node).name

    def _node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this testbed (nodes: {', '.join(self.nodes)})") from None

    # --- life cycle ----------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, *, keep: bool = False) -> None:
        """Create the namespaces, links, shaping and cgroups (and remove testbeds left by dead owners).

        ``keep``: the testbed outlives this process (``psyche testbed up``) until
        :func:`sweep` with ``everything`` (``psyche testbed down``) removes it."""
        if (problem := missing_requirement()) is not None:
            raise TestbedUnavailable(problem)
        sweep()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        self._owner = None if keep else os.getpid()
        # Registered before anything is made, so a crash part-way leaves something sweep finds.
        self._register()
        self._up = True
        try:
            sh("ip", "netns", "add", self.hub)
            sh("ip", "-n", self.hub, "link", "set", "lo", "up")
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for node in self.nodes.values():
                self._add_node(node)
            self._write_rules()
            self._register()  # now with the control addresses
        except BaseException:
            self.down()
            raise

    def _add_node(self, node: Node) -> None:
        ns, port = self.netns(node.name), f"p-{node.name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ip(node.name)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self._shape(node)
        if node.control:
            self._add_control(node.name)
        cgroup_create(self.cgroup(node.name), node.cpu)

    def _add_control(self, node: str) -> None:
        # Two testbeds made at once must not pick the same subnet: one picks and adds at a time.
        with open(REGISTRY / ".control.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._add_control_locked(node)

    def _add_control_locked(self, node: str) -> None:
        used = set(re.findall(rf"inet ({CONTROL_NET}\.\d+\.\d+)/30", sh("ip", "-o", "-4", "addr", "show")))
        for k in range(16384):
            net, host = f"{CONTROL_NET}.{k // 64}", (k % 64) * 4
            a, b = f"{net}.{host + 1}", f"{net}.{host + 2}"
            if a not in used:
                break
        else:
            raise TestbedError("no free control subnet")
        dev = f"{PREFIX}{self.tag}-k{len(self._control)}"  # 15 characters: the most a name may have
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", "ctl0", "netns", self.netns(node))
        self._control[node] = (dev, a, b)
        sh("ip", "addr", "add", f"{a}/30", "dev", dev)
        sh("ip", "link", "set", dev, "up")
        sh("ip", "-n", self.netns(node), "addr", "add", f"{b}/30", "dev", "ctl0")
        sh("ip", "-n", self.netns(node), "link", "set", "ctl0", "up")

    def down(self) -> None:
        """Kill every process of every node, then remove cgroups, namespaces, links and the registry entry.

        Safe to call twice and after a failed :meth:`up`."""
        with self._lock:
            for t in self._timers:
                t.cancel()
            if not self._up:
                return
            self._up = False  # a link_up timer already running finds it down and does nothing
        _remove(self.tag)

    def _register(self) -> None:
        """Write this testbed's registry entry (read back by :func:`registered`)."""
        entry = {"owner": self._owner, "nodes": list(self.nodes),
                 "control": {n: ip for n, (_, _, ip) in self._control.items()}}
        (REGISTRY / f"{self.tag}.json").write_text(json.dumps(entry))

    # --- shaping -------------------------------------------------------------------
    def _shape(self, node: Node) -> None:
        for ns, dev in ((self.netns(node.name), "eth0"), (self.hub, f"p-{node.name}")):
            if node.link.mbit is None:
                sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                continue
            rate_bytes = node.link.mbit * 1e6 / 8
            # The bucket must hold at least a timer tick's worth of bytes at this rate (HZ >= 100).
            burst = max(32 * 1024, int(rate_bytes / 100))
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{node.link.mbit}mbit",
               "burst", str(burst), "latency", f"{self.queue_ms}ms")

    def _write_rules(self) -> None:
        lines = []
        for node in self.nodes.values():
            port = f"p-{node.name}"
            if not node.link.up:
                lines += [f'iifname "{port}" drop', f'oifname "{port}" drop']
            elif node.link.loss > 0:
                # numgen counts in basis points so that 0.5 % is exact.
                bp = round(node.link.loss * 100)
                lines += [f'iifname "{port}" numgen random mod 10000 < {bp} drop',
                          f'oifname "{port}" numgen random mod 10000 < {bp} drop']
        body = "\n    ".join(lines)
        ruleset = (f"table bridge psytb\nflush table bridge psytb\n"
                   f"table bridge psytb {{\n  chain links {{\n    type filter hook forward priority 0; policy accept;\n"
                   f"    {body}\n  }}\n}}\n")
        sh("ip", "netns", "exec", self.hub, "nft", "-f", "-", input=ruleset)

    def set_link(self, node: str, link: Link) -> None:
        """Change ``node``'s link (rate, loss, up) now, while its processes run (nothing once torn down)."""
        with self._lock:
            if not self._up:
                return
            self.nodes[node] = replace(self._node(node), link=link)
            self._shape(self.nodes[node])
            self._write_rules()

    def link_down(self, node: str, *, for_seconds: float | None = None) -> None:
        """Cut ``node``'s link (every packet to or from it is dropped); back up after ``for_seconds`` if given."""
        self.set_link(node, replace(self._node(node).link, up=False))
        if for_seconds is not None:
            timer = threading.Timer(for_seconds, self.link_up, args=(node,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def link_up(self, node: str) -> None:
        """Restore ``node``'s link."""
        self.set_link(node, replace(self._node(node).link, up=True))

    def set_cpu(self, node: str, cpu: float | None) -> None:
        """Change ``node``'s CPU share (cores; None: no limit) now, while its processes run."""
        with self._lock:
            self.nodes[node] = replace(self._node(node), cpu=cpu)
            cgroup_set_cpu(self.cgroup(node), cpu)

    # --- processes -----------------------------------------------------------------
    def spawn(self, node: str, argv: list[str], *, log: Path | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` on ``node``: in its namespace and cgroup, in a session of its own;
        output to ``log`` (appended) if given."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            return subprocess.Popen(["ip", "netns", "exec", self.netns(node), *argv], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                    preexec_fn=functools.partial(cgroup_join, self.cgroup(node)))
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]

    def pids(self, node: str) -> list[int]:
        """The processes running on ``node``."""
        return cgroup_pids(self.cgroup(node))

    def bytes(self, node: str) -> tuple[int, int]:
        """(bytes sent, bytes received) on ``node``'s link to the bridge so far."""
        return interface_bytes(self.netns(node), "eth0")


def _remove(tag: str) -> None:
    """Remove everything of testbed ``tag``: processes (through its cgroups), namespaces, control links."""
    cgroup_remove(CGROUP_CPU / f"{PREFIX}{tag}")
    for ns in netns_list():
        if ns.startswith(f"{PREFIX}{tag}-"):
            sh("ip", "netns", "del", ns, check=False)
    for dev in links_in_root(f"{PREFIX}{tag}"):
        sh("ip", "link", "del", dev, check=False)
    (REGISTRY / f"{tag}.json").unlink(missing_ok=True)


def leftovers() -> list[str]:
    """What testbeds left on this machine: namespaces, root links, cgroups (empty when all is clean)."""
    found = [f"netns {n}" for n in netns_list() if n.startswith(PREFIX)]
    found += [f"link {d}" for d in links_in_root(PREFIX)]
    if CGROUP_CPU.exists():
        found += [f"cgroup {p}" for p in CGROUP_CPU.glob(f"{PREFIX}*")]
    return found


@dataclass(frozen=True)
class Registration:
    """A testbed's registry entry: its ``owner`` process (None: kept until ``psyche testbed
    down``), its nodes and their control addresses; ``problem`` says why an entry could not be read."""

    tag: str
    owner: int | None = None
    nodes: tuple[str, ...] = ()
    control: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def registered() -> list[Registration]:
    """The testbeds this machine's registry names, by tag."""
    found = []
    for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.exists() else []:
        try:
            entry = json.loads(path.read_text())
            owner = entry["owner"]
            if owner is not None and not (isinstance(owner, int) and owner >= 0):
                raise ValueError(f"owner {owner!r} is not a process id")
            found.append(Registration(path.stem, owner, tuple(entry["nodes"]), dict(entry.get("control", {}))))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            found.append(Registration(path.stem, problem=f"unreadable registry entry {path}: {exc}"))
    return found


def sweep(*, everything: bool = False) -> list[str]:
    """Remove testbeds whose owning process is gone (``everything``: all of them); return their tags."""
    tags: set[str] = set()
    for reg in registered():
        if everything or reg.problem is not None or (reg.owner is not None and not _owner_alive(reg.owner)):
            tags.add(reg.tag)
    if everything:
        # Also what no registry entry names (a registry lost with /run).
        names = [n for n in netns_list() if n.startswith(PREFIX)]
        names += [p.name for p in CGROUP_CPU.glob(f"{PREFIX}*")] if CGROUP_CPU.exists() else []
        names += links_in_root(PREFIX)
        tags |= {n[len(PREFIX):].split("-")[0] for n in names}
    for tag in sorted(tags):
        _remove(tag)
    return sorted(tags)
