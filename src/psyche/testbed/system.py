"""The kernel's tools the testbed drives: ``ip``, ``tc``, ``nft`` and the cgroup v1 ``cpu`` controller.

Every call here is a command or a file write on this machine; the rest of the
testbed decides what to ask. Nothing leaves the namespaces and the control
links the testbed creates.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000


class TestbedError(RuntimeError):
    """A testbed command failed; the message names the command and what it printed."""

    __test__ = False  # not a pytest test class


class TestbedUnavailable(TestbedError):
    """This machine cannot host a testbed (not root, or a kernel feature or tool is missing)."""


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    """Run one command; return its stdout. Raises :class:`TestbedError` with its stderr if it fails."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def missing_requirement() -> str | None:
    """Why this machine cannot host a testbed (one line), or None if it can."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, tc, nftables, cgroups)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package})"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU} (cpu.cfs_quota_us)"
    probe = f"psyprobe-{os.getpid()}"  # outside the testbeds' prefix: never taken for one
    try:
        sh("ip", "netns", "add", probe)
    except TestbedError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        sh("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        sh("tc", "-n", probe, "qdisc", "replace", "dev", "p0", "root", "tbf", "rate", "10mbit", "burst", "32kb",
           "latency", "100ms")
        sh("ip", "netns", "exec", probe, "nft", "add", "table", "bridge", "probe")
    except TestbedError as exc:
        return f"a kernel feature the testbed needs is missing: {exc}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def netns_list() -> list[str]:
    """Names of this machine's named network namespaces."""
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def links_in_root(prefix: str) -> list[str]:
    """Interfaces of the root namespace whose name starts with ``prefix``."""
    names = []
    for line in sh("ip", "-o", "link", "show").splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(prefix):
            names.append(name)
    return names


def interface_bytes(netns: str, dev: str) -> tuple[int, int]:
    """(bytes sent, bytes received) by ``dev`` in ``netns`` since it was created."""
    out = sh("ip", "netns", "exec", netns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes",
             f"/sys/class/net/{dev}/statistics/rx_bytes")
    tx, rx = out.split()
    return int(tx), int(rx)


# --- cgroup v1 cpu ------------------------------------------------------------------

def cgroup_create(path: Path, cpu: float | None) -> None:
    """Create the cgroup ``path`` with a CPU quota of ``cpu`` cores (None: no limit)."""
    path.mkdir(parents=True, exist_ok=True)
    cgroup_set_cpu(path, cpu)


def cgroup_set_cpu(path: Path, cpu: float | None) -> None:
    """Give the cgroup ``path`` ``cpu`` cores' worth of time per period (None: no limit)."""
    (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    quota = -1 if cpu is None else max(1000, int(cpu * CFS_PERIOD_US))
    (path / "cpu.cfs_quota_us").write_text(str(quota))


def cgroup_pids(path: Path) -> list[int]:
    """Processes in the cgroup ``path`` (none if it is gone)."""
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def cgroup_join(path: Path) -> None:
    """Move the calling process into the cgroup ``path`` (for ``preexec_fn``: the child, before exec)."""
    with open(path / "cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def cgroup_remove(path: Path, *, timeout: float = 10.0) -> None:
    """SIGKILL every process in the cgroup ``path`` and its children, then remove them."""
    if not path.exists():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        cgroup_remove(child, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(path)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except OSError as exc:
            # EBUSY while killed processes are still exiting.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise TestbedError(f"cannot remove cgroup {path}: {exc} (processes left: {pids})") from exc
        time.sleep(0.05)
