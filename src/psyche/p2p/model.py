"""Model sharing data: manifests, the provider interface, and the manifest trust rule (pure).

A model is a set of named tensors (raw little-endian bytes with a dtype name and
a shape, the safetensors convention) plus named files (``config.json``,
``tokenizer.json``, ...). Each entry is cut into parts of ``part_size`` bytes;
the :class:`Manifest` lists every part's content hash, so a joining node can
fetch parts from several peers in parallel and verify each one on arrival.

**Which manifest to trust** (documented choice): if the caller passes
``manifest_digest`` (sha256 of the manifest's canonical bytes; a coordinator
checkpoint record can carry it), exactly that manifest is accepted and any
provider serving another one is ignored. Otherwise the manifest served by a
strict majority of the providers that answered is taken, and at least
``min_agree`` of them must agree; providers that served a different manifest
are not used. This module stays torch-free and knows nothing of torch:
:mod:`psyche.p2p.torch_io`, built on it, converts to and from torch state dicts
(``raw_to_state_dict(fetched.tensors)``).

**Where fetched bytes go**: a :class:`ModelSink` hands the fetcher one writable
buffer per entry, and every verified part is written straight into its place
there. :class:`MemorySink` (the default) allocates them;
:class:`psyche.p2p.torch_io.StateDictSink` is a model's own parameter memory,
so a joining node holds the model once, not a download buffer and then a copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from psyche.p2p.wire import Buffer, content_hash, manifest_digest

DEFAULT_PART_SIZE = 4 << 20

Kind = Literal["tensor", "file"]


class TensorEntry(msgspec.Struct, frozen=True):
    """A tensor: safetensors dtype name (``F32``, ``BF16``, ``F16``, ``I64``...), shape, byte size and part hashes."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    parts: list[bytes]


class FileEntry(msgspec.Struct, frozen=True):
    """A side file (config, tokenizer): byte size and part hashes."""

    name: str
    nbytes: int
    parts: list[bytes]


class Manifest(msgspec.Struct, frozen=True):
    """Everything a fetcher needs to request and verify a model, part by part."""

    version: int
    part_size: int
    tensors: list[TensorEntry]
    files: list[FileEntry]

    def encode(self) -> bytes:
        """Canonical bytes (what :meth:`digest` hashes and what travels)."""
        return _manifest_encoder.encode(self)

    def digest(self) -> bytes:
        """sha256 of the canonical bytes."""
        return manifest_digest(self.encode())

    def entries(self) -> list[tuple[Kind, TensorEntry | FileEntry]]:
        """Every entry with its kind: the tensors, then the files."""
        return [*(("tensor", e) for e in self.tensors), *(("file", e) for e in self.files)]

    def entry(self, kind: Kind, name: str) -> TensorEntry | FileEntry | None:
        """The named entry, or None."""
        entries = self.tensors if kind == "tensor" else self.files
        for e in entries:
            if e.name == name:
                return e
        return None

    def parts(self) -> list[PartRef]:
        """Every part to fetch, largest entries first (they benefit most from spreading)."""
        refs: list[PartRef] = []
        for kind, e in self.entries():
            for i, h in enumerate(e.parts):
                off = i * self.part_size
                refs.append(PartRef(kind, e.name, i, off, min(self.part_size, e.nbytes - off), h))
        refs.sort(key=lambda r: -r.length)
        return refs

    def total_bytes(self) -> int:
        """Sum of all entry sizes."""
        return sum(e.nbytes for e in self.tensors) + sum(e.nbytes for e in self.files)


_manifest_encoder = msgspec.msgpack.Encoder()
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


