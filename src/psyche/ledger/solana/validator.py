"""A local Solana chain: LiteSVM (the real Solana VM, in-process) plus blocks and history.

LiteSVM executes transactions but has no notion of blocks. :class:`LocalValidator`
adds what a client of a real cluster relies on: numbered slots closed one after
another, each with its own block hash and block time (from ``clock``), a window
of recent block hashes that transactions may reference, transactions recorded in
ledger order (failed ones too, as a validator records them when preflight is
skipped), an index of signatures per address, and confirmation when a slot
closes. ``psyche localnet`` serves it over JSON-RPC; tests and the benchmark use
it in-process. Not thread-safe: drive it from one thread (one event loop).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from solders.account import Account
from solders.clock import Clock
from solders.hash import Hash
from solders.litesvm import LiteSVM
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import TransactionErrorType, TransactionReturnData

from psyche.ledger.solana.wire import DEFAULT_PROGRAM_ID

MAX_BLOCKHASH_AGE = 150
"""Blocks a transaction's recent blockhash stays valid for (as on mainnet)."""


class TxRejected(Exception):
    """The validator refused a transaction before recording it (preflight, bad blockhash, duplicate...).

    ``err`` is the Solana transaction error (a solders object) or ``None`` for a
    plain refusal; ``logs`` and ``units`` come from the simulation when it ran.
    """

    def __init__(self, message: str, *, err: TransactionErrorType | None = None, logs: list[str] | None = None, units: int | None = None):
        super().__init__(message)
        self.err = err
        self.logs = logs or []
        self.units = units


@dataclass(frozen=True)
class RecordedTx:
    """One transaction as it landed: in ``slot`` at position ``index``, failed if ``err`` is set."""

    signature: Signature
    slot: int
    index: int
    block_time: int
    transaction: VersionedTransaction
    err: TransactionErrorType | None
    logs: list[str]
    compute_units: int
    return_data: TransactionReturnData | None
    fee: int
    pre_balances: list[int]
    post_balances: list[int]


@dataclass
class Block:
    """A closed slot: its hash, parent hash, time, and its transactions in order."""

    slot: int
    parent_slot: int
    blockhash: Hash
    previous_blockhash: Hash
    block_time: int
    signatures: list[Signature] = field(default_factory=list)


