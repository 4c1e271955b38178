"""The ``psyche`` command.

Each subcommand validates its input once and turns a user error into one line
naming the field, peer or step, with a nonzero exit code and no traceback.
Heavy imports (torch, transformers, iroh) happen inside the command that needs
them, so ``psyche --help`` and ``psyche validate-config`` stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    name="psyche",
    help="Psyche in Python: train language models together over the internet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Psyche in Python: train language models together over the internet."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command("validate-config")
def validate_config(
    path: Annotated[Path, typer.Argument(help="A run config TOML file.")],
) -> None:
    """Check a run config; print OK or every violated rule with its field."""
    from psyche.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        err_console.print(f"[bold red]{len(exc.problems)} problem(s)[/] in {path}:", highlight=False)
        for p in exc.problems:
            err_console.print(f"  {p.field}: {p.message}", highlight=False, markup=False)
        raise typer.Exit(1)
    console.print(f"OK  {path}  (run {cfg.run_id}, digest {cfg.digest()[:12]})", highlight=False)


# Subcommands registered by their own modules' authors go below; keep each a thin
# wrapper that imports its implementation lazily.
# --- commands ---


def main() -> None:
    """Entry point of the ``psyche`` console script."""
    app()


if __name__ == "__main__":
    main()
