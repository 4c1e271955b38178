"""``psyche data-server``: serve a token folder to clients on other machines.

Endpoints:

- ``GET /meta.json``                               the folder's metadata
- ``GET /{split}.bin``                             the raw file (byte ``Range`` requests honoured)
- ``GET /v1/{split}/tokens?offset=O&count=N``      ``N`` tokens from token ``O`` (raw little-endian)
- ``GET /v1/{split}/samples?start=A&end=B&seq_len=L&shuffle_seed=S``
                                                   samples ``[A, B)`` by sample index, ``(B-A)×(L+1)`` int32

A client normally reads it with the ``server`` provider (``data.location =
"psyche://host:port"``), which maps sample indices to tokens with the very same
code as a local file.

Limits (:mod:`psyche.httplimits`; README, "Limits"): every endpoint is a GET, so a request
body over 1 KiB is refused with 413 from its ``Content-Length`` before it is read; each
client address may make 20000 requests in any 60 s (``psyche data-server
--rate-limit-address``), beyond which it gets 429 with ``Retry-After``; a body that trickles
is cut with 408. Refusals are ``{"error", "message"}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response

from psyche.data.errors import DataError
from psyche.data.provider import SampleProvider
from psyche.data.tokens import TokenFile, open_token_folder_split, read_meta
from psyche.httplimits import Guard, Limits

MAX_TOKENS_PER_REQUEST = 1 << 22
MAX_SAMPLES_PER_REQUEST = 4096

# What /openapi.json says the routes answer (schemathesis holds them to it, tests/test_fuzz_http.py):
# raw bytes, or a refusal whose JSON body is FastAPI's {"detail": ...}.
_DETAIL: dict[str, Any] = {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}
_TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "Raw little-endian integers."},
    400: {"content": _DETAIL, "description": "A count or range over the limits."},
    404: {"content": _DETAIL, "description": "No such split."},
    416: {"content": _DETAIL, "description": "Past the end of the split."},
}


def create_data_app(folder: str | Path, *, limits: Limits = Limits()) -> FastAPI:
    """An app serving the token folder ``folder`` (checked once, at start), refusing beyond ``limits``."""
    folder = Path(folder)
    meta = read_meta(folder)
    splits: dict[str, TokenFile] = {name: open_token_folder_split(folder, name) for name in meta["splits"]}
    app = FastAPI(title="Psyche data server")

    def split_or_404(split: str) -> TokenFile:
        if split not in splits:
            raise HTTPException(404, f"no split {split!r}; this folder has {sorted(splits)}")
        return splits[split]

    @app.get("/meta.json")
    def get_meta() -> dict:
        return meta

    @app.get("/v1/{split}/tokens", response_class=Response, responses=_TOKEN_RESPONSES)
    def get_tokens(split: str, offset: int, count: int) -> Response:
        source = split_or_404(split)
        if not 0 <= count <= MAX_TOKENS_PER_REQUEST:
            raise HTTPException(400, f"count must be in [0, {MAX_TOKENS_PER_REQUEST}]")
        try:
            tokens = source.read_tokens(offset, count)
        except DataError as exc:
            raise HTTPException(416, str(exc)) from None
        return Response(tokens.tobytes(), media_type="application/octet-stream")

    @app.get("/v1/{split}/samples", response_class=Response, responses=_TOKEN_RESPONSES)
    def get_samples(split: str, start: int, end: int, seq_len: int, shuffle_seed: int = 0) -> Response:
        source = split_or_404(split)
        if not 0 <= start <= end or end - start > MAX_SAMPLES_PER_REQUEST or seq_len < 1:
            raise HTTPException(400, f"need 0 <= start <= end, end - start <= {MAX_SAMPLES_PER_REQUEST}, seq_len >= 1")
        try:
            provider = SampleProvider(source, seq_len=seq_len, shuffle_seed=shuffle_seed, repeat=(split == "train"))
            rows = [provider.sample(i) for i in range(start, end)]
        except DataError as exc:
            raise HTTPException(416, str(exc)) from None
        body = np.stack(rows).astype("<i4").tobytes() if rows else b""
        return Response(body, media_type="application/octet-stream")

    @app.get("/{name}", response_class=FileResponse, responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {}},
              "description": "A split's token file, or tokenizer.json."},
        404: {"content": _DETAIL, "description": "No such file."}})
    def get_file(name: str) -> FileResponse:
        for source in splits.values():
            if source.path.name == name:
                return FileResponse(source.path, media_type="application/octet-stream")
        if name == "tokenizer.json" and (folder / name).is_file():
            return FileResponse(folder / name, media_type="application/json")
        raise HTTPException(404, f"no file {name!r}")

    app.add_middleware(Guard, limits=limits, body_caps={})  # every endpoint is a GET
    return app
