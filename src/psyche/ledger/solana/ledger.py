"""The Solana ledger host: a run lives on chain, its state is the replay of its transactions.

:class:`SolanaLedger` implements :class:`psyche.ledger.base.Ledger` for one
participant whose Solana keypair is also its client id (an ed25519 key):

- ``submit`` sends the instruction as a transaction to our program, waits for
  confirmation, replays up to it and raises :class:`InstructionRefused` if the
  coordinator refused it (it is then on chain, and changed nothing);
- ``state``/``watch`` replay whatever new transactions the run has;
- with ``auto_tick`` a member sends a ``Tick`` when a phase deadline (by chain
  time) has passed: there is no host to tick, so members do, staggered by their
  rank so one usually suffices.

Creating, pausing and resuming a run are ordinary transactions too
(:func:`create_run`; ``Pause``/``Resume`` through ``submit`` by the authority).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction

from psyche.coordinator import Coordinator, CoordinatorSettings, Instruction, Tick, encode_instruction, phase_deadline
from psyche.ledger.base import InstructionRefused, Ledger, LedgerUnavailable, MetricsReport
from psyche.ledger.solana.chain import Chain, ChainRefused, ChainTx, connect
from psyche.ledger.solana.replay import Outcome, ReplayError, RunReplay
from psyche.ledger.solana.wire import (
    DEFAULT_PROGRAM_ID,
    PROGRAM_ERRORS,
    RUN_ACCOUNT_SIZE,
    create_run_instruction,
    encode_genesis,
    run_address,
    submit_instruction,
)

LOW_BALANCE = 10_000_000
"""Lamports below which a participant asks for an airdrop (where ``airdrop`` is on)."""


def _refusal(exc: ChainRefused) -> InstructionRefused:
    if exc.program_error is not None:
        name = PROGRAM_ERRORS.get(exc.program_error, f"ProgramError{exc.program_error}")
        return InstructionRefused(name, f"the run program refused the transaction: {exc}")
    return InstructionRefused("TransactionRefused", str(exc))


async def send_instruction(chain: Chain, keypair: Keypair, ix, *, skip_preflight: bool = False,
                           confirm_timeout: float = 30.0) -> tuple[Signature, int, str | None]:
    """Sign ``ix`` alone in a transaction paid by ``keypair``, send it, wait for confirmation.

    Returns ``(signature, slot, error)``; a stale blockhash is retried once with a
    fresh one. Raises :class:`ChainRefused` if it never landed.
    """
    for attempt in range(2):
        tx = Transaction([keypair], Message([ix], keypair.pubkey()), await chain.latest_blockhash())
        try:
            sig = await chain.send(tx, skip_preflight=skip_preflight)
        except ChainRefused as exc:
            if attempt == 0 and "lockhash not found" in str(exc):
                continue
            raise
        slot, err = await chain.wait_confirmed(sig, timeout=confirm_timeout)
        return sig, slot, err
    raise AssertionError("unreachable")


async def create_run(chain: Chain | str, keypair: Keypair, run_id: str, settings: CoordinatorSettings, *,
                     config_digest: str = "", program_id: Pubkey = DEFAULT_PROGRAM_ID,
                     airdrop: bool = False) -> Signature:
    """Create ``run_id`` on chain with ``keypair`` as its authority; return the transaction signature.

    Raises :class:`InstructionRefused` if the chain refuses it (e.g. ``CreateFailed``
    when the run already exists) and :class:`LedgerUnavailable` if unreachable.
    """
    chain = connect(chain)
    if airdrop and await chain.balance(keypair.pubkey()) < LOW_BALANCE:
        await chain.airdrop(keypair.pubkey(), 10 * LOW_BALANCE)
    if await chain.account_data(run_address(run_id, program_id)[0]) is not None:
        raise InstructionRefused("RunExists", f"run {run_id!r} already exists on this chain")
    lamports = await chain.rent_exempt(RUN_ACCOUNT_SIZE)
    ix = create_run_instruction(keypair.pubkey(), run_id, encode_genesis(settings, config_digest),
                                lamports=lamports, program_id=program_id)
    try:
        sig, _slot, err = await send_instruction(chain, keypair, ix)
    except ChainRefused as exc:
        raise _refusal(exc) from None
    if err is not None:
        raise InstructionRefused("TransactionFailed", err)
    return sig


class RunSync:
    """Keeps a :class:`RunReplay` up to date with the chain (shared by the ledger and the CLI)."""

    def __init__(self, chain: Chain, run_id: str, *, program_id: Pubkey = DEFAULT_PROGRAM_ID):
        self.chain = chain
        self.replay = RunReplay(run_id, program_id)
        self._lock = asyncio.Lock()
        self.fetched: list[ChainTx] = []

    async def sync(self) -> int:
        """Fetch and replay the run's new transactions; return how many were new."""
        async with self._lock:
            sigs = await self.chain.history(self.replay.address, until=self.replay.last_signature)
            # Fetch concurrently, apply strictly in ledger order.
            txs = await asyncio.gather(*(self.chain.transaction(s) for s in sigs))
            for tx in txs:
                block_hash = await self.chain.block_hash(tx.slot) if not tx.failed else b""
                self.replay.feed(tx, block_hash)
                self.fetched.append(tx)
            return len(txs)

    async def verify(self) -> bool | None:
        """Compare the replay with the run account (see :meth:`RunReplay.verify_account`)."""
        await self.sync()
        return self.replay.verify_account(await self.chain.account_data(self.replay.address))


