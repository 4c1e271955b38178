"""DisTrO: DeMo-style decoupled momentum with chunked-DCT top-k compression.

- :mod:`psyche.distro.dct` — chunking rule and batched orthonormal DCT-II.
- :mod:`psyche.distro.indexcode` — kept positions packed in ceil(log2 C(n, k)) bits per tile.
- :mod:`psyche.distro.codec` — :class:`DCTCodec` and the :class:`SparseResult` wire form, :class:`ResultLayout`.
- :mod:`psyche.distro.payload` — one peer's results for one step as one blob.
- :mod:`psyche.distro.optimizer` — :class:`DisTrO` (``generate`` / ``apply``; built from a run's
  config by :meth:`DisTrO.from_config`), the momentum warmup, and :class:`Overlap`.

W peers in one process against AdamW (``psyche bench distro``) is a harness:
:mod:`psyche.testing.distro_sim`.
"""

from psyche.distro.codec import DCTCodec, ResultLayout, SparseResult
from psyche.distro.optimizer import DisTrO, Overlap
from psyche.distro.payload import decode_payload, encode_payload

__all__ = ["DCTCodec", "DisTrO", "Overlap", "ResultLayout", "SparseResult", "decode_payload", "encode_payload"]
