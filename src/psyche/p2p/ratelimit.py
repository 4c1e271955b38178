"""Bandwidth caps (pure): how long to wait before moving the next bytes.

One :class:`RateLimit` per direction per node, shared by every transfer in that
direction (result blobs and model parts alike), so the node as a whole stays
under the cap a contributor set for their link. It is a token bucket that may go
into debt: tokens accrue at ``rate`` bytes/s up to ``burst`` bytes, a
reservation takes its bytes at once, and the caller waits until the debt is
paid. So over any window of T seconds at most ``rate * T + burst`` bytes pass.
Time is passed in; nothing here sleeps.
"""

from __future__ import annotations

import re

MIN_BURST = 64 << 10
"""The bucket holds at least this many bytes, so one chunk of a transfer never waits on itself."""


class RateLimit:
    """A cap of ``rate`` bytes per second (None: no cap)."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate: float | None = None
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        """Change the cap (bytes/s > 0, or None for none); the bucket starts full."""
        if rate is not None and not rate > 0:
            raise ValueError(f"a rate limit must be > 0 bytes/s (or None for no limit), got {rate}")
        self.rate = None if rate is None else float(rate)
        self.burst = 0.0 if rate is None else max(float(MIN_BURST), float(rate) * 0.05)
        self._tokens = self.burst
        self._t: float | None = None

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` at time ``now``; returns the seconds to wait before moving them (0 uncapped)."""
        if self.rate is None or nbytes <= 0:
            return 0.0
        if self._t is not None and now > self._t:
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now if self._t is None else max(self._t, now)
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?(?:b|bytes?)?(?:/s|ps)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """Bytes per second from a human rate: ``"500000"``, ``"500K"``, ``"2.5M"``, ``"10MB/s"``,
    ``"1MiB/s"`` (K/M/G are powers of 1000, Ki/Mi/Gi of 1024; bytes, not bits).
    Raises ``ValueError`` saying what is accepted."""
    m = _RATE.match(text)
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()] if m else 0.0
    if not m or value <= 0:
        raise ValueError(f"{text!r} is not a rate: give bytes per second as a positive number with an "
                         "optional K, M or G (powers of 1000) or Ki, Mi, Gi (powers of 1024), e.g. 500K or 2.5MB/s")
    return value
