"""One node's model, optimizer and data: the torch half of the client runtime.

The runtime decides *when* (it follows the coordinator); this module does *what*:
train an assigned sample interval into a compressed DisTrO payload, apply the
payloads the witnesses agreed on, evaluate, checkpoint, and hand the weights to
peers. Every node applies the same payloads in the same order with the same
learning rate, so all nodes hold bit-identical weights (on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from psyche.client.timing import PhaseTimer
from psyche.config import RunConfig
from psyche.distro import DisTrO, ResultLayout, SparseResult, decode_payload, encode_payload
from psyche.distro.verify import Reference, output_parameter, output_references, score_checks
from psyche.train.checkpoint import save_checkpoint
from psyche.train.model import build_model, count_parameters, load_pretrained, weights_sha256
from psyche.train.schedule import lr_at
from psyche.train.step import StepStats, compute_gradients, default_autocast_dtype, eval_samples, evaluate

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from psyche.p2p.model import FetchedModel
    from psyche.p2p.torch_io import StateDictSink


PARSED_CACHE_BYTES = 256 << 20
"""Tensor bytes of parsed payloads kept between verifying a result and applying it."""

CHECK_BUDGET = 0.1
"""Verification may cost at most this share of a node's training work in a round."""
FORWARD_SHARE = 1 / 3
"""A forward pass's share of a forward and backward one: what a reference costs per sequence."""


@dataclass(frozen=True)
class TrainOutput:
    """What training one interval produced."""

    payload: bytes
    loss: float
    tokens: int
    seconds: float
    finite: bool
    forward_backward_seconds: float = 0.0
    """The part of ``seconds`` spent in forward and backward passes."""


