"""What `psyche demo` writes and prints from a finished run's status."""

from __future__ import annotations

import json

import pytest

from psyche.demo import run_summary_line, write_metrics


def _status() -> dict:
    hist = []
    for step in range(1, 11):
        row = {"step": step, "loss": 9.0 - step / 10, "tokens_per_sec": 5000.0, "bytes_per_step": 3 * 6000,
               "clients": 3, "compression_ratio": 1200.0}
        if step in (1, 5, 10):
            row["val_loss"] = {1: 8.5, 5: 7.9, 10: 7.25}[step]
        hist.append(row)
    return {"state": "Finished", "step": 10, "history": hist}


def test_metrics_file_has_one_row_per_step_with_val_loss_where_measured(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert write_metrics(_status(), path) == 10
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 5, 10]
    assert set(rows[0]) == {"step", "loss", "tokens_per_sec", "bytes_sent", "clients", "val_loss"}


def test_summary_line_names_the_loss_drop_and_the_bytes_saved():
    line = run_summary_line(_status())
    assert line == ("validation loss 8.50 → 7.25; 6,000 bytes of results per client per step, "
                    "1,200× fewer than an fp32 all-reduce")
    assert run_summary_line({"history": []}) is None


def _table_text(status: dict) -> str:
    from io import StringIO

    from rich.console import Console

    from psyche.demo import _progress_table

    out = StringIO()
    Console(file=out, width=160, color_system=None).print(_progress_table(status, "http://127.0.0.1:1"))
    return out.getvalue()


@pytest.mark.parametrize(("state", "step", "done", "shown"), [
    ("WaitingForMembers", 1, 0, "0/10"),  # nothing trained yet
    ("RoundTrain", 5, 4, "4/10"),         # step 5 trains: 4 are done
    ("RoundWitness", 10, 9, "9/10"),
    ("Finished", 10, 10, "10/10"),
])
def test_progress_table_counts_steps_done(state, step, done, shown):
    """The table shows the API's steps_completed (tests/test_step_numbers.py checks the API's count)."""
    text = _table_text({"run_id": "r", "state": state, "epoch": 0, "step": step, "steps_completed": done,
                        "total_steps": 10, "history": []})
    header = next(line for line in text.splitlines() if "state" in line and "epoch" in line)
    row = next(line for line in text.splitlines() if state in line)
    assert "steps done" in header
    assert row.split("│")[3].strip() == shown, text
