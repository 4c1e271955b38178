"""How every ``psyche`` command talks to its user: output consoles, and refusals.

A refusal is one ``error:`` line on stderr (one per problem for a run config, each
naming the file, the field and the rule) and a nonzero exit code, never a
traceback. The command modules (``psyche.cli``, ``psyche.client.main``,
``psyche.ledger.solana.commands``) all refuse through :func:`fail` and
:func:`fail_config`, so every refusal reads the same.

This module imports only typer, rich and :mod:`psyche.identity`: the command
modules sit above it, and none of them imports another for its helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # imported where used: `psyche --help` loads neither pydantic nor cryptography
    from psyche.config import ConfigError
    from psyche.identity import Identity


def make_console(*, stderr: bool = False) -> Console:
    """A rich console that, when its output is a file or a pipe, never breaks a line:
    logs stay whole lines that grep finds (a terminal still wraps them for the eye)."""
    out = Console(stderr=stderr)
    out.soft_wrap = not out.is_terminal
    return out


console = make_console()
"""Where a command's results and progress go (stdout)."""
err_console = make_console(stderr=True)
"""Where refusals and failed checks go (stderr)."""


def line_printer(prefix: str, out: Console | None = None) -> Callable[[str], None]:
    """A function that prints one progress line ``PREFIX MESSAGE`` on ``out`` (default: :data:`console`).

    ``prefix`` may hold rich markup (``[dim]ab12cd34[/]``); a message is always plain text. It
    carries what others wrote, an exception's text or a server's answer: gloo's
    ``[/path/pair.cc:537]`` would otherwise read as a closing tag, and printing it would raise
    instead of saying it.
    """
    target = console if out is None else out

    def say(message: str) -> None:
        target.print(f"{prefix} {escape(message)}", highlight=False)

    return say


# A message is plain text: "[coordinator]" must print, not vanish as markup.
_say_error = line_printer("[bold red]error:[/]", err_console)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit with ``code``."""
    _say_error(message)
    raise typer.Exit(code)


def fail_config(exc: ConfigError) -> NoReturn:
    """Print one ``error:`` line per problem of ``exc`` (``SOURCE: field: rule``, see
    :meth:`ConfigError.lines`) and exit 1."""
    *first, last = exc.lines()
    for line in first:
        _say_error(line)
    fail(last)


def load_node_key(path: Path, *, create: bool = False) -> Identity:
    """The node key in ``path`` (created first if ``create`` and it is missing).

    Exits with one line naming the file and the problem (missing, too open, not a key).
    """
    from psyche.identity import Identity, IdentityError

    try:
        return Identity.load_or_create(path) if create else Identity.load(path)
    except IdentityError as exc:
        fail(f"--key {exc}")
    except OSError as exc:
        fail(f"--key {path}: {exc.strerror}")


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_term(text: str | None, now: int, *, option: str = "--expires") -> int:
    """The unix second a grant given at ``now`` ends, from a term: ``None`` or ``never`` (0: no
    end), seconds (``3600``), or a count of ``s``/``m``/``h``/``d``/``w`` (``30m``, ``7d``).
    Exits with one line naming ``option`` and what is accepted."""
    if text is None or text.strip().lower() == "never":
        return 0
    t = text.strip().lower()
    unit = _SECONDS.get(t[-1:], None)
    digits = t[:-1] if unit is not None else t
    if not digits.isdigit() or int(digits) == 0:
        fail(f"{option} {text!r}: give a term like 3600 (seconds), 30m, 12h, 7d or 2w, or never")
    return now + int(digits) * (unit or 1)


def parse_public_key(text: str, *, what: str = "KEY") -> bytes:
    """A 32-byte public key from what a user pastes or points at: 64 hex digits (as the dashboard
    and ``psyche keygen`` show it), a base58 Solana address, or a key file (a psyche node key, or
    a Solana keypair JSON). Exits with one line saying what is accepted."""
    t = text.strip()
    try:
        raw = bytes.fromhex(t)
        if len(raw) == 32:
            return raw
    except ValueError:
        pass
    path = Path(t)
    if path.is_file():
        return _key_file_public_key(path, what)
    try:
        from solders.pubkey import Pubkey

        return bytes(Pubkey.from_string(t))
    except (ImportError, ValueError):
        pass
    fail(f"{what} {text!r}: give a public key as 64 hex digits or a Solana address, or a key file")


def _key_file_public_key(path: Path, what: str) -> bytes:
    import json

    try:
        data = json.loads(path.read_text())
        if isinstance(data, list) and len(data) == 64:  # a Solana keypair: secret then public key
            return bytes(data[32:])
    except (ValueError, UnicodeDecodeError, OSError):
        pass
    from psyche.identity import Identity, IdentityError

    try:
        return Identity.load(path).public_key
    except IdentityError as exc:
        fail(f"{what} {exc}")
