"""How the Solana ledger talks to a chain: one small async interface, two implementations.

- :class:`RpcChain` speaks the standard Solana JSON-RPC through the ``solana``
  package's client: a real cluster's URL, or ``psyche localnet``.
- :class:`SvmChain` drives a :class:`~psyche.ledger.solana.validator.LocalValidator`
  in this process (tests and benchmarks: no sockets, slots closed on demand).

Everything above this module (replay, the ledger, the CLI) only sees
:class:`Chain`, so the code that runs against LiteSVM in a test is the code that
runs against a cluster. Errors::

    ChainRefused        the chain refused a transaction (preflight failure, bad
                        blockhash, duplicate, no funds); ``program_error`` is our
                        program's custom error code when it was the one refusing
    LedgerUnavailable   (from psyche.ledger.base) the endpoint did not answer
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Protocol

from solders.hash import Hash
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction

from psyche.ledger.base import LedgerError, LedgerUnavailable
from psyche.ledger.solana.validator import LocalValidator, RecordedTx, TxRejected


class ChainRefused(LedgerError):
    """The chain refused a transaction before it landed. ``program_error``: our custom code, if any."""

    def __init__(self, message: str, *, program_error: int | None = None, logs: list[str] | None = None):
        super().__init__(message)
        self.program_error = program_error
        self.logs = logs or []


def custom_error_code(err: object) -> int | None:
    """Our program's ``Custom(code)`` inside a Solana transaction error (solders object or text)."""
    m = re.search(r"Custom\((\d+)\)|custom program error: 0x([0-9a-fA-F]+)", str(err))
    if not m:
        return None
    return int(m.group(1)) if m.group(1) else int(m.group(2), 16)


@dataclass(frozen=True)
class TopInstruction:
    """One top-level instruction of a transaction, with its accounts resolved to addresses."""

    program_id: Pubkey
    accounts: list[Pubkey]
    data: bytes


@dataclass(frozen=True)
class ChainTx:
    """A confirmed transaction as the replay needs it (whatever the source)."""

    signature: Signature
    slot: int
    block_time: int | None
    failed: bool
    error: str | None
    instructions: list[TopInstruction]
    return_data: tuple[Pubkey, bytes] | None
    compute_units: int | None
    fee: int
    size: int
    """Serialized transaction bytes (what the chain stores)."""


def _top_instructions(vtx: VersionedTransaction, loaded: list[Pubkey]) -> list[TopInstruction]:
    keys = list(vtx.message.account_keys) + loaded
    out = []
    for ix in vtx.message.instructions:
        accounts = [keys[i] for i in ix.accounts if i < len(keys)]
        out.append(TopInstruction(keys[ix.program_id_index], accounts, bytes(ix.data)))
    return out


def from_recorded(t: RecordedTx) -> ChainTx:
    """A transaction recorded by the in-process validator, as the replay reads it."""
    rd = (t.return_data.program_id, bytes(t.return_data.data)) if t.return_data is not None else None
    return ChainTx(t.signature, t.slot, t.block_time, t.err is not None, None if t.err is None else str(t.err),
                   _top_instructions(t.transaction, []), rd, t.compute_units, t.fee, len(bytes(t.transaction)))


class Chain(Protocol):
    """What the Solana ledger needs from a chain endpoint."""

    async def latest_blockhash(self) -> Hash: ...

    async def send(self, tx: Transaction, *, skip_preflight: bool = False) -> Signature:
        """Submit a signed transaction; :class:`ChainRefused` if refused before landing."""
        ...

    async def wait_confirmed(self, sig: Signature, *, timeout: float = 30.0) -> tuple[int, str | None]:
        """Wait until ``sig`` is confirmed; return ``(slot, error or None)``."""
        ...

    async def history(self, address: Pubkey, *, until: Signature | None = None) -> list[Signature]:
        """Confirmed signatures naming ``address`` after ``until``, oldest first (ledger order)."""
        ...

    async def transaction(self, sig: Signature) -> ChainTx: ...

    async def block_hash(self, slot: int) -> bytes: ...

    async def account_data(self, address: Pubkey) -> bytes | None: ...

    async def latest_time(self) -> int:
        """Block time of the newest confirmed block (the chain's clock)."""
        ...

    async def balance(self, address: Pubkey) -> int: ...

    async def airdrop(self, address: Pubkey, lamports: int) -> None: ...

    async def rent_exempt(self, size: int) -> int: ...

    async def close(self) -> None: ...


