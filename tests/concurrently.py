"""Run one function in several threads released at the same moment (for race tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_at_once(fn: Callable[[], T], threads: int) -> list[T | Exception]:
    """Call ``fn`` in ``threads`` threads started together; each one's result or the exception it raised."""
    start = threading.Barrier(threads)
    got: list[T | Exception] = []

    def one() -> None:
        start.wait()
        try:
            got.append(fn())
        except Exception as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            got.append(exc)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return got
