"""The client side of the coordinator server: signed instructions over HTTP, state over WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from psyche.coordinator import Coordinator, Instruction, encode_instruction
from psyche.ledger.base import InstructionRefused, Ledger, LedgerUnavailable
from psyche.ledger.envelope import RequestKind, Signer, sign_request


class ServerLedger(Ledger):
    """A participant talking to ``psyche server`` at ``url`` for run ``run_id``.

    ``watch()`` reconnects on its own (with back-off) when the server restarts,
    and yields the state the server holds once it is back.
    """

    def __init__(self, url: str, run_id: str, signer: Signer, *, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.run_id = run_id
        self.signer = signer
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        # The server takes a signer's nonces only in increasing order, and requests sent at
        # once over several connections can arrive in any order: so one signed request at a
        # time, each signed when its turn comes.
        self._signed_post = asyncio.Lock()

    async def _post_signed(self, path: str, kind: RequestKind, body: bytes) -> None:
        async with self._signed_post:
            signed = sign_request(self.signer, self.run_id, kind, body)
            try:
                resp = await self._http.post(path, content=signed, headers={"content-type": "application/msgpack"})
            except httpx.TransportError as exc:
                raise LedgerUnavailable(f"cannot reach coordinator server {self.url}: {exc!r}") from exc
        self._raise_for(resp)

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code == 200:
            return
        if resp.status_code >= 500:
            raise LedgerUnavailable(f"coordinator server error {resp.status_code}: {resp.text[:200]}")
        try:
            detail = resp.json()
            raise InstructionRefused(str(detail.get("error", resp.status_code)), str(detail.get("message", "")))
        except (json.JSONDecodeError, AttributeError):
            raise InstructionRefused(str(resp.status_code), resp.text[:200]) from None

    async def submit(self, instruction: Instruction) -> None:
        await self._post_signed(f"/api/runs/{self.run_id}/instructions", "instruction", encode_instruction(instruction))

    async def report(self, report: dict) -> None:
        """Send this client's metrics for a step (shown by the dashboard and `psyche demo`)."""
        await self._post_signed(f"/api/runs/{self.run_id}/reports", "report", json.dumps(report).encode())

    async def state(self) -> Coordinator:
        try:
            resp = await self._http.get(f"/api/runs/{self.run_id}/state")
        except httpx.TransportError as exc:
            raise LedgerUnavailable(f"cannot reach coordinator server {self.url}: {exc!r}") from exc
        if resp.status_code != 200:
            self._raise_for(resp)
        return Coordinator.from_bytes(resp.content)

    async def status(self) -> dict:
        """The run's JSON status (the same as ``GET /api/runs/{run_id}``)."""
        try:
            resp = await self._http.get(f"/api/runs/{self.run_id}")
        except httpx.TransportError as exc:
            raise LedgerUnavailable(f"cannot reach coordinator server {self.url}: {exc!r}") from exc
        self._raise_for(resp)
        return resp.json()

    async def watch(self) -> AsyncIterator[Coordinator]:
        ws_url = "ws" + self.url[len("http"):] + f"/api/runs/{self.run_id}/ws"
        backoff = 0.2
        while True:
            try:
                async with ws_connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=5) as ws:
                    backoff = 0.2
                    async for message in ws:
                        if isinstance(message, bytes):
                            yield Coordinator.from_bytes(message)
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError):
                pass
            # The server went away (restart, network): try again, a little slower each time.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        await self._http.aclose()
