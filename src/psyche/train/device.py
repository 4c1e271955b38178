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
