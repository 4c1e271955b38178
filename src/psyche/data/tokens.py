"""The token folder format and the local token source.

A token folder (what ``psyche tokenize`` writes) holds ``train.bin``, ``val.bin``,
``tokenizer.json`` and ``meta.json``; each ``.bin`` is a flat array of little-endian
tokens. A **token source** (:class:`TokenSource`) is such an array reachable by
``read_tokens(offset, count)``: :class:`TokenFile` memory-maps a local file, and
:mod:`psyche.data.remote` reads one over HTTP. :mod:`psyche.data.provider` maps sample
indices onto any of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from psyche.data.errors import DataError, DataMissingError, SampleIndexError, TokenWidthError

Split = Literal["train", "val"]
DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
META_FORMAT = "psyche-tokens"


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype name that holds ids ``0..vocab_size-1``."""
    return "uint16" if vocab_size <= 65535 else "uint32"


class TokenSource(Protocol):
    """A flat array of tokens, read by token offset. What every provider transport supplies."""

    name: str  # a path or URL, used in error messages
    dtype: np.dtype[Any]  # little-endian uint16 or uint32
    num_tokens: int

    def read_tokens(self, offset: int, count: int) -> np.ndarray:
        """Tokens ``[offset, offset + count)`` as a fresh array; :class:`SampleIndexError` outside."""
        ...


def check_range(name: str, dtype: np.dtype[Any], num_tokens: int, offset: int, count: int) -> None:
    """Raise :class:`SampleIndexError`, naming ``name`` and the byte range, unless tokens
    ``[offset, offset + count)`` lie within ``num_tokens``."""
    if count < 0 or offset < 0 or offset + count > num_tokens:
        raise SampleIndexError(
            f"{name}: tokens [{offset}, {offset + count}) (bytes {offset * dtype.itemsize}.."
            f"{(offset + count) * dtype.itemsize}) lie outside the file's {num_tokens} tokens "
            f"({num_tokens * dtype.itemsize} bytes)"
        )


class TokenFile:
    """A local token file, memory-mapped read-only (pages are read on demand)."""

    def __init__(self, path: str | Path, *, dtype: str = "uint16") -> None:
        """Open ``path`` as tokens of ``dtype`` (``uint16``/``uint32``).

        Raises :class:`DataMissingError` if it does not exist and :class:`TokenWidthError`
        if its size is not a whole number of tokens.
        """
        self.path = Path(path)
        self.name = str(self.path)
        if dtype not in DTYPES:
            raise TokenWidthError(f"{self.name}: unknown token dtype {dtype!r} (expected one of {sorted(DTYPES)})")
        self.dtype = DTYPES[dtype]
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataMissingError(f"{self.name}: token file not found (build it with `psyche tokenize`)") from None
        if not self.path.is_file():
            raise DataMissingError(f"{self.name}: not a regular file")
        width = self.dtype.itemsize
        if size % width:
            raise TokenWidthError(
                f"{self.name}: size {size} bytes is not a multiple of the {width}-byte {dtype} token width "
                f"(trailing {size % width} byte(s) at byte offset {size - size % width})"
            )
        self.num_tokens = size // width
        # np.memmap refuses empty files; an empty array reads the same.
        self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def read_tokens(self, offset: int, count: int) -> np.ndarray:
        """Tokens ``[offset, offset + count)`` copied out of the map."""
        check_range(self.name, self.dtype, self.num_tokens, offset, count)
        return np.array(self._tokens[offset : offset + count])

    def __repr__(self) -> str:
        return f"TokenFile({self.name!r}, dtype={self.dtype.name}, num_tokens={self.num_tokens})"


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a token folder; :class:`DataMissingError`/:class:`DataError` if absent or bad."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataMissingError(f"{path}: not found (build the token folder with `psyche tokenize --out {folder}`)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable meta.json ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or "splits" not in meta:
        raise DataError(f"{path}: not a psyche token folder meta.json (format must be {META_FORMAT!r})")
    return meta


def open_token_folder_split(folder: str | Path, split: Split, *, expect_dtype: str | None = None) -> TokenFile:
    """Open one split of a local token folder, checking it against ``meta.json``.

    Raises :class:`TokenWidthError` if meta.json declares a dtype other than
    ``expect_dtype``, or if the file's size disagrees with the token count meta.json records.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise TokenWidthError(f"{folder / 'meta.json'}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if expect_dtype is not None and dtype != expect_dtype:
        raise TokenWidthError(f"{folder / 'meta.json'}: tokens are {dtype} but {expect_dtype} was expected")
    info = meta["splits"].get(split)
    if not isinstance(info, dict):
        raise DataError(f"{folder / 'meta.json'}: has no {split!r} split")
    tf = TokenFile(folder / info.get("file", f"{split}.bin"), dtype=dtype)
    declared = info.get("tokens")
    if declared is not None and declared != tf.num_tokens:
        raise TokenWidthError(
            f"{tf.name}: holds {tf.num_tokens} {dtype} tokens ({tf.num_tokens * tf.dtype.itemsize} bytes) "
            f"but meta.json records {declared}: wrong token width or a truncated file"
        )
    return tf
