"""Token sources and the sample provider: sample index → ``seq_len + 1`` tokens.

Two layers, so every transport shares one sample→tokens mapping:

* a **token source** (:class:`TokenSource`) is a flat array of little-endian tokens
  reachable by ``read_tokens(offset, count)``. :class:`TokenFile` memory-maps a local
  file; an HTTP source (byte ranges) or a data-server source only has to provide the
  same four members and register itself with :func:`register_source`.
* the **sample provider** (:class:`SampleProvider`) maps a sample index onto a token
  offset with :mod:`psyche.data.sampling` and reads ``seq_len + 1`` tokens there.

A token folder (what ``psyche tokenize`` writes) holds ``train.bin``, ``val.bin``,
``tokenizer.json`` and ``meta.json``; :func:`open_provider` opens one split of it by
provider name (``local``; ``auto`` picks by the location's form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence

import numpy as np

from psyche.data.errors import DataError, DataMissingError, SampleIndexError, TokenWidthError
from psyche.data.sampling import num_slots, sample_slot

if TYPE_CHECKING:
    import torch

    from psyche.config import RunConfig

Split = Literal["train", "val"]
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
META_FORMAT = "psyche-tokens"


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype name that holds ids ``0..vocab_size-1``."""
    return "uint16" if vocab_size <= 65535 else "uint32"


class TokenSource(Protocol):
    """A flat array of tokens, read by token offset. What every provider transport supplies."""

    name: str  # a path or URL, used in error messages
    dtype: np.dtype  # little-endian uint16 or uint32
    num_tokens: int

    def read_tokens(self, offset: int, count: int) -> np.ndarray:
        """Tokens ``[offset, offset + count)`` as a fresh array; :class:`SampleIndexError` outside."""
        ...


def _check_range(name: str, dtype: np.dtype, num_tokens: int, offset: int, count: int) -> None:
    if count < 0 or offset < 0 or offset + count > num_tokens:
        raise SampleIndexError(
            f"{name}: tokens [{offset}, {offset + count}) (bytes {offset * dtype.itemsize}.."
            f"{(offset + count) * dtype.itemsize}) lie outside the file's {num_tokens} tokens "
            f"({num_tokens * dtype.itemsize} bytes)"
        )


class TokenFile:
    """A local token file, memory-mapped read-only (pages are read on demand)."""

    def __init__(self, path: str | Path, *, dtype: str = "uint16"):
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
        _check_range(self.name, self.dtype, self.num_tokens, offset, count)
        return np.array(self._tokens[offset : offset + count])

    def __repr__(self) -> str:
        return f"TokenFile({self.name!r}, dtype={self.dtype.name}, num_tokens={self.num_tokens})"


class SampleProvider:
    """Sample index → ``seq_len + 1`` consecutive tokens, through a seeded permutation.

    Deterministic: the same ``(source contents, seq_len, shuffle_seed, index)`` always
    gives the same tokens. ``num_samples`` is the number of samples per epoch; with
    ``repeat=True`` indices beyond it start further epochs, each in a new order.
    """

    def __init__(self, source: TokenSource, *, seq_len: int, shuffle_seed: int = 0,
                 repeat: bool = False, vocab_size: int | None = None):
        self.source = source
        self.seq_len = seq_len
        self.shuffle_seed = shuffle_seed
        self.repeat = repeat
        self.vocab_size = vocab_size
        self.num_samples = num_slots(source.num_tokens, seq_len)
        if self.num_samples == 0:
            raise DataError(f"{source.name}: {source.num_tokens} tokens hold no sample of seq_len+1 = {seq_len + 1} tokens")

    def token_offset(self, index: int) -> int:
        """The token offset where sample ``index`` starts."""
        slot = sample_slot(index, slots=self.num_samples, shuffle_seed=self.shuffle_seed, repeat=self.repeat)
        return slot * self.seq_len

    def sample(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``index`` (int64); errors name the file and byte offset."""
        offset = self.token_offset(index)
        tokens = self.source.read_tokens(offset, self.seq_len + 1).astype(np.int64)
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            at = offset + int(np.argmax(tokens >= self.vocab_size))
            raise DataError(
                f"{self.source.name}: token {int(tokens.max())} at byte offset {at * self.source.dtype.itemsize} "
                f"is >= the model's vocab_size {self.vocab_size} (data built with another tokenizer?)"
            )
        return tokens

    def batch(self, indices: Sequence[int]) -> "torch.Tensor":
        """A ``torch.LongTensor`` of shape ``(len(indices), seq_len + 1)``."""
        import torch

        if len(indices) == 0:
            return torch.zeros((0, self.seq_len + 1), dtype=torch.long)
        return torch.from_numpy(np.stack([self.sample(int(i)) for i in indices]))  # (B, T+1)

    def __len__(self) -> int:
        return self.num_samples


# --- token folders ---------------------------------------------------------------


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


# Openers by provider name: (location, split) -> TokenSource. The HTTP and data-server
# providers register here; the sample mapping above stays the same for all of them.
SourceOpener = Callable[[str, Split], TokenSource]
_SOURCES: dict[str, SourceOpener] = {"local": lambda loc, split: open_token_folder_split(loc, split)}


def register_source(name: str, opener: SourceOpener) -> None:
    """Make ``open_provider(..., provider=name)`` use ``opener(location, split)``."""
    _SOURCES[name] = opener


def provider_kind(location: str, provider: str = "auto") -> str:
    """Resolve ``auto`` by the location's form: ``http(s)://`` → http, ``psyche://`` → server, else local."""
    if provider != "auto":
        return provider
    if location.startswith(("http://", "https://")):
        return "http"
    if location.startswith(("psyche://", "tcp://")):
        return "server"
    return "local"


def open_provider(location: str | Path, *, split: Split = "train", seq_len: int, shuffle_seed: int = 0,
                  provider: str = "auto", repeat: bool = False, vocab_size: int | None = None) -> SampleProvider:
    """Open one split of the token data at ``location`` with the provider named ``provider``.

    Example::

        train = open_provider("data/fortunes", seq_len=128, shuffle_seed=0, repeat=True)
        x = train.batch(range(8))  # (8, 129) int64
    """
    kind = provider_kind(str(location), provider)
    if kind not in _SOURCES and kind in ("http", "server"):
        import psyche.data.remote  # noqa: F401  (registers the http and server sources)
    opener = _SOURCES.get(kind)
    if opener is None:
        raise DataError(f"{location}: data provider {kind!r} is not available (known: {', '.join(sorted(_SOURCES))})")
    source = opener(str(location), split)
    return SampleProvider(source, seq_len=seq_len, shuffle_seed=shuffle_seed, repeat=repeat, vocab_size=vocab_size)


@dataclass(frozen=True)
class RunData:
    """The train and validation providers of one run."""

    train: SampleProvider
    val: SampleProvider


def providers_for(cfg: "RunConfig", *, location: str | Path | None = None) -> RunData:
    """Train (repeating) and val (one pass) providers as the run config describes them."""
    loc = location if location is not None else cfg.data.location
    common = dict(seq_len=cfg.model.seq_len, shuffle_seed=cfg.data.shuffle_seed,
                  provider=cfg.data.provider, vocab_size=cfg.model.vocab_size)
    return RunData(train=open_provider(loc, split="train", repeat=True, **common),
                   val=open_provider(loc, split="val", repeat=False, **common))
