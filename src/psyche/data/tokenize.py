"""``psyche tokenize``: a text corpus → a token folder.

A token folder holds::

    train.bin       flat little-endian token ids (uint16 if vocab <= 65535, else uint32)
    val.bin         the same for the held-out documents
    tokenizer.json  the Hugging Face ``tokenizers`` tokenizer that produced them
    meta.json       dtype, vocab_size, token counts, sources, sha256 of every file

Documents (fortune cookies, or paragraphs) are joined with the ``<|endoftext|>``
token after each one, so the model learns where a text ends. Validation is held out
by document (see :func:`psyche.data.corpus.split_validation`). When no tokenizer is
given, a byte-level BPE is trained on the training documents; that is deterministic.
Folders are written to a temporary sibling and renamed into place, so a reader never
sees half a folder and two processes building the same one do not collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psyche.data.corpus import split_documents, split_validation
from psyche.data.errors import DataError, DataMissingError
from psyche.data.tokens import DTYPES, META_FORMAT, read_meta, token_dtype_for
from psyche.fsutil import replace_dir

DEFAULT_CORPUS_DIR = Path("/usr/share/games/fortunes")
DEFAULT_OUT_DIR = Path("data/fortunes")
DEFAULT_VOCAB_SIZE = 4096
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Document:
    """One document of the corpus and the file it came from."""

    text: str
    source: str


def corpus_files(paths: Sequence[str | Path] | None = None) -> list[Path]:
    """The text files of a corpus, sorted. Folders are expanded to their regular files,
    skipping symlinks and fortune index files (``*.dat``). ``None`` means the default
    corpus, Debian's fortunes. Raises :class:`DataMissingError` naming the missing path."""
    if paths is None:
        if not DEFAULT_CORPUS_DIR.is_dir():
            raise DataMissingError(
                f"{DEFAULT_CORPUS_DIR}: the default corpus is missing "
                "(install the Debian package fortunes, or pass --corpus)")
        paths = [DEFAULT_CORPUS_DIR]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir()
                                if f.is_file() and not f.is_symlink() and f.suffix != ".dat"))
        elif p.is_file():
            files.append(p)
        else:
            hint = " (install the Debian package fortunes, or pass --corpus)" if p == DEFAULT_CORPUS_DIR else ""
            raise DataMissingError(f"{p}: corpus file not found{hint}")
    if not files:
        raise DataMissingError(f"{', '.join(map(str, paths))}: no corpus files found")
    return files


def read_documents(files: Iterable[Path]) -> list[Document]:
    """Every document of every file, in file order (text decoded as UTF-8, bad bytes replaced)."""
    docs: list[Document] = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        docs.extend(Document(d, str(f)) for d in split_documents(text))
    return docs


