"""Token sources a client on another machine reads through the network.

Both are named in :data:`psyche.data.provider.SOURCES`, so the sample index → tokens
mapping is the very same code as for local files; only ``read_tokens`` travels:

- ``http``: a token folder served by any HTTP server that honours byte ranges
  (``https://host/data/fortunes`` → ``.../meta.json``, ``.../train.bin``).
- ``server``: ``psyche data-server`` (``psyche://host:port`` or
  ``http://host:port`` with ``provider = "server"``), asked for token ranges.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from psyche.data.errors import DataError, DataMissingError, TokenWidthError
from psyche.data.tokens import DTYPES, META_FORMAT, Split, check_range


def _meta_from(client: httpx.Client, url: str) -> dict[str, Any]:
    try:
        resp = client.get(url)
    except httpx.TransportError as exc:
        raise DataMissingError(f"{url}: cannot reach the data host ({exc!r})") from None
    if resp.status_code == 404:
        raise DataMissingError(f"{url}: not found (is this a psyche token folder?)")
    if resp.status_code != 200:
        raise DataError(f"{url}: HTTP {resp.status_code}")
    try:
        meta = resp.json()
    except ValueError:
        raise DataError(f"{url}: meta.json is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or "splits" not in meta:
        raise DataError(f"{url}: not a psyche token folder meta.json (format must be {META_FORMAT!r})")
    if meta.get("dtype") not in DTYPES:
        raise TokenWidthError(f"{url}: dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}")
    return meta


class _RemoteSource:
    """Shared by both remote sources: meta.json, range checks and decoding."""

    def __init__(self, base: str, split: Split, *, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.split = split
        self.client = httpx.Client(timeout=timeout, follow_redirects=True)
        meta = _meta_from(self.client, self.meta_url())
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("tokens"), int):
            raise DataError(f"{self.meta_url()}: has no {split!r} split with a token count")
        self.dtype = DTYPES[meta["dtype"]]
        self.num_tokens = int(info["tokens"])
        self.file = str(info.get("file", f"{split}.bin"))
        self.name = f"{self.base}/{self.file}"

    def meta_url(self) -> str:
        """Where this folder's ``meta.json`` is."""
        return f"{self.base}/meta.json"

    def _check(self, offset: int, count: int) -> None:
        check_range(self.name, self.dtype, self.num_tokens, offset, count)

    def _decode(self, body: bytes, offset: int, count: int) -> np.ndarray:
        want = count * self.dtype.itemsize
        if len(body) != want:
            raise DataError(f"{self.name}: asked for {want} bytes at byte offset {offset * self.dtype.itemsize}, got {len(body)}")
        return np.frombuffer(body, dtype=self.dtype).copy()


class HttpTokenSource(_RemoteSource):
    """A token folder on a plain HTTP(S) server, read with ``Range`` requests."""

    def read_tokens(self, offset: int, count: int) -> np.ndarray:
        """Tokens ``[offset, offset + count)``, fetched with one byte-range request."""
        self._check(offset, count)
        if count == 0:
            return np.zeros(0, self.dtype)
        width = self.dtype.itemsize
        first, last = offset * width, (offset + count) * width - 1
        try:
            resp = self.client.get(self.name, headers={"Range": f"bytes={first}-{last}"})
        except httpx.TransportError as exc:
            raise DataError(f"{self.name}: byte range {first}-{last}: {exc!r}") from None
        if resp.status_code == 200 and len(resp.content) > last:
            # A server that ignores Range sends the whole file: still correct, just wasteful.
            return self._decode(resp.content[first : last + 1], offset, count)
        if resp.status_code != 206:
            raise DataError(f"{self.name}: byte range {first}-{last}: HTTP {resp.status_code}")
        return self._decode(resp.content, offset, count)


class DataServerSource(_RemoteSource):
    """A split served by ``psyche data-server``, read by token range."""

    def __init__(self, location: str, split: Split, *, timeout: float = 30.0) -> None:
        base = location
        if base.startswith("psyche://"):
            base = "http://" + base[len("psyche://"):]
        super().__init__(base, split, timeout=timeout)

    def read_tokens(self, offset: int, count: int) -> np.ndarray:
        """Tokens ``[offset, offset + count)``, asked of the data server as one token range."""
        self._check(offset, count)
        if count == 0:
            return np.zeros(0, self.dtype)
        url = f"{self.base}/v1/{self.split}/tokens"
        try:
            resp = self.client.get(url, params={"offset": offset, "count": count})
        except httpx.TransportError as exc:
            raise DataError(f"{url}: tokens [{offset}, {offset + count}): {exc!r}") from None
        if resp.status_code != 200:
            raise DataError(f"{url}: tokens [{offset}, {offset + count}): HTTP {resp.status_code} {resp.text[:200]}")
        return self._decode(resp.content, offset, count)

