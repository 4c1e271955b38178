"""Training data: token folders, the sample→tokens mapping, and the providers that read them.

Public API::

    open_provider(location, *, split, seq_len, shuffle_seed, provider="auto", repeat=False, vocab_size=None)
        -> SampleProvider          # .num_samples, .sample(i), .batch(indices) -> LongTensor (B, seq_len+1)
    providers_for(run_cfg) -> RunData(train, val)
    TokenFile(path, *, dtype)      # a TokenSource: .read_tokens(offset, count)
    SOURCES                        # provider name -> how to open its TokenSource (local, http, server)
    tokenize_corpus(...), ensure_default_dataset(out_dir="data/fortunes") -> Path
    data_problems(run_cfg) -> list[ConfigProblem]   # why its local token folder cannot be used (reads meta.json and sizes)
    builds_on_first_use(location), not_built_yet(location), is_checked_offline(run_cfg)
    DataError, DataMissingError, TokenWidthError, SampleIndexError
"""

from psyche.data.errors import DataError, DataMissingError, SampleIndexError, TokenWidthError
from psyche.data.provider import SOURCES, RunData, SampleProvider, open_provider, provider_kind, providers_for
from psyche.data.tokens import TokenFile, TokenSource, open_token_folder_split, read_meta, token_dtype_for
from psyche.data.tokenize import EOT, corpus_files, ensure_default_dataset, tokenize_corpus
from psyche.data.check import builds_on_first_use, data_problems, is_checked_offline, not_built_yet

__all__ = [
    "EOT",
    "DataError",
    "DataMissingError",
    "RunData",
    "SOURCES",
    "SampleIndexError",
    "SampleProvider",
    "TokenFile",
    "TokenSource",
    "TokenWidthError",
    "builds_on_first_use",
    "corpus_files",
    "data_problems",
    "ensure_default_dataset",
    "is_checked_offline",
    "not_built_yet",
    "open_provider",
    "open_token_folder_split",
    "provider_kind",
    "providers_for",
    "read_meta",
    "token_dtype_for",
    "tokenize_corpus",
]