def train_bpe(texts: Sequence[str], *, vocab_size: int) -> "Any":
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, with ``<|endoftext|>``
    as token 0. Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode(tok: Any, texts: list[str], eot_id: int, dtype: np.dtype, advance) -> np.ndarray:
    parts: list[np.ndarray] = []
    step = 512
    for start in range(0, len(texts), step):
        for enc in tok.encode_batch(texts[start : start + step], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eot_id], dtype=dtype))
        advance(min(step, len(texts) - start))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def tokenize_corpus(*, corpus: Sequence[str | Path] | None = None, tokenizer: str | Path | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, out_dir: str | Path = DEFAULT_OUT_DIR,
                    val_fraction: float = 0.05, progress: bool = True, console: Any = None,
                    _replace: bool = True) -> dict[str, Any]:
    """Build a token folder at ``out_dir`` from ``corpus`` (default: Debian fortunes).

    Uses ``tokenizer`` (a ``tokenizer.json`` holding ``<|endoftext|>``) if given, else
    trains a byte-level BPE of ``vocab_size`` on the training documents. Returns the
    meta dict also written to ``meta.json``. Raises :class:`DataMissingError` if the
    corpus or tokenizer is missing and :class:`DataError` for an unusable one.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from tokenizers import Tokenizer

    out = Path(out_dir)
    if _replace and out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # Never replace a folder that is not a token folder: it may hold anything.
        raise DataError(f"{out}: exists and is not a token folder (no meta.json); pick another --out")
    files = corpus_files(corpus)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise DataMissingError(f"{tokenizer}: tokenizer file not found")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        t = bar.add_task("reading corpus", total=len(files))
        docs: list[Document] = []
        for f in files:
            docs.extend(read_documents([f]))
            bar.advance(t)
        if len(docs) < 2:
            raise DataError(f"{', '.join(map(str, files))}: the corpus holds {len(docs)} document(s); need at least 2")
        train_idx, val_idx = split_validation([d.text for d in docs], val_fraction)
        train_texts = [docs[i].text for i in train_idx]
        val_texts = [docs[i].text for i in val_idx]

        if tokenizer is None:
            t = bar.add_task(f"training BPE tokenizer (vocab {vocab_size})", total=None)
            tok = train_bpe(train_texts, vocab_size=vocab_size)
            bar.update(t, total=1, completed=1)
        else:
            try:
                tok = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
                raise DataError(f"{tokenizer}: not a tokenizers JSON file ({exc})") from None
        eot_id = tok.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"{tokenizer}: the tokenizer has no {EOT} token (needed to mark document ends)")
        vocab = tok.get_vocab_size()
        dtype_name = token_dtype_for(vocab)
        dtype = DTYPES[dtype_name]

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            splits: dict[str, Any] = {}
            for name, texts in (("train", train_texts), ("val", val_texts)):
                t = bar.add_task(f"encoding {name}", total=len(texts))
                arr = _encode(tok, texts, eot_id, dtype, lambda n, t=t: bar.advance(t, n))
                arr.tofile(tmp / f"{name}.bin")
                splits[name] = {"file": f"{name}.bin", "tokens": int(arr.size), "documents": len(texts),
                                "sha256": _sha256(tmp / f"{name}.bin")}
            tok.save(str(tmp / "tokenizer.json"))
            by_source: dict[str, int] = {}
            for d in docs:
                by_source[d.source] = by_source.get(d.source, 0) + 1
            meta = {
                "format": META_FORMAT,
                "version": 1,
                "dtype": dtype_name,
                "byte_order": "little",
                "vocab_size": vocab,
                "eot_token": EOT,
                "eot_token_id": eot_id,
                "val_fraction": val_fraction,
                "splits": splits,
                "tokenizer": {"file": "tokenizer.json", "sha256": _sha256(tmp / "tokenizer.json"),
                              "trained": tokenizer is None},
                "sources": [{"path": str(f), "sha256": _sha256(f), "documents": by_source.get(str(f), 0)}
                            for f in files],
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if _replace:
                replace_dir(tmp, out)
            else:
                os.rename(tmp, out)  # raises if another process got there first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def ensure_default_dataset(out_dir: str | Path = DEFAULT_OUT_DIR, *, progress: bool = False,
                           corpus: Sequence[str | Path] | None = None) -> Path:
    """The default token folder (fortunes, BPE 4096), built on first use and reused after.
    ``corpus`` replaces the fortunes corpus (for tests and other languages).

    Safe when several processes call it at once: each builds in its own temporary
    folder and the first rename wins; the others discard theirs and reuse the winner's.
    Raises :class:`DataMissingError` if the fortunes corpus is not installed.
    """
    out = Path(out_dir)
    if (out / "meta.json").is_file():
        read_meta(out)  # a corrupt folder fails here, naming the file
        return out
    if out.exists():
        raise DataError(f"{out}: exists but is not a token folder (no meta.json); remove it or pick another path")
    try:
        tokenize_corpus(corpus=corpus, out_dir=out, progress=progress, _replace=False)
    except OSError:
        # Another process renamed its folder into place first; use that one.
        if not (out / "meta.json").is_file():
            raise
    return out