class SolanaLedger(Ledger):
    """One participant's view of a run hosted on Solana (see the module docstring).

    ``chain``: an RPC URL or a :class:`Chain`. ``keypair``: the participant's
    Solana keypair (its public key is the client id). ``airdrop``: top up from
    the cluster's faucet when low (localnet, devnet).
    """

    def __init__(self, chain: Chain | str, run_id: str, keypair: Keypair, *,
                 program_id: Pubkey = DEFAULT_PROGRAM_ID, poll_interval: float = 0.25, auto_tick: bool = True,
                 tick_stagger: float = 1.0, airdrop: bool = False, confirm_timeout: float = 30.0):
        self.chain = connect(chain)
        self.run_id = run_id
        self.keypair = keypair
        self.program_id = program_id
        self.poll_interval = poll_interval
        self.auto_tick = auto_tick
        self.tick_stagger = tick_stagger
        self.airdrop = airdrop
        self.confirm_timeout = confirm_timeout
        self.sync = RunSync(self.chain, run_id, program_id=program_id)
        self.address = self.sync.replay.address
        self._funded = False
        self._ticked_for: str | None = None

    @property
    def client_id(self) -> bytes:
        """This participant's 32-byte id (its public key)."""
        return bytes(self.keypair.pubkey())

    async def _ensure_funds(self) -> None:
        if self.airdrop and not self._funded:
            if await self.chain.balance(self.keypair.pubkey()) < LOW_BALANCE:
                await self.chain.airdrop(self.keypair.pubkey(), 10 * LOW_BALANCE)
            self._funded = True

    async def submit_payload(self, payload: bytes, *, skip_preflight: bool = False) -> list[Outcome]:
        """Record raw ``payload`` bytes as a coordinator instruction; return what the replay made of it.

        The building block of :meth:`submit` (tests use it to send malformed bytes).
        """
        await self._ensure_funds()
        ix = submit_instruction(self.keypair.pubkey(), self.address, payload, program_id=self.program_id)
        try:
            sig, _slot, _err = await send_instruction(self.chain, self.keypair, ix, skip_preflight=skip_preflight,
                                                      confirm_timeout=self.confirm_timeout)
        except ChainRefused as exc:
            raise _refusal(exc) from None
        for _ in range(200):  # a confirmed transaction shows in the history at once (or very soon)
            await self._sync()
            if sig in self.sync.replay.outcomes:
                return self.sync.replay.outcomes[sig]
            await asyncio.sleep(self.poll_interval)
        raise LedgerUnavailable(f"transaction {sig} confirmed but missing from the run's history")

    async def submit(self, instruction: Instruction) -> None:
        await self._sync()
        if self.sync.replay.coordinator is None:
            raise InstructionRefused("NoRun", f"run {self.run_id!r} does not exist on this chain")
        outcomes = await self.submit_payload(encode_instruction(instruction))
        for o in outcomes:
            if o.error is not None:
                raise InstructionRefused(o.error, o.message or o.error)

    async def _sync(self) -> None:
        try:
            await self.sync.sync()
        except ReplayError:
            raise
        except ChainRefused as exc:
            raise LedgerUnavailable(str(exc)) from exc

    async def report(self, report: MetricsReport) -> None:
        """Drop ``report``: the chain holds the coordinator's state only, and paying a
        transaction per step's metrics would buy no dashboard anything it can read."""

    async def state(self) -> Coordinator:
        await self._sync()
        coord = self.sync.replay.coordinator
        if coord is None:
            raise LedgerUnavailable(f"run {self.run_id!r} not found on chain (yet)")
        return coord.copy()

    async def watch(self) -> AsyncIterator[Coordinator]:
        last = None
        while True:
            with contextlib.suppress(LedgerUnavailable):
                await self._sync()
            coord = self.sync.replay.coordinator
            if coord is not None:
                digest = coord.digest()
                if digest != last:
                    last = digest
                    yield coord.copy()
                if self.auto_tick:
                    with contextlib.suppress(LedgerUnavailable, InstructionRefused):
                        await self.tick_if_due()
            await asyncio.sleep(self.poll_interval)

    async def tick_if_due(self) -> bool:
        """Send a ``Tick`` if this participant is a member and the phase deadline has passed.

        Members wait ``rank * tick_stagger`` seconds past the deadline (rank: their
        position among the run's clients), so usually the first one's tick is the
        only one. Returns True if a tick was sent.
        """
        coord = self.sync.replay.coordinator
        if coord is None or not coord.is_member(self.client_id):
            return False
        deadline = phase_deadline(coord.state)
        if deadline is None:
            return False
        ids = [c.id for c in coord.state.clients] or list(coord.state.pending)
        rank = ids.index(self.client_id) if self.client_id in ids else len(ids)
        now = await self.chain.latest_time()
        digest = coord.digest()
        if now < deadline + rank * self.tick_stagger or self._ticked_for == digest:
            return False
        self._ticked_for = digest
        await self.submit_payload(encode_instruction(Tick()))
        return True

    async def close(self) -> None:
        await self.chain.close()
