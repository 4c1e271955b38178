"""Simulated participants that coordinate a run through real transactions on an in-process chain.

:class:`ChainSwarm` is the coordinator's honest-swarm simulator
(:class:`psyche.testing.coordinator_swarm.Swarm`) with its clients given real ed25519
keypairs: every instruction is a signed transaction executed by LiteSVM, the
clock is the chain's block time, and the coordinator the swarm acts on is the
replay of the run's confirmed transactions. Ticks are sent only when a phase
deadline has passed, as :class:`~psyche.ledger.solana.ledger.SolanaLedger` does.
Used by the tests and ``bench/solana.py``.
"""

from __future__ import annotations

import hashlib

from solders.instruction import Instruction as SolanaInstruction
from solders.keypair import Keypair
from solders.message import Message
from solders.transaction import Transaction

from psyche.coordinator import (
    CoordinatorError,
    CoordinatorSettings,
    Instruction,
    LogEntry,
    encode_instruction,
    phase_deadline,
)
from psyche.ledger.solana.chain import ChainTx, from_recorded
from psyche.ledger.solana.replay import RunReplay, entry_seed
from psyche.ledger.solana.validator import LocalValidator
from psyche.ledger.solana.wire import (
    RUN_ACCOUNT_SIZE,
    create_run_instruction,
    encode_genesis,
    submit_instruction,
)
from psyche.testing.coordinator_swarm import Swarm


def swarm_keypair(i: int) -> Keypair:
    """Participant ``i``'s deterministic keypair."""
    return Keypair.from_seed(hashlib.sha256(b"psyche-chain-swarm" + i.to_bytes(4, "little")).digest())


class ChainSwarm(Swarm):
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

    def key(self, i: int) -> bytes:
        """Client ``i``'s public key: that of :func:`swarm_keypair` ``(i)``."""
        return bytes(swarm_keypair(i).pubkey())

    def _send(self, ix: SolanaInstruction, kp: Keypair) -> tuple[ChainTx, bytes]:
        """Land ``ix`` signed by ``kp`` in a block of its own and feed it to the replay; the
        transaction as confirmed, and the hash of its block."""
        v = self.validator
        if v.block_time != int(self.now):
            v.end_slot()  # a new block at the current time
        tx = Transaction([kp], Message([ix], kp.pubkey()), v.latest_blockhash()[0])
        sig = v.send(tx)
        block = v.end_slot()
        landed = v.transaction(sig)
        assert landed is not None, "a sent transaction did not land"
        rec = from_recorded(landed)
        block_hash = bytes(block.blockhash)
        self.replay.feed(rec, block_hash)
        self.fetched.append(rec)
        return rec, block_hash

    def submit(self, instr: Instruction, signer: bytes) -> CoordinatorError | None:
        """Send ``instr`` as a transaction signed by ``signer``; return the coordinator's refusal, if any."""
        kp = self.keypairs[signer]
        body = encode_instruction(instr)
        rec, block_hash = self._send(submit_instruction(kp.pubkey(), self.replay.address, body,
                                                        program_id=self.validator.program_id), kp)
        outcome = self.replay.outcomes[rec.signature][-1]
        if outcome.error is None:
            assert outcome.seq is not None  # an applied entry was recorded
            seed = entry_seed(self.replay.address, block_hash, rec.signature, outcome.seq)
            self.log.append(LogEntry(body, signer, self.now, seed))
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
