"""Where a node's time goes: wall seconds per phase of its work, summed over a run.

The client's trainer wraps each kind of work (data, forward/backward, compressing,
verifying, checking results against their data, applying, evaluating, checkpointing) in
:meth:`PhaseTimer.phase`; the runtime turns the totals into a profile at the end of the run (``psyche client
--profile FILE``, read by ``bench/run.py``). Phases run in worker threads, so the
totals are kept under a lock.

>>> timer = PhaseTimer()
>>> with timer.phase("forward_backward"):
...     pass
>>> sorted(timer.totals())
['forward_backward']
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class PhaseTimer:
    """Wall seconds and call counts per named phase."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the wall time of the ``with`` block towards ``name`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` of work to ``name``."""
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._calls[name] = self._calls.get(name, 0) + 1

    def reset(self) -> None:
        """Forget everything counted so far (a profile's window starts now)."""
        with self._lock:
            self._seconds.clear()
            self._calls.clear()

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far."""
        with self._lock:
            return dict(self._seconds)

    def calls(self) -> dict[str, int]:
        """How many times each phase ran so far."""
        with self._lock:
            return dict(self._calls)


def profile(timer: PhaseTimer, *, wall_seconds: float, cpu_seconds: float, **extra) -> dict:
    """A JSON-ready profile: each phase's seconds and share of ``wall_seconds``, and what is left.

    ``utilization`` is the share of the wall time spent in forward/backward, the
    figure a GPU owner cares about; ``other`` is the wall time no phase claimed
    (waiting for the coordinator, for peers' results, or for a CPU).
    """
    totals = timer.totals()
    wall = max(wall_seconds, 1e-9)
    busy = sum(totals.values())
    phases = {name: {"seconds": round(s, 4), "share": round(s / wall, 4), "calls": timer.calls()[name]}
              for name, s in sorted(totals.items(), key=lambda kv: -kv[1])}
    return {
        "wall_s": round(wall_seconds, 3),
        "cpu_s": round(cpu_seconds, 3),
        "cpu_share": round(cpu_seconds / wall, 4),
        "utilization": round(totals.get("forward_backward", 0.0) / wall, 4),
        "phases": phases,
        "other": {"seconds": round(max(0.0, wall_seconds - busy), 4), "share": round(max(0.0, wall_seconds - busy) / wall, 4)},
        **extra,
    }
