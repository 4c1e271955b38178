"""The sample provider: sample index → ``seq_len + 1`` tokens, from any token source.

Two layers, so every transport shares one sample→tokens mapping:

* a **token source** (:class:`~psyche.data.tokens.TokenSource`) is a flat array of
  little-endian tokens reachable by ``read_tokens(offset, count)``: a local file
  (:mod:`psyche.data.tokens`), an HTTP server or ``psyche data-server``
  (:mod:`psyche.data.remote`). :data:`SOURCES` names each kind and how to open it.
* the **sample provider** (:class:`SampleProvider`) maps a sample index onto a token
  offset with :mod:`psyche.data.sampling` and reads ``seq_len + 1`` tokens there.

:func:`open_provider` opens one split of a token folder by provider name
(``auto`` picks by the location's form).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from psyche.data.errors import DataError
from psyche.data.remote import DataServerSource, HttpTokenSource
from psyche.data.sampling import num_slots, sample_slot
from psyche.data.tokens import Split, TokenSource, open_token_folder_split

if TYPE_CHECKING:
    import torch

    from psyche.config import RunConfig


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


# Every kind of token source, by the provider name a run config gives
# (`data.provider`): (location, split) -> TokenSource. A new transport is one line here;
# the sample mapping above stays the same for all of them.
SourceOpener = Callable[[str, Split], TokenSource]
SOURCES: dict[str, SourceOpener] = {
    "local": open_token_folder_split,
    "http": HttpTokenSource,
    "server": DataServerSource,
}


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
    opener = SOURCES.get(kind)
    if opener is None:
        raise DataError(f"{location}: data provider {kind!r} is not available (known: {', '.join(sorted(SOURCES))})")
    source = opener(str(location), split)
    return SampleProvider(source, seq_len=seq_len, shuffle_seed=shuffle_seed, repeat=repeat, vocab_size=vocab_size)


@dataclass(frozen=True)
class RunData:
    """The train and validation providers of one run."""

    train: SampleProvider
    val: SampleProvider


def providers_for(cfg: "RunConfig", *, location: str | Path | None = None) -> RunData:
    """Train (repeating) and val (one pass) providers as the run config describes them, at
    ``location`` if given, else at :meth:`RunConfig.data_location` (a relative folder read
    from a config file is relative to that file)."""
    loc = location if location is not None else cfg.data_location()

    def split_provider(split: Split, *, repeat: bool) -> SampleProvider:
        return open_provider(loc, split=split, repeat=repeat, seq_len=cfg.model.seq_len,
                             shuffle_seed=cfg.data.shuffle_seed, provider=cfg.data.provider,
                             vocab_size=cfg.model.vocab_size)

    return RunData(train=split_provider("train", repeat=True), val=split_provider("val", repeat=False))
