"""One live document fanned out to many viewers, as a snapshot then deltas.

A :class:`Feed` holds the latest version of one JSON document (a run's status,
or the runs list). Whoever produces the document calls :meth:`Feed.publish`
once per change; the message frames are encoded once per version and the same
string goes to every viewer, so a push costs one encode however many watch.

A viewer that saw the previous version gets a small delta (changed top-level
keys, plus only the history rows that are new or changed); a new viewer, or
one that fell behind, gets the whole snapshot. :func:`status_delta` and
:func:`apply_delta` are the pure halves of that protocol (the page's
``apply_delta`` in ``static/dashboard.js`` mirrors the latter).

Wire messages (JSON text)::

    {"type": "snapshot", "v": 7, "data": {...}}
    {"type": "delta", "v": 8, "base": 7, "set": {...}, "unset": [...], "history": [...]}
    {"type": "ping", "v": 8}
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

HISTORY = "history"
"""The key of the per-step rows (each with an integer ``step``) that deltas send row by row."""

_json = msgspec.json.Encoder()


def encode(message: dict) -> str:
    """JSON text of a message; non-finite floats become ``null`` (browsers' JSON.parse
    rejects NaN)."""
    return _json.encode(message).decode()


def _steps_increasing(rows: list[dict]) -> bool:
    return all(a["step"] < b["step"] for a, b in zip(rows, rows[1:]))


def status_delta(prev: dict, new: dict) -> dict | None:
    """The changes that turn ``prev`` into ``new``, or None when only a snapshot can.

    The delta has ``set`` (top-level keys, other than ``history``, whose value
    changed or appeared), ``unset`` (keys gone) and ``history`` (rows of ``new``
    that are not in ``prev`` as-is). History rows must be sorted by a unique
    ``step``; a history that lost a step (a different run, a restart) has no
    delta. ``apply_delta(prev, status_delta(prev, new)) == new`` always holds.
    """
    old_rows = prev.get(HISTORY) or []
    new_rows = new.get(HISTORY) or []
    if not (_steps_increasing(old_rows) and _steps_increasing(new_rows)):
        return None
    if (HISTORY in prev) != (HISTORY in new):
        return None
    by_step = {r["step"]: r for r in new_rows}
    if any(r["step"] not in by_step for r in old_rows):
        return None
    old_by_step = {r["step"]: r for r in old_rows}
    rows = [r for r in new_rows if old_by_step.get(r["step"]) != r]
    changed = {k: v for k, v in new.items() if k != HISTORY and (k not in prev or prev[k] != v)}
    gone = [k for k in prev if k not in new]
    return {"set": changed, "unset": gone, HISTORY: rows}


def apply_delta(prev: dict, delta: dict) -> dict:
    """``prev`` with ``delta`` (from :func:`status_delta`) applied; ``prev`` is not changed."""
    out = {k: v for k, v in prev.items() if k not in delta.get("unset", ())}
    out.update(delta.get("set", {}))
    rows = delta.get(HISTORY) or []
    if rows or HISTORY in prev:
        merged = {r["step"]: r for r in prev.get(HISTORY) or []}
        merged.update({r["step"]: r for r in rows})
        out[HISTORY] = [merged[s] for s in sorted(merged)]
    return out


class Feed:
    """The latest version of one document and the frames that bring viewers up to it.

    Single event loop, no threads. ``viewers`` counts open subscriptions, so a
    producer can skip building documents nobody watches (:meth:`watched`).
    """

    def __init__(self, *, deltas: bool = True, on_subscribe: Callable[[], None] | None = None):
        self.deltas = deltas
        self.on_subscribe = on_subscribe
        self.version = 0
        self.doc: Any = None
        self.viewers = 0
        self._snapshot: str | None = None
        self._delta: str | None = None
        self._changed = asyncio.Event()
        self._watched = asyncio.Event()

    def publish(self, doc: Any) -> bool:
        """Make ``doc`` the latest version and wake every viewer; False (nothing sent) if
        it equals the current one."""
        if self.version and doc == self.doc:
            return False
        prev, self.doc = self.doc, doc
        self.version += 1
        self._snapshot = None
        self._delta = None
        if self.deltas and isinstance(prev, dict) and isinstance(doc, dict):
            delta = status_delta(prev, doc)
            if delta is not None:
                self._delta = encode({"type": "delta", "v": self.version, "base": self.version - 1, **delta})
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    def snapshot_frame(self) -> str:
        """The current version as one snapshot message (encoded once per version)."""
        if self._snapshot is None:
            self._snapshot = encode({"type": "snapshot", "v": self.version, "data": self.doc})
        return self._snapshot

    def frame_after(self, seen: int | None) -> str | None:
        """What a viewer that last saw version ``seen`` (None: nothing) needs now, or None
        if it is up to date."""
        if self.version == 0 or seen == self.version:
            return None
        if seen is not None and seen == self.version - 1 and self._delta is not None:
            return self._delta
        return self.snapshot_frame()

    async def next_frame(self, seen: int | None, *, timeout: float) -> tuple[int, str] | None:
        """Wait until there is something newer than ``seen``; returns (version, frame), or
        None after ``timeout`` seconds with nothing new."""
        frame = self.frame_after(seen)
        if frame is None:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return None
            frame = self.frame_after(seen)
            if frame is None:
                return None
        return self.version, frame

    def subscribe(self) -> None:
        """Count one more viewer."""
        self.viewers += 1
        self._watched.set()
        if self.on_subscribe is not None:
            self.on_subscribe()

    def unsubscribe(self) -> None:
        """Count one viewer fewer."""
        self.viewers = max(0, self.viewers - 1)
        if self.viewers == 0:
            self._watched.clear()

    async def watched(self) -> None:
        """Return once at least one viewer is subscribed."""
        await self._watched.wait()
