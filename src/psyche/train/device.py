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