class SvmChain:
    """A :class:`LocalValidator` in this process. ``auto_confirm`` closes the slot when someone waits on it."""

    def __init__(self, validator: LocalValidator | None = None, *, auto_confirm: bool = True):
        self.validator = validator or LocalValidator()
        self.auto_confirm = auto_confirm

    async def latest_blockhash(self) -> Hash:
        return self.validator.latest_blockhash()[0]

    async def send(self, tx: Transaction, *, skip_preflight: bool = False) -> Signature:
        try:
            return self.validator.send(tx, preflight=not skip_preflight)
        except TxRejected as exc:
            raise ChainRefused(str(exc), program_error=custom_error_code(exc.err), logs=exc.logs) from None

    async def wait_confirmed(self, sig: Signature, *, timeout: float = 30.0) -> tuple[int, str | None]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.validator.status(sig)
            if st is None:
                raise ChainRefused(f"transaction {sig} is unknown to the chain")
            slot, err, confirmed = st
            if confirmed:
                return slot, None if err is None else str(err)
            if self.auto_confirm:
                self.validator.end_slot()
                continue
            if time.monotonic() > deadline:
                raise LedgerUnavailable(f"transaction {sig} not confirmed within {timeout}s")
            await asyncio.sleep(0.01)

    async def history(self, address: Pubkey, *, until: Signature | None = None) -> list[Signature]:
        return [t.signature for t in reversed(self.validator.signatures_for(address, until=until, limit=1 << 62))]

    async def transaction(self, sig: Signature) -> ChainTx:
        t = self.validator.transaction(sig)
        if t is None:
            raise LedgerUnavailable(f"transaction {sig} not found")
        return from_recorded(t)

    async def block_hash(self, slot: int) -> bytes:
        return bytes(self.validator.blocks[slot].blockhash)

    async def account_data(self, address: Pubkey) -> bytes | None:
        acc = self.validator.account(address)
        return None if acc is None else bytes(acc.data)

    async def latest_time(self) -> int:
        return self.validator.blocks[self.validator.confirmed_slot].block_time if self.validator.blocks else \
            self.validator.block_time

    async def balance(self, address: Pubkey) -> int:
        return self.validator.balance(address)

    async def airdrop(self, address: Pubkey, lamports: int) -> None:
        await self.wait_confirmed(self.validator.airdrop(address, lamports))

    async def rent_exempt(self, size: int) -> int:
        return self.validator.rent_exempt(size)

    async def close(self) -> None:
        return None


