"""The consoles every command prints through: what others wrote prints as text, never as markup."""

from __future__ import annotations

import io

from rich.console import Console

from psyche.console import line_printer


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=400, color_system=None), buf


def test_a_line_with_a_stray_closing_tag_prints_as_it_is():
    # The exception text a killed gloo peer gives: rich reads "[/...]" as a closing tag and raised.
    out, buf = _console()
    say = line_printer("[dim]ab12cd34[/]", out)
    message = "step 7: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Connection closed by peer"
    say(message)
    assert buf.getvalue() == f"ab12cd34 {message}\n"


def test_markup_in_a_message_is_shown_not_applied():
    out, buf = _console()
    line_printer("serve:", out)("[bold]loaded[/bold] checkpoint [step 3]")
    assert buf.getvalue() == "serve: [bold]loaded[/bold] checkpoint [step 3]\n"
