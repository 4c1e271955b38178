"""Conversions between torch state dicts and the raw tensors of :mod:`psyche.p2p.model` (imports torch).

Nothing here copies a tensor's data: a served tensor is read through a view of
its memory, and :class:`StateDictSink` lets a fetch write each verified part
straight into a model's own parameters.
"""

from __future__ import annotations

import torch

from psyche.p2p.errors import ModelMismatch
from psyche.p2p.model import DEFAULT_PART_SIZE, InMemoryModel, Kind, Manifest, RawTensor

_TO_NAME = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _TO_NAME.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (keeps the tensor alive)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if t.numel() == 0:
        return memoryview(bytearray(0))
    return t.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")  # .data: the array's memoryview


def tensor_to_raw(t: torch.Tensor) -> RawTensor:
    """``t`` as raw little-endian bytes (safetensors dtype name): a view of ``t``'s memory when
    it is a contiguous CPU tensor, else of a contiguous CPU copy."""
    if t.dtype not in _TO_NAME:
        raise ValueError(f"unsupported dtype {t.dtype}")
    c = t.detach().to("cpu").contiguous()
    return RawTensor(_TO_NAME[t.dtype], tuple(c.shape), tensor_bytes(c))


def raw_to_tensor(r: RawTensor) -> torch.Tensor:
    """The torch tensor for a :class:`RawTensor`: over the same memory when ``r.data`` is
    writable (a fetched buffer), else over a copy (``bytes`` are immutable)."""
    if r.dtype not in _FROM_NAME:
        raise ValueError(f"unsupported dtype name {r.dtype!r}")
    dtype = _FROM_NAME[r.dtype]
    view = memoryview(r.data)
    if view.nbytes == 0:
        return torch.empty(r.shape, dtype=dtype)
    buf = view if not view.readonly else bytearray(view)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(r.shape)


def raw_to_state_dict(tensors: dict[str, RawTensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from raw tensors."""
    return {n: raw_to_tensor(r) for n, r in tensors.items()}


def model_from_state_dict(state_dict: dict[str, torch.Tensor], files: dict[str, bytes] | None = None, *, part_size: int = DEFAULT_PART_SIZE) -> InMemoryModel:
    """A :class:`~psyche.p2p.model.ModelProvider` serving ``state_dict`` and side files (config,
    tokenizer), read in place: the caller must not change the tensors while they are served."""
    return InMemoryModel({n: tensor_to_raw(t) for n, t in state_dict.items()}, files, part_size=part_size)


class StateDictSink:
    """A :class:`~psyche.p2p.model.ModelSink` writing a fetched model into ``state_dict``'s own
    tensors (contiguous CPU tensors, e.g. ``model.state_dict()`` of a freshly built model).

    The manifest must list exactly the state dict's names, each with its dtype and
    shape; tensors that share memory (tied weights) simply receive the same bytes
    twice. Side files are kept in :attr:`files` after the fetch.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.state_dict = state_dict
        self.files: dict[str, bytearray] = {}

    def buffers(self, manifest: Manifest) -> dict[tuple[Kind, str], memoryview]:
        served = {e.name for e in manifest.tensors}
        missing = sorted(set(self.state_dict) - served)
        unexpected = sorted(served - set(self.state_dict))
        if missing or unexpected:
            raise ModelMismatch(f"the served model does not match ours: missing {missing[:3]}, unexpected {unexpected[:3]}")
        out: dict[tuple[Kind, str], memoryview] = {}
        for e in manifest.tensors:
            t = self.state_dict[e.name]
            want = (_TO_NAME.get(t.dtype), list(t.shape))
            if (e.dtype, list(e.shape)) != want or e.nbytes != t.numel() * t.element_size():
                raise ModelMismatch(f"tensor {e.name!r}: served as {e.dtype} {e.shape} ({e.nbytes} bytes), "
                                    f"ours is {want[0]} {want[1]}")
            try:
                out[("tensor", e.name)] = tensor_bytes(t)
            except ValueError as exc:
                raise ModelMismatch(f"tensor {e.name!r}: {exc}") from None
        for f in manifest.files:
            self.files[f.name] = buf = bytearray(f.nbytes)
            out[("file", f.name)] = memoryview(buf)
        return out
