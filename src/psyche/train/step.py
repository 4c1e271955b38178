"""One training step's gradient half, and validation loss.

The optimizer update is deliberately not here: DisTrO splits it into ``generate()``
(before results travel) and ``apply()`` (after), so the caller does it, and skips it
when :class:`StepStats` says the step was not finite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from psyche.data import SampleProvider


@dataclass(frozen=True)
class StepStats:
    """What one forward/backward over a batch measured."""

    loss: float
    """Mean next-token cross-entropy over every target token of the batch (nats)."""
    grad_norm: float
    """Global L2 norm of the gradient before clipping."""
    tokens: int
    """Target tokens in the batch: ``B * seq_len``."""
    finite: bool
    """False if the loss or the gradient norm is NaN/inf: the caller must skip the update."""


def default_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on CUDA (autocast), nothing elsewhere: CPU trains in float32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _sum_cross_entropy(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and their next tokens
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")


def _check_batch(batch: torch.Tensor) -> None:
    """``ValueError`` unless ``batch`` is ``(B, seq_len+1)`` token ids with ``seq_len >= 1``."""
    if batch.dim() != 2 or batch.size(1) < 2:
        raise ValueError(f"batch must be (B, seq_len+1) with seq_len >= 1 (got shape {tuple(batch.shape)})")


def accumulate_gradients(model: torch.nn.Module, batch: torch.Tensor, *, micro_batch_size: int, total_tokens: int,
                         autocast_dtype: torch.dtype | None = None, weight: float = 1.0,
                         no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Forward and backward ``batch`` (``(B, seq_len+1)`` token ids) in micro-batches, adding
    to ``.grad`` the gradient of ``weight * (summed loss of the batch) / total_tokens``; return
    that loss (a detached scalar on the model's device).

    ``total_tokens`` is the token count of the whole batch this one is part of (a node's ranks
    each hold a part), so the parts' gradients add up to the gradient of the whole batch's mean
    loss. ``no_sync``: the context manager (``DistributedDataParallel.no_sync``) that every
    backward but the last runs under, so a data-parallel model reduces the gradient once.
    ``weight = 0`` gives a zero gradient through the same collectives (a rank with no samples).
    """
    _check_batch(batch)
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0 (got {micro_batch_size})")
    device = next(model.parameters()).device
    batch = batch.to(device)
    total = torch.zeros((), device=device)
    micro = batch.split(micro_batch_size)  # (b, T+1) each
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with _autocast(device, autocast_dtype):
                loss = _sum_cross_entropy(model, mb) / total_tokens
                if weight != 1.0:
                    loss = loss * weight
            loss.backward()
        total += loss.detach()
    return total


def clip_gradients(model: torch.nn.Module, loss: torch.Tensor, tokens: int, grad_clip: float) -> StepStats:
    """Clip the gradient in ``model``'s ``.grad`` to global norm ``grad_clip`` (0 = no clipping)
    and describe the step whose mean ``loss`` over ``tokens`` target tokens produced it."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # .item() waits for the device; do it once per step, not per micro-batch.
    loss_value, norm_value = float(loss.item()), float(grad_norm.item())
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    return StepStats(loss=loss_value, grad_norm=norm_value, tokens=tokens, finite=finite)


def compute_gradients(model: torch.nn.Module, batch: torch.Tensor, *, micro_batch_size: int,
                      grad_clip: float, autocast_dtype: torch.dtype | None = None) -> StepStats:
    """Forward and backward ``batch`` (``(B, seq_len+1)`` token ids) in micro-batches,
    leaving in ``.grad`` the gradient of the mean loss over the whole batch, clipped to
    global norm ``grad_clip`` (0 = no clipping).

    Promises: the ``.grad`` of every parameter holds this batch's gradient only (old
    gradients are cleared first), and it equals the full-batch gradient whatever
    ``micro_batch_size`` is (up to float rounding), since each micro-batch's summed loss
    is divided by the token count of the whole batch.
    """
    _check_batch(batch)
    n_tokens = batch.size(0) * (batch.size(1) - 1)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, batch, micro_batch_size=micro_batch_size, total_tokens=n_tokens,
                                autocast_dtype=autocast_dtype)
    return clip_gradients(model, loss, n_tokens, grad_clip)


def contiguous_part(samples: range, index: int, of: int) -> range:
    """Part ``index`` of ``samples`` cut into ``of`` contiguous parts whose sizes differ by at
    most one (the first ones larger); a part is empty when there are fewer samples than parts.

    >>> [contiguous_part(range(10, 15), i, 2) for i in range(2)]
    [range(10, 13), range(13, 15)]
    >>> [contiguous_part(range(0, 1), i, 2) for i in range(2)]
    [range(0, 1), range(1, 1)]
    """
    size, extra = divmod(len(samples), of)  # the first `extra` parts hold one more
    start = samples.start + index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def eval_samples(provider: "SampleProvider", *, batches: int, batch_size: int, part: tuple[int, int] = (0, 1)) -> range:
    """The validation samples that part ``part[0]`` of ``part[1]`` evaluates.

    The whole set is samples ``0 .. batches*batch_size-1`` (fewer if the provider holds
    fewer), the same on every call; it is cut into ``part[1]`` contiguous slices whose
    sizes differ by at most one, so nodes holding the same weights can each measure a
    slice and together measure the whole set once.

    >>> class P: num_samples = 100
    >>> [eval_samples(P(), batches=2, batch_size=8, part=(i, 3)) for i in range(3)]
    [range(0, 6), range(6, 11), range(11, 16)]
    """
    index, of = part
    if not 0 <= index < of:
        raise ValueError(f"evaluate: part {index} of {of} does not exist")
    return contiguous_part(range(min(batches * batch_size, provider.num_samples)), index, of)


@torch.no_grad()
def evaluate(model: torch.nn.Module, provider: "SampleProvider", *, batches: int, batch_size: int,
             autocast_dtype: torch.dtype | None = None, part: tuple[int, int] = (0, 1)) -> float:
    """Mean next-token cross-entropy (nats) on the validation samples of ``part`` (see
    :func:`eval_samples`; by default all of samples ``0 .. batches*batch_size-1``).

    Leaves the model in the train/eval mode it was in.
    """
    samples = eval_samples(provider, batches=batches, batch_size=batch_size, part=part)
    if len(samples) <= 0:
        raise ValueError(f"evaluate: nothing to evaluate (batches={batches}, batch_size={batch_size}, part={part}, "
                         f"{provider.num_samples} samples in {provider.source.name})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for start in range(samples.start, samples.stop, batch_size):
            batch = provider.batch(range(start, min(samples.stop, start + batch_size))).to(device)
            with _autocast(device, autocast_dtype):
                total += _sum_cross_entropy(model, batch).double()
    finally:
        model.train(was_training)
    return float(total.item()) / (len(samples) * provider.seq_len)
