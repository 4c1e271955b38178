"""Simulated participants that coordinate a run through real transactions on an in-process chain.

:class:`ChainSwarm` is the coordinator's honest-swarm simulator
(:class:`psyche.coordinator.sim.Swarm`) with its clients given real ed25519
keypairs: every instruction is a signed transaction executed by LiteSVM, the
clock is the chain's block time, and the coordinator the swarm acts on is the
replay of the run's confirmed transactions. Ticks are sent only when a phase
deadline has passed, as :class:`~psyche.ledger.solana.ledger.SolanaLedger` does.
Used by the tests and ``bench/solana.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from solders.keypair import Keypair
from solders.message import Message
from solders.transaction import Transaction

from psyche.coordinator import CoordinatorError, CoordinatorSettings, Instruction, encode_instruction, phase_deadline
from psyche.coordinator import sim
from psyche.ledger.solana.chain import ChainTx, _from_recorded
from psyche.ledger.solana.replay import RunReplay
from psyche.ledger.solana.validator import LocalValidator
from psyche.ledger.solana.wire import (
    RUN_ACCOUNT_SIZE,
    create_run_instruction,
    encode_genesis,
    submit_instruction,
)


def swarm_keypair(i: int) -> Keypair:
    """Participant ``i``'s deterministic keypair."""
    return Keypair.from_seed(hashlib.sha256(b"psyche-chain-swarm" + i.to_bytes(4, "little")).digest())


class ChainSwarm(sim.Swarm):
    """Honest clients ``0..n-1`` and an authority, acting on a run through a :class:`LocalValidator`."""

    def __init__(self, run_id: str, settings: CoordinatorSettings, *, clients: int, now: int = 1_700_000_000,
                 validator: LocalValidator | None = None):
        self.validator = validator or LocalValidator()
        self.validator.clock = lambda: self.now
        self.now = now
        self.validator.end_slot()  # open a slot at the swarm's time
        self.authority = swarm_keypair(1_000_000)
        self.keypairs = {bytes(kp.pubkey()): kp for kp in [swarm_keypair(i) for i in range(clients)] + [self.authority]}
        for kp in self.keypairs.values():
            self.validator.airdrop(kp.pubkey(), 10**12)
        self.replay = RunReplay(run_id, self.validator.program_id)
        self.fetched: list[ChainTx] = []
        ix = create_run_instruction(self.authority.pubkey(), run_id, encode_genesis(settings, "swarm"),
                                    lamports=self.validator.rent_exempt(RUN_ACCOUNT_SIZE),
                                    program_id=self.validator.program_id)
        self._send(ix, self.authority)
        assert self.replay.coordinator is not None, "create-run did not replay"
        super().__init__(self.replay.coordinator, now=now, host_key=bytes(self.authority.pubkey()))

    @contextlib.contextmanager
    def _real_keys(self) -> Iterator[None]:
        # Swarm names its clients by sim.client_key(i); here client i is swarm_keypair(i).
        original = sim.client_key
        sim.client_key = lambda i: bytes(swarm_keypair(i).pubkey())
        try:
            yield
        finally:
            sim.client_key = original

    def _send(self, ix, kp: Keypair) -> ChainTx:
        v = self.validator
        if v.block_time != int(self.now):
            v.end_slot()  # a new block at the current time
        tx = Transaction([kp], Message([ix], kp.pubkey()), v.latest_blockhash()[0])
        sig = v.send(tx)
        block = v.end_slot()
        rec = _from_recorded(v.transaction(sig))
        self.replay.feed(rec, bytes(block.blockhash))
        self.fetched.append(rec)
        return rec

    def submit(self, instr: Instruction, signer: bytes) -> CoordinatorError | None:
        """Send ``instr`` as a transaction signed by ``signer``; return the coordinator's refusal, if any."""
        kp = self.keypairs[signer]
        body = encode_instruction(instr)
        rec = self._send(submit_instruction(kp.pubkey(), self.replay.address, body,
                                            program_id=self.validator.program_id), kp)
        outcome = self.replay.outcomes[rec.signature][-1]
        if outcome.error is None:
            self.log.append((body, signer, self.now, b""))
            return None
        err = CoordinatorError(f"{outcome.error}: {outcome.message}")
        self.refused.append((instr, signer, err))
        return err

    def tick(self) -> CoordinatorError | None:
        """Tick only when a phase deadline has passed (what members do on a real chain)."""
        deadline = phase_deadline(self.coord.state)
        if deadline is None or self.now < deadline:
            return None
        return super().tick()

    def join(self, clients) -> None:
        with self._real_keys():
            super().join(clients)

    def act(self) -> None:
        with self._real_keys():
            super().act()