def decode_manifest(data: bytes) -> Manifest:
    """Decode manifest bytes; raises ``msgspec`` errors on bad input, ``ValueError`` on inconsistent sizes."""
    m = _manifest_decoder.decode(data)
    if m.part_size <= 0:
        raise ValueError(f"part_size must be > 0, got {m.part_size}")
    for _, e in m.entries():
        want = max(1, -(-e.nbytes // m.part_size)) if e.nbytes else 0
        if len(e.parts) != want:
            raise ValueError(f"entry {e.name!r}: {len(e.parts)} part hashes for {e.nbytes} bytes (expected {want})")
    return m


@dataclass(frozen=True, slots=True)
class PartRef:
    """One part to fetch: entry ``kind``/``name``, part ``index`` at byte ``offset`` of ``length``, and its hash."""

    kind: Kind
    name: str
    index: int
    offset: int
    length: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A tensor as bytes: safetensors dtype name, shape and little-endian C-order data
    (``bytes``, or a buffer over memory someone else owns, e.g. a torch tensor's)."""

    dtype: str
    shape: tuple[int, ...]
    data: Buffer


def _part_hashes(data: Buffer, part_size: int) -> list[bytes]:
    mv = memoryview(data)
    return [content_hash(mv[i : i + part_size]) for i in range(0, len(data), part_size)]


def build_manifest(tensors: dict[str, RawTensor], files: dict[str, bytes], *, part_size: int = DEFAULT_PART_SIZE) -> Manifest:
    """Manifest of the given tensors and files (entries sorted by name, so it is canonical)."""
    if part_size <= 0:
        raise ValueError(f"part_size must be > 0, got {part_size}")
    t_entries = [
        TensorEntry(n, t.dtype, list(t.shape), len(t.data), _part_hashes(t.data, part_size))
        for n, t in sorted(tensors.items())
    ]
    f_entries = [FileEntry(n, len(d), _part_hashes(d, part_size)) for n, d in sorted(files.items())]
    return Manifest(1, part_size, t_entries, f_entries)


class ModelProvider(Protocol):
    """What a node serving a model must offer (bytes only; no torch)."""

    def manifest(self) -> Manifest:
        """The manifest of the served model."""

    def read(self, kind: Kind, name: str, offset: int, length: int) -> Buffer:
        """``length`` bytes of entry ``kind``/``name`` from ``offset``."""


class InMemoryModel:
    """A :class:`ModelProvider` over tensors and files held in memory."""

    def __init__(self, tensors: dict[str, RawTensor], files: dict[str, bytes] | None = None, *, part_size: int = DEFAULT_PART_SIZE) -> None:
        self.tensors = dict(tensors)
        self.files = dict(files or {})
        self._manifest = build_manifest(self.tensors, self.files, part_size=part_size)

    def manifest(self) -> Manifest:
        return self._manifest

    def read(self, kind: Kind, name: str, offset: int, length: int) -> Buffer:
        data = self.tensors[name].data if kind == "tensor" else self.files[name]
        return memoryview(data)[offset : offset + length]  # a view: parts are not copied to be served


class ModelSink(Protocol):
    """Where a fetched model's bytes are written as they arrive."""

    def buffers(self, manifest: Manifest) -> dict[tuple[Kind, str], memoryview]:
        """A writable buffer of exactly ``entry.nbytes`` bytes for every entry of ``manifest``,
        keyed ``(kind, name)``. Raises :class:`ModelMismatch` (naming the entry and the rule)
        if the manifest does not fit this sink; called before any part is fetched."""


class MemorySink:
    """A :class:`ModelSink` that allocates one ``bytearray`` per entry (the default)."""

    def buffers(self, manifest: Manifest) -> dict[tuple[Kind, str], memoryview]:
        return {(kind, e.name): memoryview(bytearray(e.nbytes)) for kind, e in manifest.entries()}


@dataclass(slots=True)
class FetchedModel:
    """A model fetched from peers, every part verified against ``manifest``."""

    manifest: Manifest
    tensors: dict[str, RawTensor]
    """Each tensor's bytes: a view of the sink's buffer (no copy)."""
    files: dict[str, bytes]
    sources: dict[bytes, int]
    """Bytes fetched from each provider."""


def choose_manifest(
    replies: dict[bytes, bytes], *, manifest_digest: bytes | None = None, min_agree: int = 1
) -> tuple[bytes, list[bytes]] | None:
    """Pick the manifest to trust among ``{provider: manifest bytes}``.

    Returns ``(manifest bytes, providers that served exactly it)``, or None if
    no manifest qualifies. With ``manifest_digest`` the manifest whose sha256 is
    that digest is chosen (if any provider served it); otherwise a manifest must
    be served by a strict majority of the repliers and by at least ``min_agree``
    of them.
    """
    by_digest: dict[bytes, list[bytes]] = {}
    blobs: dict[bytes, bytes] = {}
    for provider, data in replies.items():
        d = _sha(data)
        by_digest.setdefault(d, []).append(provider)
        blobs[d] = data
    if manifest_digest is not None:
        if manifest_digest in by_digest:
            return blobs[manifest_digest], sorted(by_digest[manifest_digest])
        return None
    if not by_digest:
        return None
    counts = Counter({d: len(p) for d, p in by_digest.items()})
    best, n = counts.most_common(1)[0]
    if 2 * n > len(replies) and n >= min_agree:
        return blobs[best], sorted(by_digest[best])
    return None


def _sha(data: bytes) -> bytes:
    return manifest_digest(data)
