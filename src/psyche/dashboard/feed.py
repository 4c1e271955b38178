"""One live document fanned out to many viewers, as a snapshot then deltas.

A :class:`Feed` holds the latest version of one JSON document (a run's status,
or the runs list). Whoever produces the document calls :meth:`Feed.publish`
once per change; the message frames are encoded once per version and the same
string goes to every viewer, so a push costs one encode however many watch.

A viewer that saw the previous version gets a small delta (changed top-level
keys, and for the growing lists such as the per-step history only the rows
that are new, changed or gone); a new viewer, or one that fell behind, gets the
whole snapshot. :func:`status_delta` and
:func:`apply_delta` are the pure halves of that protocol (the page's
``apply_delta`` in ``static/dashboard.js`` mirrors the latter).

Wire messages (JSON text)::

    {"type": "snapshot", "v": 7, "data": {...}}
    {"type": "delta", "v": 8, "base": 7, "set": {...}, "unset": [...],
     "rows": {"history": [...]}, "drop": {"witness_rounds": [[0, 3]]}}
    {"type": "ping", "v": 8}
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
from collections.abc import Callable
from typing import Any

import msgspec

ROW_LISTS: dict[str, tuple[str, ...]] = {
    "history": ("step",),
    "witness_rounds": ("epoch", "step"),
    "witness_outcomes": ("epoch", "step"),
}
"""Lists of rows sent row by row in deltas, and the fields that key (and order) their rows.
They grow at the end and may drop rows (rings); any other key is sent whole when it changes."""

_json = msgspec.json.Encoder()


def encode(message: dict) -> str:
    """JSON text of a message; non-finite floats become ``null`` (browsers' JSON.parse
    rejects NaN)."""
    return _json.encode(message).decode()


def _key_getter(fields: tuple[str, ...]):
    # A scalar for one field, a tuple for several; KeyError if a row lacks one.
    return operator.itemgetter(*fields)


def _wire_key(key, fields: tuple[str, ...]) -> list:
    return list(key) if len(fields) > 1 else [key]


def _from_wire_key(key: list, fields: tuple[str, ...]):
    return tuple(key) if len(fields) > 1 else key[0]


def _keyed(rows: object, fields: tuple[str, ...]) -> dict | None:
    """Rows by key, if ``rows`` is a list of dicts strictly increasing by key; else None."""
    if not isinstance(rows, list):
        return None
    get = _key_getter(fields)
    try:
        keys = [get(r) for r in rows]
        if any(not a < b for a, b in zip(keys, keys[1:])):
            return None
    except (TypeError, KeyError):  # not dicts, a field missing, keys that do not compare
        return None
    return dict(zip(keys, rows))


def status_delta(prev: dict, new: dict) -> dict:
    """The changes that turn ``prev`` into ``new``.

    ``set``: keys whose value changed or appeared (sent whole); ``unset``: keys
    gone; and for each list of :data:`ROW_LISTS` present in both and ordered by
    its key, only its rows that are new or changed (``rows``) and the keys of
    the rows that left it (``drop``). ``apply_delta(prev, status_delta(prev, new)) == new``.
    """
    changed: dict = {}
    rows: dict[str, list] = {}
    drop: dict[str, list] = {}
    for k, v in new.items():
        if k in prev and prev[k] == v:
            continue
        fields = ROW_LISTS.get(k)
        old_rows = _keyed(prev.get(k), fields) if fields and k in prev else None
        new_rows = _keyed(v, fields) if fields and old_rows is not None else None
        if not fields or old_rows is None or new_rows is None:
            changed[k] = v
            continue
        # Rows kept between builds are the same objects: `is` settles most of them cheaply.
        rows[k] = [r for key, r in new_rows.items() if (o := old_rows.get(key)) is not r and o != r]
        gone = [_wire_key(key, fields) for key in old_rows if key not in new_rows]
        if gone:
            drop[k] = gone
    delta: dict = {"set": changed, "unset": [k for k in prev if k not in new]}
    if rows:
        delta["rows"] = rows
    if drop:
        delta["drop"] = drop
    return delta


def apply_delta(prev: dict, delta: dict) -> dict:
    """``prev`` with ``delta`` (from :func:`status_delta`) applied; ``prev`` is not changed."""
    out = {k: v for k, v in prev.items() if k not in delta.get("unset", ())}
    out.update(delta.get("set", {}))
    for name in set(delta.get("rows", {})) | set(delta.get("drop", {})):
        fields = ROW_LISTS[name]
        get = _key_getter(fields)
        merged = {get(r): r for r in prev.get(name) or []}
        for key in delta.get("drop", {}).get(name, []):
            merged.pop(_from_wire_key(key, fields), None)
        merged.update({get(r): r for r in delta.get("rows", {}).get(name, [])})
        out[name] = [merged[key] for key in sorted(merged)]
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
                async with asyncio.timeout(timeout):
                    await event.wait()
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


async def cancel_tasks(tasks: list) -> None:
    """Cancel ``tasks`` (asyncio tasks), wait for each to end, and empty the list."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
