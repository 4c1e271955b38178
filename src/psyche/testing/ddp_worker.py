"""The baseline a user would otherwise run: plain PyTorch DDP with AdamW, one process per node.

Run ``python -m psyche.testing.ddp_worker --config RUN.toml --rank R --world W
--master-addr IP --master-port PORT --steps N --out FILE.json`` on each of ``W`` nodes
(rank 0's address is the master). Every rank trains the run's LLaMA, built exactly as a
Psyche client builds it (:func:`psyche.train.model.build_model` of ``cfg.model``), on
the run's token data, as a WAN benchmark compares it with a Psyche run:

- step ``s`` (from 1) reads the global batch of ``B = coordinator.global_batch_size_start``
  train samples ``[(s-1)*B, s*B)``, the interval a Psyche run trains at step ``s``;
  rank ``r`` of ``W`` trains the contiguous share ``[start + r*B/W, start + (r+1)*B/W)``
  (``B`` must divide by ``W``);
- the share is split into micro-batches of ``optimizer.micro_batch_size``; every
  backward but the last runs under ``no_sync()``, so DDP all-reduces (averages) the
  gradient once per step, overlapped with the last backward, as a user would write it;
- the gradient is clipped to ``optimizer.grad_clip`` (0 = off), then AdamW (betas
  0.9/0.95, no weight decay) steps with the LR of :func:`lr_at_step`; a step whose
  gradient norm is not finite is skipped (the norm is of the all-reduced gradient, so
  every rank skips the same steps).

Gloo on CPU with one torch thread (each node is one CPU share). Rank ``r`` writes
``--out``: ``rank``, ``world``, ``params``, ``steps``, and per step ``step_s``,
``local_s``, ``data_s``, ``loss``, ``warmup`` and ``skipped`` (see :func:`main`), plus
``weights_sha256`` with ``--weights-digest``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from psyche.config import ConfigError, RunConfig, load_config

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
"""How long a collective (and the rendezvous) waits for a slow or late peer over a WAN."""


def lr_at_step(step: int, *, peak: float, warmup_steps: int) -> float:
    """The LR of step ``step`` (from 1): deliberately simpler than the run's schedule.

    1) warmup (``step <= warmup_steps``): linear, ``peak * step / warmup_steps``;
    2) afterwards: constant ``peak``.

    >>> [lr_at_step(s, peak=1.0, warmup_steps=4) for s in (1, 2, 4, 9)]
    [0.25, 0.5, 1.0, 1.0]
    >>> lr_at_step(1, peak=1.0, warmup_steps=0)
    1.0
    """
    if step <= warmup_steps:
        return peak * step / warmup_steps
    return peak


def rank_share(step: int, *, batch: int, rank: int, world: int) -> range:
    """The sample indices rank ``rank`` of ``world`` trains at step ``step`` (from 1): its
    contiguous part of the global batch ``[(step-1)*batch, step*batch)``.

    >>> rank_share(2, batch=12, rank=1, world=2)
    range(18, 24)
    """
    share = batch // world
    start = (step - 1) * batch + rank * share
    return range(start, start + share)


def _tx_bytes(iface: str) -> int:
    """Bytes ``iface`` has sent since it was created (this network namespace's counter)."""
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The arguments and the run config; a bad one exits 2 with one ``error:`` line (argparse)."""
    p = argparse.ArgumentParser(prog="python -m psyche.testing.ddp_worker",
                                description="Plain DDP + AdamW on the run's model and data (the WAN baseline).")
    p.add_argument("--config", required=True, help="the run's TOML config")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master-addr", required=True, help="rank 0's address")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="where this rank writes its JSON report")
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR (default 3e-3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="linear LR warmup steps, then constant (default 1)")
    p.add_argument("--ifname", default=None, help="network interface gloo binds to (sets GLOO_SOCKET_IFNAME)")
    p.add_argument("--data", default=None, help="token data folder (default: the config's data.location)")
    p.add_argument("--count-bytes", default=None, metavar="IFACE",
                   help="record the bytes IFACE has sent after each step (tx_bytes, per step)")
    p.add_argument("--weights-digest", action="store_true",
                   help="add weights_sha256 (the final weights' digest) to the report")
    a = p.parse_args(argv)
    if a.world < 1:
        p.error(f"--world must be >= 1 (got {a.world})")
    if not 0 <= a.rank < a.world:
        p.error(f"--rank must be in [0, {a.world}) (got {a.rank})")
    if not 0 < a.master_port < 65536:
        p.error(f"--master-port must be in 1..65535 (got {a.master_port})")
    if a.steps < 1:
        p.error(f"--steps must be >= 1 (got {a.steps})")
    if not (math.isfinite(a.lr) and a.lr > 0):
        p.error(f"--lr must be a positive number (got {a.lr})")
    if a.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0 (got {a.warmup_steps})")
    try:
        cfg = load_config(a.config)
    except ConfigError as exc:
        p.error("; ".join(exc.lines()))
    B = cfg.coordinator.global_batch_size_start
    if B % a.world:
        p.error(f"{a.config}: coordinator.global_batch_size_start ({B}) must be divisible by --world ({a.world})")
    return a, cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Train ``--steps`` steps as rank ``--rank`` of ``--world`` and write the report to ``--out``.

    The report's per-step lists (index ``i`` is step ``i+1``):

    - ``step_s``: seconds of the whole step: forward/backward of every micro-batch, the
      gradient all-reduce, clipping and the optimizer step (not reading the batch);
    - ``local_s``: the part spent in purely local compute: the forward/backward of every
      micro-batch but the last, plus the last one's forward. The last backward is left
      out because DDP overlaps the all-reduce with it, so the two cannot be told apart;
      ``step_s - local_s`` is that backward, the all-reduce and the update;
    - ``data_s``: seconds reading the rank's share from the data provider;
    - ``loss``: mean next-token cross-entropy (nats) over this rank's share only;
    - ``warmup``: true for step 1, which pays one-time costs (gloo's first buckets, lazy
      allocations): leave it out of averages;
    - ``skipped``: true where the gradient norm was not finite and the update was skipped;
    - ``tx_bytes`` (with ``--count-bytes IFACE``): bytes the interface had sent after the step
      (differences give the bytes a step sent: the all-reduce, and gloo's own traffic).

    Promises: every rank applies the same averaged gradient, so after the run all ranks
    hold bit-identical weights (``weights_sha256`` checks it).
    """
    a, cfg = _parse(argv)
    from psyche.data import DataError
    from psyche.train.loop import prepare_data
    from psyche.train.model import build_model, count_parameters, weights_sha256

    torch.set_num_threads(1)  # each node stands for one CPU share
    if a.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = a.ifname  # read by gloo when the group is created
    try:
        data = prepare_data(cfg, location=a.data, progress=False)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The trainer's init (LocalTrainer.init_model): the config's checkpoint, or init_seed.
    model = build_model(cfg.model)
    n_params = count_parameters(model)

    dist.init_process_group("gloo", init_method=f"tcp://{a.master_addr}:{a.master_port}",
                            rank=a.rank, world_size=a.world, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                                betas=(0.9, 0.95), weight_decay=0.0)
        B, mbs = cfg.coordinator.global_batch_size_start, cfg.optimizer.micro_batch_size
        max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        report: dict[str, Any] = {"rank": a.rank, "world": a.world, "params": n_params, "steps": 0,
                                  "step_s": [], "local_s": [], "data_s": [], "loss": [], "warmup": [],
                                  "skipped": []}
        ddp.train()
        dist.barrier()  # step 1's clock starts when every rank is ready, not at the slowest start-up
        for step in range(1, a.steps + 1):
            # 1) this step's LR and this rank's share of the global batch
            for g in opt.param_groups:
                g["lr"] = lr_at_step(step, peak=a.lr, warmup_steps=a.warmup_steps)
            t_data = time.perf_counter()
            batch = data.train.batch(rank_share(step, batch=B, rank=a.rank, world=a.world))  # (b, T+1)
            t0 = time.perf_counter()
            # 2) forward/backward per micro-batch; only the last backward all-reduces
            opt.zero_grad(set_to_none=True)
            n_tokens = batch.size(0) * (batch.size(1) - 1)
            micro = batch.split(mbs)  # (m, T+1) each
            total = torch.zeros(())
            local_s = 0.0
            for i, mb in enumerate(micro):
                x, y = mb[:, :-1], mb[:, 1:]  # (m, T) inputs and their next tokens
                last = i == len(micro) - 1
                if last:
                    logits = ddp(input_ids=x, use_cache=False).logits  # (m, T, V)
                    # Summed over the micro-batch, divided by the share's tokens: the share's
                    # mean; DDP then averages the ranks' gradients into the global batch's mean.
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum") / n_tokens
                    local_s = time.perf_counter() - t0
                    loss.backward()  # DDP's all-reduce runs in buckets during this backward
                else:
                    with ddp.no_sync():
                        logits = ddp(input_ids=x, use_cache=False).logits  # (m, T, V)
                        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                               reduction="sum") / n_tokens
                        loss.backward()
                total += loss.detach()
            # 3) clip and update, unless the averaged gradient is not finite (same on every rank)
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            finite = math.isfinite(norm)
            if finite:
                opt.step()
            step_s = time.perf_counter() - t0
            report["step_s"].append(step_s)
            report["local_s"].append(local_s)
            report["data_s"].append(t0 - t_data)
            report["loss"].append(float(total))
            report["warmup"].append(step == 1)
            report["skipped"].append(not finite)
            if a.count_bytes:
                report.setdefault("tx_bytes", []).append(_tx_bytes(a.count_bytes))
            report["steps"] = step
        if a.weights_digest:
            report["weights_sha256"] = weights_sha256(model)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report) + "\n")
        tmp.replace(out)  # a reader polling for the file never sees half of it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
