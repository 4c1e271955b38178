"""This machine's TCP ports: one that is free, and why one cannot be listened on."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` right now (None if it could)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # As uvicorn binds: connections of a server that just stopped (TIME_WAIT) do not count.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None