class LocalTrainer:
    """The model and DisTrO optimizer of one node, fed by the run's data provider."""

    def __init__(self, cfg: RunConfig, *, device: str = "cpu", data_location: str | None = None,
                 eval_batches: int = 2, eval_batch_size: int = 8):
        from psyche.train.loop import prepare_data, tokenizer_path_for

        self.cfg = cfg
        self.device = torch.device(device)
        self.amp = default_autocast_dtype(self.device)
        self.data_location = data_location
        self.data = prepare_data(cfg, location=data_location, progress=False)
        self.tokenizer_path = tokenizer_path_for(self.data)
        self.ranks = 1
        """Processes (one per device) that train each step of this node."""
        self.eval_batches = eval_batches
        self.eval_batch_size = eval_batch_size
        self.model: PreTrainedModel | None = None
        self.optimizer: DisTrO | None = None
        self.layouts: list[ResultLayout] = []
        """Each parameter's result layout: a peer's payload is read with these (and refused when made for others)."""
        # Payloads parsed when verified, kept for the apply a step later: parsing (the
        # position codes) is most of the cost of both, and each result is needed twice.
        self._parsed: OrderedDict[bytes, tuple[list[SparseResult], int]] = OrderedDict()
        self._parsed_bytes = 0
        self._parsed_lock = threading.Lock()  # verify runs on the event loop, apply in a worker thread
        self.lr_window: tuple[int, int] | None = None
        self._in_flight: tuple[int, list[SparseResult]] | None = None
        """This node's own results of its last trained step, until that step is applied (the
        lookahead of the next step trains with them; see :meth:`train`)."""
        self.timer = PhaseTimer()
        """Seconds spent per kind of work (data, forward_backward, compress, verify: decoding peers'
        results, check: scoring them against their data, apply, lookahead, ...)."""

    # -- the model -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether a model is loaded."""
        return self.model is not None

    def init_model(self) -> None:
        """Build the epoch-0 model: from ``model.checkpoint`` or a fresh init from the run's seed."""
        with self.timer.phase("model_load"):
            self._install(build_model(self.cfg.model))

    def load_checkpoint_folder(self, path: str | Path) -> None:
        """Load weights from a ``save_pretrained`` folder (a checkpoint the run reported)."""
        with self.timer.phase("model_load"):
            self._install(load_pretrained(path))

    async def fetch_from_peers(self, fetch: Callable[[StateDictSink], Awaitable[FetchedModel]]) -> FetchedModel:
        """Take the weights from peers: ``fetch(sink)`` (a :meth:`P2PNode.fetch_model` call) writes
        each verified part straight into a freshly built CPU model of the run's architecture,
        which is installed once every part is in. The model is held once, never as a download
        buffer plus a copy. Raises what ``fetch`` raises (``ModelMismatch`` when peers serve
        another architecture)."""
        from psyche.p2p.torch_io import StateDictSink

        with self.timer.phase("model_load"):
            model = build_model(self.cfg.model)
        fetched = await fetch(StateDictSink(model.state_dict()))
        with self.timer.phase("model_load"):
            self._install(model)
        return fetched

    def _install(self, model: PreTrainedModel) -> None:
        model.to(self.device)  # type: ignore[arg-type]  # transformers' wrapper of .to drops the bound self in its types
        self.model = model
        self._in_flight = None
        # Every peer builds it the same way (results travel in parameter-group order).
        self.optimizer = DisTrO.from_config(model, self.cfg.optimizer, self.cfg.lr)
        self.layouts = self.optimizer.result_layouts()
        params = [(g, p) for g in self.optimizer.param_groups for p in g["params"]]
        self._output_index = output_parameter(model, [p for _, p in params])
        self._output_chunk = params[self._output_index][0]["chunk"]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights (what peers fetch at warmup)."""
        assert self.model is not None
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def weights_digest(self) -> str:
        """sha256 (hex) of the weights (:func:`psyche.train.model.weights_sha256`)."""
        assert self.model is not None
        return weights_sha256(self.model)

    def parameters(self) -> int:
        """Number of parameters of the loaded model."""
        assert self.model is not None
        return count_parameters(self.model)

    # -- the schedule --------------------------------------------------------

    def lr(self, step: int) -> float:
        """The LR of coordinator step ``step`` (from 1): the schedule, times the cold-start ramp."""
        total = self.cfg.coordinator.total_steps
        lr = lr_at(step - 1, self.cfg.lr, total)
        if self.lr_window is not None:
            start, end = self.lr_window
            if start <= step < end:
                lr *= (step - start + 1) / (end - start)
        return lr

    def _set_lr(self, step: int) -> None:
        assert self.optimizer is not None
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr(step)

    # -- the step ------------------------------------------------------------

    def train(self, step: int, start: int, end: int) -> TrainOutput:
        """Train samples ``[start, end)`` for ``step``; return this node's compressed result.

        A non-finite loss or gradient sends a result with zero gradient (the momentum
        only decays), so the node stays in step with the network.

        Overlapped (step ``step - 1`` not applied yet, this node trained it, and the config's
        ``optimizer.lookahead`` on): the gradient is taken with this node's own step
        ``step - 1`` results applied (:meth:`DisTrO.lookahead`), and the weights are
        restored bit for bit afterwards.
        """
        assert self.model is not None and self.optimizer is not None
        t0 = time.perf_counter()
        with self.timer.phase("data"):
            batch = self.data.train.batch(self.own_samples(range(start, end)))  # (B, T+1)
        own = self._in_flight[1] if self._in_flight is not None and self._in_flight[0] == step - 1 else None
        with contextlib.ExitStack() as ahead:
            if own is not None:
                self._set_lr(step - 1)  # the LR step - 1's apply will use
                with self.timer.phase("lookahead"):
                    ahead.enter_context(self.optimizer.lookahead(own))
                self._weights_changed()
                ahead.callback(self._weights_changed)  # restored, on leaving the block
            t_fb = time.perf_counter()
            stats = self.gradients(range(start, end), batch)
            fwd_bwd = time.perf_counter() - t_fb
            if own is not None:
                with self.timer.phase("lookahead"):
                    ahead.close()
        self.timer.add("forward_backward", fwd_bwd)
        if not stats.finite:
            self.model.zero_grad(set_to_none=True)
        self._set_lr(step)
        with self.timer.phase("compress"):
            # The momentum warmup follows the run's step, not a local count: this node may
            # have joined late.
            results = self.optimizer.generate(steps_done=step - 1)
            payload = encode_payload(results)
        self._in_flight = (step, results) if self.cfg.optimizer.lookahead else None
        self.model.zero_grad(set_to_none=True)
        return TrainOutput(payload, stats.loss, stats.tokens, time.perf_counter() - t0, stats.finite, fwd_bwd)

    def _weights_changed(self) -> None:
        """Called whenever the weights change outside an install (nothing to do on one device)."""

    def own_samples(self, samples: range) -> range:
        """The samples of a share that this process reads and trains itself (all of them, here)."""
        return samples

    def gradients(self, samples: range, batch: torch.Tensor) -> StepStats:
        """Leave in the model's ``.grad`` the clipped gradient of the mean loss over the training
        samples ``samples``, and describe the step. ``batch`` (``(B, seq_len+1)``) holds the
        samples of :meth:`own_samples`: here, all of them."""
        assert self.model is not None
        return compute_gradients(self.model, batch, micro_batch_size=self.cfg.optimizer.micro_batch_size,
                                 grad_clip=self.cfg.optimizer.grad_clip, autocast_dtype=self.amp)

    def prepare(self) -> None:
        """Get ready to train on the weights just installed (nothing to do on one device)."""

    def close(self) -> None:
        """Release what this trainer started beside this process (nothing, for one device)."""

    def check_payload(self, payload: bytes) -> None:
        """Raise ``ValueError`` unless ``payload`` decodes to results for our parameters."""
        with self.timer.phase("verify"):
            key = hashlib.blake2b(payload, digest_size=16).digest()
            results = decode_payload(payload, self.layouts)
        size = sum(r.indices.nbytes + r.values.nbytes for r in results)
        with self._parsed_lock:
            if key in self._parsed or size > PARSED_CACHE_BYTES:
                return
            self._parsed[key] = (results, size)
            self._parsed_bytes += size
            while self._parsed_bytes > PARSED_CACHE_BYTES:
                _, (_, dropped) = self._parsed.popitem(last=False)
                self._parsed_bytes -= dropped

    def _parsed_payload(self, payload: bytes, *, keep: bool = False) -> list[SparseResult]:
        """``payload`` parsed: taken from what :meth:`check_payload` kept (and forgotten unless
        ``keep``), or parsed now."""
        key = hashlib.blake2b(payload, digest_size=16).digest()
        with self._parsed_lock:
            hit = self._parsed.get(key) if keep else self._parsed.pop(key, None)
            if hit is not None:
                if not keep:
                    self._parsed_bytes -= hit[1]
                return hit[0]
        return decode_payload(payload, self.layouts)

    # -- verification --------------------------------------------------------

    @staticmethod
    def check_sequences(own_samples: int, checks: int) -> int:
        """Sequences of each checked trainer's batch a reference covers, so that ``checks``
        references cost at most :data:`CHECK_BUDGET` of training ``own_samples`` (at least 1)."""
        if checks <= 0:
            return 0
        return max(1, int(CHECK_BUDGET * own_samples / (checks * FORWARD_SHARE)))

    def references(self, picks: list[list[int]]) -> list[Reference]:
        """The references (:func:`psyche.distro.verify.output_references`) of the training samples in
        each list of ``picks``, on the current weights, from one forward pass; no gradient of a step
        in progress is touched."""
        assert self.model is not None
        with self.timer.phase("check"):
            batches = [self.data.train.batch(p) for p in picks]
            return output_references(self.model, batches, self._output_index, self._output_chunk)

    def check_scores(self, checks: list[tuple[Reference, bytes]], results: dict[bytes, bytes]) -> list[float]:
        """For each ``(reference, trainer id)``: the score of that trainer's result
        (:func:`psyche.distro.verify.score_checks`) against the round's other ``results``
        (trainer id -> payload, the checked one and this node's own among them). NaN when the
        result is missing or too few others compare with it."""
        with self.timer.phase("check"):
            parsed = {t: self._parsed_payload(p, keep=True) for t, p in results.items()}
            return score_checks(checks, parsed)

    def apply(self, step: int, payloads: list[bytes]) -> None:
        """Apply the agreed results of ``step`` (in the order given: the same on every node)."""
        assert self.optimizer is not None
        if self._in_flight is not None and self._in_flight[0] <= step:
            self._in_flight = None  # from now on the weights hold that step, whatever was agreed
        if not payloads:
            return
        self._set_lr(step)
        with self.timer.phase("apply"):
            self.optimizer.apply([self._parsed_payload(p) for p in payloads])

    def evaluate(self, part: tuple[int, int] = (0, 1)) -> tuple[float, int]:
        """Validation loss on part ``part[0]`` of ``part[1]`` of the held-out samples (the same
        samples every time; :func:`psyche.train.step.eval_samples`), and the tokens it covered
        (0, and no loss, for an empty part)."""
        assert self.model is not None
        samples = eval_samples(self.data.val, batches=self.eval_batches, batch_size=self.eval_batch_size, part=part)
        if not samples:
            return float("nan"), 0
        with self.timer.phase("evaluate"):
            loss = evaluate(self.model, self.data.val, batches=self.eval_batches, batch_size=self.eval_batch_size,
                            autocast_dtype=self.amp, part=part)
        return (loss if math.isfinite(loss) else float("nan")), len(samples) * self.data.val.seq_len

    def save(self, out_dir: str | Path, *, step: int) -> tuple[Path, bytes]:
        """Write a ``save_pretrained`` folder (atomically); return it and the sha256 of its weights."""
        assert self.model is not None
        with self.timer.phase("checkpoint"):
            out = save_checkpoint(self.model, out_dir, tokenizer_path=self.tokenizer_path,
                                  extra={"step": step, "config": self.cfg.model_dump(mode="json"),
                                         "config_digest": self.cfg.digest()})
            digest = hashlib.sha256()
            for f in sorted(out.glob("*.safetensors")):
                digest.update(f.read_bytes())
        return out, digest.digest()
