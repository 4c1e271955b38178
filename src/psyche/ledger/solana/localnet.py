"""``psyche localnet``: a local Solana cluster on loopback — LiteSVM behind the standard JSON-RPC.

Serves the JSON-RPC methods the ``solana`` client (and :class:`RpcChain`) use —
``sendTransaction``, ``simulateTransaction``, ``getLatestBlockhash``,
``getSignatureStatuses``, ``getSignaturesForAddress``, ``getTransaction``,
``getBlock``, ``getBlockTime``, ``getSlot``, ``getBlockHeight``,
``requestAirdrop``, ``getAccountInfo``, ``getBalance``,
``getMinimumBalanceForRentExemption``, ``getHealth``, ``getVersion`` — from a
:class:`LocalValidator` that closes a slot every ``slot_time`` seconds, with wall
time as block time. Responses are built with ``solders``' own RPC types, so they
have the shape a real cluster's have. Our program is deployed at start.

Only loopback by default: it is a development chain with a free faucet.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Callable
from typing import Any

from solders.pubkey import Pubkey
from solders.rpc.responses import (
    GetAccountInfoResp,
    GetBlockResp,
    GetSignaturesForAddressResp,
    GetSignatureStatusesResp,
    GetTransactionResp,
    RpcConfirmedTransactionStatusWithSignature,
    RpcResponseContext,
)
from solders.signature import Signature
from solders.transaction import Legacy, VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import (
    EncodedConfirmedTransactionWithStatusMeta,
    EncodedTransactionWithStatusMeta,
    TransactionConfirmationStatus,
    TransactionErrorType,
    TransactionStatus,
    UiConfirmedBlock,
    UiTransactionStatusMeta,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from psyche.ledger.solana.validator import LocalValidator, RecordedTx, TxRejected

API_VERSION = "2.1.0"


class RpcError(Exception):
    """A JSON-RPC error answer (``code`` as Solana's RPC uses them)."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.data = data


def _result(solders_resp: Any) -> Any:
    """The ``result`` member of a solders response object."""
    return json.loads(solders_resp.to_json())["result"]


def _err_json(err: TransactionErrorType | None) -> Any:
    """A transaction error in its JSON-RPC form (e.g. ``{"InstructionError": [0, {"Custom": 3}]}``)."""
    if err is None:
        return None
    status = TransactionStatus(0, None, None, err, None)
    return json.loads(GetSignatureStatusesResp([status], RpcResponseContext(0)).to_json())["result"]["value"][0]["err"]


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        n = n * 58 + _B58.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def _decode_tx(data: str, encoding: str) -> VersionedTransaction:
    raw = base64.b64decode(data) if encoding == "base64" else _b58decode(data)
    try:
        return VersionedTransaction.from_bytes(raw)
    except Exception as exc:  # solders raises its own parse error types
        raise RpcError(-32602, f"invalid transaction: {exc}") from None


class LocalnetRpc:
    """The JSON-RPC method table over one :class:`LocalValidator`."""

    def __init__(self, validator: LocalValidator):
        self.v = validator
        self.methods: dict[str, Callable[..., Any]] = {
            name: getattr(self, name) for name in dir(self) if name.startswith("get") or name in (
                "sendTransaction", "simulateTransaction", "requestAirdrop")
        }

    def _ctx(self) -> dict:
        return {"slot": self.v.confirmed_slot, "apiVersion": API_VERSION}

    def handle(self, request: dict) -> dict:
        """Answer one JSON-RPC request object."""
        rid = request.get("id")
        method = request.get("method")
        params = request.get("params") or []
        fn = self.methods.get(method) if isinstance(method, str) else None
        try:
            if fn is None:
                raise RpcError(-32601, f"Method not found: {method}")
            return {"jsonrpc": "2.0", "result": fn(*params), "id": rid}
        except RpcError as exc:
            err: dict[str, Any] = {"code": exc.code, "message": str(exc)}
            if exc.data is not None:
                err["data"] = exc.data
            return {"jsonrpc": "2.0", "error": err, "id": rid}
        except (TypeError, ValueError) as exc:
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": f"Invalid params: {exc}"}, "id": rid}

    # -- cluster -------------------------------------------------------------
    def getHealth(self, *_: Any) -> str:
        return "ok"

    def getVersion(self, *_: Any) -> dict:
        return {"solana-core": f"{API_VERSION} (psyche localnet)", "feature-set": 0}

    def getSlot(self, *_: Any) -> int:
        return self.v.confirmed_slot

    def getBlockHeight(self, *_: Any) -> int:
        return self.v.confirmed_slot

    def getLatestBlockhash(self, *_: Any) -> dict:
        h, last_valid = self.v.latest_blockhash()
        return {"context": self._ctx(), "value": {"blockhash": str(h), "lastValidBlockHeight": last_valid}}

    def getMinimumBalanceForRentExemption(self, size: int, *_: Any) -> int:
        return self.v.rent_exempt(int(size))

    def getBlockTime(self, slot: int, *_: Any) -> int:
        block = self.v.blocks.get(int(slot))
        if block is None:
            raise RpcError(-32004, f"Block not available for slot {slot}")
        return block.block_time

    def getBlock(self, slot: int, config: dict | None = None, *_: Any) -> dict:
        block = self.v.blocks.get(int(slot))
        if block is None:
            raise RpcError(-32004, f"Block not available for slot {slot}")
        details = (config or {}).get("transactionDetails", "full")
        if details not in ("none", "signatures"):
            raise RpcError(-32602, f"transactionDetails {details!r} not supported by psyche localnet (use none or signatures)")
        sigs = block.signatures if details == "signatures" else None
        ui = UiConfirmedBlock(block.previous_blockhash, block.blockhash, block.parent_slot, None, sigs, None,
                              block.block_time, block.slot - self.v.genesis_slot)
        return _result(GetBlockResp(ui))

    # -- accounts ------------------------------------------------------------
    def getBalance(self, address: str, *_: Any) -> dict:
        return {"context": self._ctx(), "value": self.v.balance(Pubkey.from_string(address))}

    def getAccountInfo(self, address: str, config: dict | None = None, *_: Any) -> dict:
        encoding = (config or {}).get("encoding", "base64")
        if encoding != "base64":
            raise RpcError(-32602, f"encoding {encoding!r} not supported by psyche localnet (use base64)")
        acc = self.v.account(Pubkey.from_string(address))
        return _result(GetAccountInfoResp(acc, RpcResponseContext(self.v.confirmed_slot, API_VERSION)))

    def requestAirdrop(self, address: str, lamports: int, *_: Any) -> str:
        try:
            return str(self.v.airdrop(Pubkey.from_string(address), int(lamports)))
        except TxRejected as exc:
            raise RpcError(-32600, str(exc)) from None

    # -- transactions --------------------------------------------------------
    def sendTransaction(self, data: str, config: dict | None = None, *_: Any) -> str:
        config = config or {}
        tx = _decode_tx(data, config.get("encoding", "base58"))
        try:
            return str(self.v.send(tx, preflight=not config.get("skipPreflight", False)))
        except TxRejected as exc:
            sim = {"err": _err_json(exc.err), "logs": exc.logs, "accounts": None, "unitsConsumed": exc.units,
                   "returnData": None, "innerInstructions": None}
            raise RpcError(-32002, str(exc), sim) from None

    def simulateTransaction(self, data: str, config: dict | None = None, *_: Any) -> dict:
        config = config or {}
        tx = _decode_tx(data, config.get("encoding", "base58"))
        sim = self.v.svm.simulate_transaction(tx)
        meta = sim.meta()
        err = sim.err() if isinstance(sim, FailedTransactionMetadata) else None
        return {"context": self._ctx(), "value": {"err": _err_json(err), "logs": list(meta.logs()), "accounts": None,
                                                  "unitsConsumed": meta.compute_units_consumed(), "returnData": None}}

    def getSignatureStatuses(self, sigs: list[str], *_: Any) -> dict:
        value: list[TransactionStatus | None] = []
        for s in sigs:
            st = self.v.status(Signature.from_string(s))
            if st is None:
                value.append(None)
                continue
            slot, err, confirmed = st
            level = TransactionConfirmationStatus.Confirmed if confirmed else TransactionConfirmationStatus.Processed
            value.append(TransactionStatus(slot, None if confirmed else 0, err, err, level))
        return _result(GetSignatureStatusesResp(value, RpcResponseContext(self.v.confirmed_slot, API_VERSION)))

    def getSignaturesForAddress(self, address: str, config: dict | None = None, *_: Any) -> list:
        config = config or {}
        before = Signature.from_string(config["before"]) if config.get("before") else None
        until = Signature.from_string(config["until"]) if config.get("until") else None
        limit = min(int(config.get("limit") or 1000), 1000)
        txs = self.v.signatures_for(Pubkey.from_string(address), before=before, until=until, limit=limit)
        items = [RpcConfirmedTransactionStatusWithSignature(t.signature, t.slot, t.err, None, t.block_time,
                                                            TransactionConfirmationStatus.Confirmed, t.index)
                 for t in txs]
        return _result(GetSignaturesForAddressResp(items))

    def getTransaction(self, sig: str, config: dict | str | None = None, *_: Any) -> dict | None:
        encoding = config if isinstance(config, str) else (config or {}).get("encoding", "json")
        if encoding != "base64":
            raise RpcError(-32602, f"encoding {encoding!r} not supported by psyche localnet (use base64)")
        t = self.v.transaction(Signature.from_string(sig))
        return None if t is None else _tx_json(t)


def _tx_json(t: RecordedTx) -> dict:
    meta = UiTransactionStatusMeta(t.err, t.fee, t.pre_balances, t.post_balances, None, t.logs, None, None, None, None,
                                   t.return_data, t.compute_units)
    enc = EncodedConfirmedTransactionWithStatusMeta(
        t.slot, EncodedTransactionWithStatusMeta(t.transaction, meta, Legacy.Legacy), t.block_time, t.index)
    out = _result(GetTransactionResp(enc))
    if t.err is not None:  # solders fills status Ok; a real node reports the error there too
        out["meta"]["status"] = {"Err": out["meta"]["err"]}
    return out


def make_app(validator: LocalValidator) -> Starlette:
    """The ASGI app: JSON-RPC 2.0 (single or batch) on ``POST /``."""
    rpc = LocalnetRpc(validator)

    async def endpoint(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return Response(json.dumps({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"},
                                        "id": None}), media_type="application/json")
        if isinstance(body, list):
            answer: Any = [rpc.handle(r) for r in body]
        else:
            answer = rpc.handle(body)
        return Response(json.dumps(answer), media_type="application/json")

    async def health(_: Request) -> Response:
        return Response("ok")

    return Starlette(routes=[Route("/", endpoint, methods=["POST"]), Route("/health", health, methods=["GET"])])


async def serve(*, host: str = "127.0.0.1", port: int = 8899, slot_time: float = 0.4,
                on_ready: Callable[[str, LocalValidator], None] | None = None) -> None:
    """Run a localnet until cancelled: build the program, start LiteSVM, serve JSON-RPC on ``host:port``.

    ``port`` 0 picks a free port; ``on_ready(url, validator)`` is called once serving.
    """
    import uvicorn

    validator = LocalValidator()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(make_app(validator), log_level="warning", lifespan="off"))

    async def produce_slots() -> None:
        while True:
            await asyncio.sleep(slot_time)
            validator.end_slot()

    slots = asyncio.create_task(produce_slots())
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if on_ready is not None and server.started:
        on_ready(url, validator)
    try:
        await serving
    finally:
        slots.cancel()
