"""Conversions between torch state dicts and the raw tensors of :mod:`psyche.p2p.model` (imports torch)."""

from __future__ import annotations

import torch

from psyche.p2p.model import DEFAULT_PART_SIZE, InMemoryModel, RawTensor

_TO_NAME = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _TO_NAME.items()}


def tensor_to_raw(t: torch.Tensor) -> RawTensor:
    """A CPU copy of ``t`` as raw little-endian bytes (safetensors dtype name)."""
    if t.dtype not in _TO_NAME:
        raise ValueError(f"unsupported dtype {t.dtype}")
    c = t.detach().to("cpu").contiguous()
    data = c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b""
    return RawTensor(_TO_NAME[t.dtype], tuple(c.shape), data)


def raw_to_tensor(r: RawTensor) -> torch.Tensor:
    """The torch tensor for a :class:`RawTensor` (owns its memory)."""
    if r.dtype not in _FROM_NAME:
        raise ValueError(f"unsupported dtype name {r.dtype!r}")
    dtype = _FROM_NAME[r.dtype]
    if not r.data:
        return torch.empty(r.shape, dtype=dtype)
    return torch.frombuffer(bytearray(r.data), dtype=torch.uint8).view(dtype).reshape(r.shape)


def raw_to_state_dict(tensors: dict[str, RawTensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from raw tensors."""
    return {n: raw_to_tensor(r) for n, r in tensors.items()}


def model_from_state_dict(state_dict: dict[str, torch.Tensor], files: dict[str, bytes] | None = None, *, part_size: int = DEFAULT_PART_SIZE) -> InMemoryModel:
    """A :class:`~psyche.p2p.model.ModelProvider` serving ``state_dict`` and side files (config, tokenizer)."""
    return InMemoryModel({n: tensor_to_raw(t) for n, t in state_dict.items()}, files, part_size=part_size)
