"""Which torch device a command may use, checked before any work starts."""

from __future__ import annotations

import torch

SUPPORTED = ("cpu", "cuda", "mps")


def device_problem(spec: str) -> str | None:
    """Why ``spec`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) cannot be used on this machine; None if it can.

    A client that only found out at warmup would already have joined a run, and
    be dropped from it for a mistake in its command line.
    """
    try:
        dev = torch.device(spec)
    except RuntimeError:
        return f"{spec!r} is not a device (use cpu, cuda or cuda:N)"
    if dev.type not in SUPPORTED:
        return f"{spec!r}: only {', '.join(SUPPORTED)} devices are supported"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{spec}: CUDA is not available here (torch {torch.__version__}); use cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"{spec}: MPS is not available here; use cpu"
    return None


def resolve_device(spec: str | None) -> str:
    """The device a command uses for ``spec``: ``auto`` (or None) picks cuda when this
    machine has it, else cpu; any other spec is returned as given (check it with
    :func:`device_problem`). Every command defaults to ``auto``, so they all agree."""
    if spec in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def node_devices(device: str, nproc: int | None = None, devices: str | None = None) -> list[str]:
    """The device of each rank of a node: ``devices`` (comma-separated, e.g. ``cuda:0,cuda:1``),
    or ``nproc`` ranks on ``device`` (``cuda`` → ``cuda:0 .. cuda:N-1``; ``cpu`` → N on the CPU).
    Raises ``ValueError`` naming the option and the rule.

    >>> node_devices("cpu", 2)
    ['cpu', 'cpu']
    >>> node_devices("cuda", 2)
    ['cuda:0', 'cuda:1']
    >>> node_devices("cpu", None, "cuda:1,cuda:0")
    ['cuda:1', 'cuda:0']
    """
    if devices is not None:
        listed = [d.strip() for d in devices.split(",") if d.strip()]
        if not listed:
            raise ValueError("--devices: give at least one device (e.g. cuda:0,cuda:1)")
        if nproc is not None and nproc != len(listed):
            raise ValueError(f"--nproc-per-node {nproc} does not match the {len(listed)} device(s) of --devices")
        for d in listed:
            try:
                torch.device(d)
            except RuntimeError:
                raise ValueError(f"--devices: {d!r} is not a device (use cpu, cuda:N or mps)") from None
        kinds = {torch.device(d).type for d in listed}
        if len(kinds) > 1:
            raise ValueError(f"--devices: all ranks of a node use one kind of device (got {', '.join(listed)})")
        gpus = [d for d in listed if torch.device(d).type == "cuda"]
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"--devices: each GPU may be listed once (got {', '.join(listed)})")
        return listed
    n = 1 if nproc is None else nproc
    if n < 1:
        raise ValueError(f"--nproc-per-node must be >= 1 (got {n})")
    kind = torch.device(device)
    if kind.type == "cuda":
        if n > 1 and kind.index is not None:
            raise ValueError(f"--nproc-per-node {n} with --device {device}: name the GPUs with --devices instead")
        return [device] if n == 1 else [f"cuda:{i}" for i in range(n)]
    if kind.type != "cpu" and n > 1:
        raise ValueError(f"--nproc-per-node {n}: several ranks run on CPU or CUDA devices only (not {device})")
    return [device] * n
