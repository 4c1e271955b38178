"""The embedded ledger: the coordinator lives in this process (tests, single-process tools)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from psyche.coordinator import Coordinator, Instruction
from psyche.ledger.base import InstructionRefused, Ledger, MetricsReport
from psyche.ledger.envelope import Signer
from psyche.ledger.host import RunHost


class EmbeddedLedger(Ledger):
    """One participant's view of a :class:`RunHost` in the same process.

    Instructions are attributed to ``signer.public_key`` without a signature
    check: in-process there is nobody to impersonate.
    """

    def __init__(self, host: RunHost, signer: Signer):
        self.host = host
        self.signer = signer
        self.run_id = host.run_id
        self.reports: list[MetricsReport] = []
        """The metrics reports this participant sent, in order: an embedded run has no
        dashboard or database, so they stay here for the process that holds the ledger."""

    async def submit(self, instruction: Instruction) -> None:
        err = self.host.apply(instruction, self.signer.public_key)
        if err is not None:
            raise InstructionRefused(type(err).__name__, str(err))

    async def report(self, report: MetricsReport) -> None:
        """Keep ``report`` in :attr:`reports` (never unavailable, never refused)."""
        self.reports.append(dict(report))

    async def state(self) -> Coordinator:
        # A copy, so a caller can never change the host's state by accident.
        return Coordinator.from_bytes(self.host.coordinator.to_bytes())

    async def watch(self) -> AsyncIterator[Coordinator]:
        while True:
            seq = self.host.seq
            yield await self.state()
            await self.host.wait_changed(seq)  # a change while the consumer held the state counts
