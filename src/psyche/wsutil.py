"""WebSocket helpers shared by the server's state feed and the dashboard's live feeds."""

from __future__ import annotations

from starlette.websockets import WebSocket


async def until_closed(ws: WebSocket) -> None:
    """Return when the peer closes ``ws`` (or the server shuts down); its messages are ignored.

    A feed that only sends learns of a gone peer at its next send, which may never
    come (a Finished run never changes): awaited beside the feed's own wait, this
    ends the handler at once, so no handler outlives its connection or blocks a
    graceful shutdown.
    """
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass
