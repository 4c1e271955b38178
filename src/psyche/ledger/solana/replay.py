"""A run's coordinator state, rebuilt from its confirmed transactions (no I/O).

:class:`RunReplay` is fed the run's transactions in ledger order, with the hash
of the block each landed in. For every entry our program recorded in the run
account it extends the same hash chain the program keeps, and applies the entry
to the coordinator with the block time as ``now`` and a seed derived from the
block hash and the transaction signature (unknown to the sender when it signs,
so no one picks committees by grinding). What changes nothing:

- a failed transaction (refused by the program, or any other failure);
- an entry before the run was created, or a malformed instruction;
- an instruction the coordinator refuses (non-member, wrong phase, ...).

Each becomes an :class:`Outcome` naming why, and every replayer reaches the same
state. If the chain the program returned (``count | chain`` in the return data)
disagrees with the replay's, the endpoint served an incomplete or reordered
history: :class:`ReplayError`, never a silently different state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from solders.pubkey import Pubkey
from solders.signature import Signature

from psyche.coordinator import Coordinator, LogEntry, apply_entry
from psyche.ledger.solana.chain import ChainTx
from psyche.ledger.solana.wire import (
    DEFAULT_PROGRAM_ID,
    KIND_CREATE_RUN,
    RunAccount,
    chain_step,
    decode_genesis,
    parse_envelope,
    parse_return_data,
    run_address,
)

SEED_DOMAIN = b"psyche-solana-seed-v1"


class ReplayError(Exception):
    """The history served is inconsistent with what the program recorded (missing, reordered or altered entries)."""


def entry_seed(address: Pubkey, block_hash: bytes, signature: Signature, seq: int) -> bytes:
    """The coordinator seed for entry ``seq`` of the run at ``address``, landed in the block ``block_hash``."""
    return hashlib.sha256(SEED_DOMAIN + bytes(address) + block_hash + bytes(signature)
                          + seq.to_bytes(8, "little")).digest()


@dataclass(frozen=True)
class Outcome:
    """What one transaction (or one entry of it) did to the run.

    ``seq``: the entry number the program gave it (None: not recorded, e.g. failed).
    ``instruction``: the coordinator instruction's type name, when it decoded.
    ``error``: why it changed nothing (a coordinator error name, ``Malformed``,
    ``TransactionFailed``, ``NoRun``, ``BadGenesis``), or None if applied.
    """

    signature: Signature
    slot: int
    seq: int | None
    signer: bytes | None
    instruction: str | None
    error: str | None
    message: str = ""

    @property
    def applied(self) -> bool:
        return self.error is None


@dataclass
class RunReplay:
    """The replay of one run: feed it transactions in ledger order, read ``coordinator``."""

    run_id: str
    program_id: Pubkey = DEFAULT_PROGRAM_ID
    coordinator: Coordinator | None = None
    config_digest: str | None = None
    count: int = 0
    chain: bytes = bytes(32)
    outcomes: dict[Signature, list[Outcome]] = field(default_factory=dict)
    last_signature: Signature | None = None
    last_time: int = 0

    def __post_init__(self) -> None:
        self.address = run_address(self.run_id, self.program_id)[0]

    def feed(self, tx: ChainTx, block_hash: bytes) -> list[Outcome]:
        """Apply one confirmed transaction naming the run; return what each of its entries did."""
        self.last_signature = tx.signature
        if tx.block_time is not None:
            self.last_time = max(self.last_time, tx.block_time)
        if tx.failed:
            out = [Outcome(tx.signature, tx.slot, None, None, None, "TransactionFailed", tx.error or "")]
            self.outcomes[tx.signature] = out
            return out
        ours = [ix for ix in tx.instructions if ix.program_id == self.program_id and len(ix.accounts) >= 2]
        out = []
        for ix in ours:
            if ix.accounts[1] != self.address:
                continue
            try:
                env = parse_envelope(ix.data)
            except ValueError as exc:  # the program accepted it, so it must parse
                raise ReplayError(f"transaction {tx.signature}: recorded entry does not parse: {exc}") from None
            self.count += 1
            signer = bytes(ix.accounts[0])
            self.chain = chain_step(self.chain, self.count, signer, env.payload)
            if tx.block_time is None:
                raise ReplayError(f"transaction {tx.signature}: the endpoint gave no block time")
            out.append(self._apply(tx, env.kind, env.payload, signer, block_hash))
        if ours and ours[-1].accounts[1] == self.address and tx.return_data is not None \
                and tx.return_data[0] == self.program_id:
            count, chain = parse_return_data(tx.return_data[1])
            if (count, chain) != (self.count, self.chain):
                raise ReplayError(f"transaction {tx.signature}: the program recorded entry {count} but the replay is at "
                                  f"entry {self.count} with a different chain: the history served is incomplete or "
                                  "out of order")
        if not out:
            out = [Outcome(tx.signature, tx.slot, None, None, None, "NotForThisRun")]
        self.outcomes[tx.signature] = out
        return out

    def _apply(self, tx: ChainTx, kind: int, payload: bytes, signer: bytes, block_hash: bytes) -> Outcome:
        now = tx.block_time or 0
        if kind == KIND_CREATE_RUN:
            # The program creates the account once, so this is entry 1.
            try:
                genesis = decode_genesis(payload)
                self.coordinator = Coordinator.new(self.run_id, genesis.settings, signer, now)
                self.config_digest = genesis.config_digest
            except ValueError as exc:
                return Outcome(tx.signature, tx.slot, self.count, signer, "CreateRun", "BadGenesis", str(exc))
            return Outcome(tx.signature, tx.slot, self.count, signer, "CreateRun", None)
        if self.coordinator is None:
            return Outcome(tx.signature, tx.slot, self.count, signer, None, "NoRun", "the run has no valid genesis")
        entry = LogEntry(payload, signer, now, entry_seed(self.address, block_hash, tx.signature, self.count))
        try:
            instr, err = apply_entry(self.coordinator, entry)
        except ValueError as exc:
            return Outcome(tx.signature, tx.slot, self.count, signer, None, "Malformed", str(exc))
        name = type(instr).__name__
        if err is not None:
            return Outcome(tx.signature, tx.slot, self.count, signer, name, err.name, err.message)
        return Outcome(tx.signature, tx.slot, self.count, signer, name, None)

    def verify_account(self, data: bytes | None) -> bool | None:
        """Check the replay against the run account: True if it holds the same entry count and chain.

        None when the account has moved on since the history was read (retry after
        reading more); False means the history served does not match the chain.
        """
        if data is None:
            return self.count == 0
        acc = RunAccount.parse(data)
        if acc.count > self.count:
            return None
        return acc.count == self.count and acc.chain == self.chain