class RpcChain:
    """A Solana JSON-RPC endpoint (a cluster, or ``psyche localnet``), through the ``solana`` client."""

    def __init__(self, url: str, *, commitment: str = "confirmed", timeout: float = 10.0):
        from solana.rpc.async_api import AsyncClient
        from solana.rpc.commitment import Commitment

        self.url = url
        self.commitment = Commitment(commitment)  # ValueError for a level Solana has not
        self.client = AsyncClient(url, commitment=self.commitment, timeout=timeout)
        self._block_hashes: dict[int, bytes] = {}

    async def _call(self, what: str, coro):
        from solana.exceptions import SolanaRpcException
        from solana.rpc.core import RPCException

        try:
            return await coro
        except RPCException as exc:
            detail = exc.args[0] if exc.args else exc
            raise ChainRefused(f"{what}: {_rpc_message(detail)}", program_error=custom_error_code(detail),
                               logs=_rpc_logs(detail)) from None
        except (SolanaRpcException, OSError) as exc:
            raise LedgerUnavailable(f"{what}: Solana RPC {self.url} unreachable: {exc}") from exc
        except Exception as exc:  # httpx errors surface under several names
            if type(exc).__module__.startswith("httpx"):
                raise LedgerUnavailable(f"{what}: Solana RPC {self.url} unreachable: {exc}") from exc
            raise

    async def latest_blockhash(self) -> Hash:
        return (await self._call("getLatestBlockhash", self.client.get_latest_blockhash())).value.blockhash

    async def send(self, tx: Transaction, *, skip_preflight: bool = False) -> Signature:
        from solana.rpc.models import TxOpts

        opts = TxOpts(skip_preflight=skip_preflight, preflight_commitment=self.commitment)
        return (await self._call("sendTransaction", self.client.send_raw_transaction(bytes(tx), opts))).value

    async def wait_confirmed(self, sig: Signature, *, timeout: float = 30.0) -> tuple[int, str | None]:
        deadline = time.monotonic() + timeout
        wanted = {"confirmed", "finalized"} if self.commitment != "finalized" else {"finalized"}
        while True:
            resp = await self._call("getSignatureStatuses", self.client.get_signature_statuses([sig]))
            st = resp.value[0]
            if st is not None and st.confirmation_status is not None and _status_name(st.confirmation_status) in wanted:
                return st.slot, None if st.err is None else str(st.err)
            if time.monotonic() > deadline:
                raise LedgerUnavailable(f"transaction {sig} not confirmed within {timeout}s")
            await asyncio.sleep(0.1)

    async def history(self, address: Pubkey, *, until: Signature | None = None) -> list[Signature]:
        newest_first: list[Signature] = []
        before = None
        while True:
            resp = await self._call("getSignaturesForAddress", self.client.get_signatures_for_address(
                address, before=before, until=until, limit=1000, commitment=self.commitment))
            page = resp.value
            newest_first += [s.signature for s in page]
            if len(page) < 1000:
                break
            before = page[-1].signature
        return list(reversed(newest_first))

    async def transaction(self, sig: Signature) -> ChainTx:
        resp = await self._call("getTransaction", self.client.get_transaction(
            sig, encoding="base64", commitment=self.commitment, max_supported_transaction_version=0))
        v = resp.value
        if v is None:
            raise LedgerUnavailable(f"transaction {sig} not found at {self.url}")
        vtx = v.transaction.transaction
        meta = v.transaction.meta
        loaded: list[Pubkey] = []
        if meta is not None and meta.loaded_addresses is not None:
            loaded = list(meta.loaded_addresses.writable) + list(meta.loaded_addresses.readonly)
        rd = None
        if meta is not None and meta.return_data is not None:
            rd = (meta.return_data.program_id, bytes(meta.return_data.data))
        err = None if meta is None or meta.err is None else str(meta.err)
        return ChainTx(sig, v.slot, v.block_time, err is not None, err, _top_instructions(vtx, loaded), rd,
                       None if meta is None else meta.compute_units_consumed, 0 if meta is None else meta.fee,
                       len(bytes(vtx)))

    async def block_hash(self, slot: int) -> bytes:
        if slot not in self._block_hashes:
            resp = await self._call("getBlock", self.client.get_block(
                slot, encoding="base64", max_supported_transaction_version=0, transaction_details=_details_none(),
                rewards=False, commitment=self.commitment))
            self._block_hashes[slot] = bytes(resp.value.blockhash)
        return self._block_hashes[slot]

    async def account_data(self, address: Pubkey) -> bytes | None:
        resp = await self._call("getAccountInfo", self.client.get_account_info(address, commitment=self.commitment))
        return None if resp.value is None else bytes(resp.value.data)

    async def latest_time(self) -> int:
        slot = (await self._call("getSlot", self.client.get_slot(commitment=self.commitment))).value
        t = (await self._call("getBlockTime", self.client.get_block_time(slot))).value
        return int(t) if t is not None else int(time.time())

    async def balance(self, address: Pubkey) -> int:
        return (await self._call("getBalance", self.client.get_balance(address, commitment=self.commitment))).value

    async def airdrop(self, address: Pubkey, lamports: int) -> None:
        sig = (await self._call("requestAirdrop", self.client.request_airdrop(address, lamports))).value
        await self.wait_confirmed(sig)

    async def rent_exempt(self, size: int) -> int:
        return (await self._call("getMinimumBalanceForRentExemption",
                                 self.client.get_minimum_balance_for_rent_exemption(size))).value

    async def close(self) -> None:
        await self.client.close()


def _details_none():
    from solders.transaction_status import TransactionDetails

    return TransactionDetails.None_


def _status_name(status: object) -> str:
    return str(status).rsplit(".", 1)[-1].lower()


def _rpc_message(detail: object) -> str:
    return str(getattr(detail, "message", detail))


def _rpc_logs(detail: object) -> list[str]:
    data = getattr(detail, "data", None)
    logs = getattr(data, "logs", None)
    return list(logs) if logs else []


def connect(url_or_chain: str | Chain, *, commitment: str = "confirmed") -> Chain:
    """A :class:`Chain` for an RPC URL (or the chain itself, passed through)."""
    if isinstance(url_or_chain, str):
        return RpcChain(url_or_chain, commitment=commitment)
    return url_or_chain
