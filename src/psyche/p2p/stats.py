"""Per-peer traffic statistics for the dashboard (pure accumulators; time is passed in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class PeerStats:
    """What this node has exchanged with one peer since it started."""

    bytes_in: int = 0
    """Payload bytes received from the peer (blobs, model parts, messages)."""
    bytes_out: int = 0
    """Payload bytes sent to the peer."""
    messages_in: int = 0
    """Envelopes received from the peer (including duplicates)."""
    messages_out: int = 0
    """Envelopes pushed to the peer (including re-sends)."""
    throughput_in: float = 0.0
    """Moving average (bytes/s) of download speed over recent transfers from the peer."""
    throughput_out: float = 0.0
    """Moving average (bytes/s) of upload speed over recent transfers to the peer."""
    rtt_ms: float | None = None
    """Latest round-trip time reported by the transport, in milliseconds."""
    bad_blobs: int = 0
    """Blobs or parts from this peer that were oversized, truncated or had a wrong hash."""
    failures: int = 0
    """Connects, streams or requests to this peer that failed or stalled."""
    last_seen: float | None = None
    """Monotonic time of the last successful exchange."""
    throttled_out_s: float = 0.0
    """Seconds uploads to this peer waited on this node's upload cap (``--max-upload-rate``)."""
    throttled_in_s: float = 0.0
    """Seconds downloads from this peer waited on this node's download cap (``--max-download-rate``)."""

    def record_in(self, nbytes: int, seconds: float, *, now: float) -> None:
        """Account a completed download of ``nbytes`` that took ``seconds`` (its bytes were
        already counted in ``bytes_in`` as they arrived)."""
        self.last_seen = now
        if seconds > 0 and nbytes >= 4096:  # tiny transfers say nothing about bandwidth
            self.throughput_in = _ewma(self.throughput_in, nbytes / seconds)

    def record_out(self, nbytes: int, seconds: float, *, now: float) -> None:
        """Account a completed upload of ``nbytes`` that took ``seconds``."""
        self.bytes_out += nbytes
        self.last_seen = now
        if seconds > 0 and nbytes >= 4096:
            self.throughput_out = _ewma(self.throughput_out, nbytes / seconds)

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _ewma(old: float, sample: float, alpha: float = 0.3) -> float:
    return sample if old == 0.0 else (1 - alpha) * old + alpha * sample
