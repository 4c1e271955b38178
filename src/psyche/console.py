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


def _say_error(message: str) -> None:
    # A message is plain text: "[coordinator]" must print, not vanish as markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


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
