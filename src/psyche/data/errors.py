"""Errors raised by :mod:`psyche.data`, grouped by what the caller can do about them.

::

    DataError (ValueError)              -- anything wrong with token data
    ├── DataMissingError (+FileNotFoundError)  -- a file or corpus is absent: build or fetch it
    ├── TokenWidthError                 -- the bytes are not tokens of the declared width: rebuild
    └── SampleIndexError (+IndexError)  -- a sample index or token range lies outside the data

Every message names the file (or URL) and, where it applies, the byte offset.
"""

from __future__ import annotations


class DataError(ValueError):
    """Token data cannot be used as asked; the message names the file and what is wrong."""


class DataMissingError(DataError, FileNotFoundError):
    """A token file, its meta.json, or the text corpus does not exist."""


class TokenWidthError(DataError):
    """A token file's size or declared dtype does not match the token width it must have."""


class SampleIndexError(DataError, IndexError):
    """A sample index or a token range lies outside the data."""