class LocalValidator:
    """LiteSVM with slots, block hashes, block times and a searchable transaction history."""

    def __init__(
        self,
        *,
        program: bytes | None = None,
        program_id: Pubkey = DEFAULT_PROGRAM_ID,
        clock: Callable[[], float] = time.time,
    ):
        if program is None:
            from psyche.ledger.solana.build import program_elf

            program = program_elf()
        self.clock = clock
        self.program_id = program_id
        # Our own blockhash window replaces LiteSVM's (which accepts only the latest hash).
        self.svm = LiteSVM().with_blockhash_check(False).with_transaction_history(0)
        self.svm.add_program(program_id, program)
        self.blocks: dict[int, Block] = {}
        self.txs: dict[Signature, RecordedTx] = {}
        self.by_address: dict[Pubkey, list[Signature]] = {}
        self.statuses: dict[Signature, tuple[int, TransactionErrorType | None]] = {}  # every landed signature: (slot, err)
        self.genesis_slot = self.svm.get_clock().slot
        self.slot = self.genesis_slot
        self._recent: deque[Hash] = deque([self.svm.latest_blockhash()], maxlen=MAX_BLOCKHASH_AGE)
        self._pending: list[RecordedTx] = []
        self._open_slot()

    # -- slots ---------------------------------------------------------------
    def _open_slot(self) -> None:
        self.block_time = int(self.clock())
        c = self.svm.get_clock()
        self.svm.set_clock(Clock(self.slot, c.epoch_start_timestamp, c.epoch, c.leader_schedule_epoch, self.block_time))

    def end_slot(self) -> Block:
        """Close the open slot into a block (its transactions become confirmed) and open the next."""
        previous = self._recent[-1]
        self.svm.expire_blockhash()
        block = Block(self.slot, self.slot - 1, self.svm.latest_blockhash(), previous, self.block_time,
                      [t.signature for t in self._pending])
        self.blocks[self.slot] = block
        self._recent.append(block.blockhash)
        for t in self._pending:
            self.txs[t.signature] = t
            for key in t.transaction.message.account_keys:
                self.by_address.setdefault(key, []).append(t.signature)
        self._pending = []
        self.slot += 1
        self._open_slot()
        return block

    @property
    def pending(self) -> int:
        """Transactions in the open slot (not confirmed yet)."""
        return len(self._pending)

    @property
    def confirmed_slot(self) -> int:
        """The newest closed slot."""
        return self.slot - 1

    def latest_blockhash(self) -> tuple[Hash, int]:
        """The newest block hash and the last block height at which it is still accepted."""
        return self._recent[-1], self.slot + MAX_BLOCKHASH_AGE

    # -- transactions --------------------------------------------------------
    def send(self, tx: Transaction | VersionedTransaction, *, preflight: bool = True) -> Signature:
        """Execute ``tx`` in the open slot and record it; return its signature.

        With ``preflight`` a transaction that would fail is refused unrecorded
        (:class:`TxRejected`), as an RPC node's preflight check does; without, it
        lands failed (fee charged, no effect) like on a real cluster.
        """
        vtx = tx if isinstance(tx, VersionedTransaction) else VersionedTransaction.from_legacy(tx)
        sig = vtx.signatures[0]
        if sig in self.statuses:
            raise TxRejected("This transaction has already been processed")
        if vtx.message.recent_blockhash not in self._recent:
            raise TxRejected("Blockhash not found")
        if preflight:
            sim = self.svm.simulate_transaction(vtx)
            if isinstance(sim, FailedTransactionMetadata):
                meta = sim.meta()
                raise TxRejected(f"Transaction simulation failed: {sim.err()}", err=sim.err(), logs=list(meta.logs()),
                                 units=meta.compute_units_consumed())
        keys = list(vtx.message.account_keys)
        pre = [self.svm.get_balance(k) or 0 for k in keys]
        result = self.svm.send_transaction(vtx)
        if isinstance(result, FailedTransactionMetadata):
            err, meta = result.err(), result.meta()
            if meta.fee() == 0 and not meta.logs():
                # Refused before execution (bad signature, unknown account...): never lands.
                raise TxRejected(f"Transaction refused: {err}", err=err)
        else:
            err, meta = None, result
        post = [self.svm.get_balance(k) or 0 for k in keys]
        rd = meta.return_data()
        rec = RecordedTx(sig, self.slot, len(self._pending), self.block_time, vtx, err, list(meta.logs()),
                         meta.compute_units_consumed(), rd if rd.data else None, meta.fee(), pre, post)
        self._pending.append(rec)
        self.statuses[sig] = (self.slot, err)
        return sig

    def status(self, sig: Signature) -> tuple[int, TransactionErrorType | None, bool] | None:
        """``(slot, err, confirmed)`` of a landed signature, or ``None`` if unknown."""
        if sig not in self.statuses:
            return None
        slot, err = self.statuses[sig]
        return slot, err, slot < self.slot

    def transaction(self, sig: Signature) -> RecordedTx | None:
        """A confirmed transaction by signature."""
        return self.txs.get(sig)

    def signatures_for(self, address: Pubkey, *, before: Signature | None = None, until: Signature | None = None,
                       limit: int = 1000) -> list[RecordedTx]:
        """Confirmed transactions naming ``address``, newest first (like ``getSignaturesForAddress``)."""
        sigs = self.by_address.get(address, [])
        out: list[RecordedTx] = []
        started = before is None
        for s in reversed(sigs):
            if not started:
                started = s == before
                continue
            if s == until:
                break
            out.append(self.txs[s])
            if len(out) >= limit:
                break
        return out

    # -- accounts ------------------------------------------------------------
    def account(self, address: Pubkey) -> Account | None:
        """An account's current state, or ``None`` if it does not exist."""
        acc = self.svm.get_account(address)
        return acc if acc is not None and (acc.lamports > 0 or acc.data) else None

    def balance(self, address: Pubkey) -> int:
        """Lamports held by ``address`` (0 if absent)."""
        return self.svm.get_balance(address) or 0

    def airdrop(self, address: Pubkey, lamports: int) -> Signature:
        """Credit ``lamports`` to ``address`` from the faucet; confirmed with the open slot."""
        result = self.svm.airdrop(address, lamports)
        if isinstance(result, FailedTransactionMetadata):
            raise TxRejected(f"airdrop failed: {result.err()}", err=result.err())
        sig = result.signature()
        self.statuses[sig] = (self.slot, None)
        return sig

    def rent_exempt(self, size: int) -> int:
        """Lamports an account of ``size`` data bytes needs to be rent-exempt."""
        return self.svm.minimum_balance_for_rent_exemption(size)
