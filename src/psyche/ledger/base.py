"""The ledger interface: where a run's coordinator state lives and how instructions reach it.

Three hosts implement it (see DESIGN.md): ``embedded`` (in-process), ``server``
(HTTP + WebSocket, SQLite) and ``solana`` (transactions replayed from a chain).
The client runtime only ever talks to a :class:`Ledger`, so it behaves the same on
all three. Each host supplies the clock (``now``) and the round seed, and maps
coordinator errors one for one onto its own transport (HTTP status, Solana log).

Exception tree, grouped by what the caller can do::

    LedgerError
    ├── InstructionRefused   the coordinator refused it (named error); do not retry as is
    └── LedgerUnavailable    the host could not be reached or timed out; retry later
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the coordinator package imports no I/O; keep this module light too
    from psyche.coordinator import Coordinator, Instruction


MetricsReport = dict[str, float]
"""One client's metrics for one step: ``step`` and numbers such as ``loss`` or ``tokens_per_sec``."""


class LedgerError(Exception):
    """Base of every error a ledger raises."""


class InstructionRefused(LedgerError):
    """The coordinator refused an instruction: ``error`` is its named error (e.g. ``NotAMember``)."""

    def __init__(self, error: str, message: str):
        self.error = error
        self.message = message
        super().__init__(f"{error}: {message}")


class LedgerUnavailable(LedgerError):
    """The host could not be reached, or did not answer in time. Retrying later may work."""


class Ledger(abc.ABC):
    """One run's coordinator, as seen by one participant (whose key signs what it submits)."""

    run_id: str

    @abc.abstractmethod
    async def submit(self, instruction: Instruction) -> None:
        """Send one instruction signed by this participant; return once the host applied it.

        Raises :class:`InstructionRefused` if the coordinator refused it, and
        :class:`LedgerUnavailable` if the host could not be reached.
        """

    @abc.abstractmethod
    async def state(self) -> Coordinator:
        """The latest coordinator state this participant knows (fetching it if needed)."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[Coordinator]:
        """Yield the coordinator each time its state changes (at least once, at once)."""

    @abc.abstractmethod
    async def report(self, report: MetricsReport) -> None:
        """Send this participant's metrics for one step (``report["step"]``), for dashboards.

        Which hosts keep them: ``server`` stores them (SQLite) for its dashboard, status
        API and Prometheus metrics; ``embedded`` keeps them in memory on the ledger
        (``EmbeddedLedger.reports``); ``solana`` has no metrics channel and drops them.
        Raises :class:`LedgerUnavailable` if the host could not be reached (the caller
        may keep the report and send it later) and :class:`InstructionRefused` if the
        host will not take it (e.g. from a non-member).
        """

    async def close(self) -> None:
        """Release connections; the run itself is unaffected."""
