"""``psyche train``: the single-machine training loop, written out top to bottom.

Per step: set the LR, read the step's batch, forward/backward over micro-batches and
clip (:func:`compute_gradients`), update unless the step was not finite (AdamW, or
DisTrO's ``generate()`` then ``apply([own results])`` as a network of one peer),
maybe evaluate, log a metrics line, maybe checkpoint.

Steps are counted as the network counts them: step ``k`` is the ``k``-th optimizer
update (from 1), and a run "at step ``k``" has completed ``k`` steps (0 before any
training). Step ``k`` trains sample indices ``[(k-1)*B, k*B)`` of the train split with
the LR ``lr_at(k-1)``, as a client trains the coordinator's step ``k``, so a run is
reproducible and a resumed run continues with exactly the data it would have seen.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from psyche.distro import DisTrO
from psyche.train.checkpoint import load_checkpoint, save_checkpoint
from psyche.train.device import resolve_device
from psyche.train.model import build_model, count_parameters
from psyche.train.schedule import lr_at
from psyche.train.step import compute_gradients, default_autocast_dtype, evaluate

if TYPE_CHECKING:
    from rich.console import Console

    from psyche.config import LRScheduleConfig, OptimizerConfig, RunConfig
    from psyche.data import RunData

OptimizerKind = Literal["adamw", "distro"]
MAX_CONSECUTIVE_SKIPS = 10


class TrainingError(RuntimeError):
    """Training cannot go on (bad data/model pairing, divergence); the message says which step and why."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished ``train`` call produced."""

    checkpoint: Path
    metrics_path: Path
    steps: int
    """Optimizer steps completed in total (including those before a resume)."""
    tokens: int
    """Target tokens trained on in this call."""
    first_loss: float
    last_loss: float
    initial_val_loss: float
    final_val_loss: float
    skipped_steps: int
    parameters: int


def build_optimizer(model: torch.nn.Module, opt_cfg: "OptimizerConfig", lr_cfg: "LRScheduleConfig", *,
                    kind: OptimizerKind) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, weight decay on matrices only) or DisTrO as the run's config
    describes it (:meth:`DisTrO.from_config`, the builder every client uses). Its LR starts at
    ``lr_cfg.peak_lr``; the loop sets each step's LR before using it."""
    if kind == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt_cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # norms, biases
        ]
        return torch.optim.AdamW(groups, lr=lr_cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)
    if kind == "distro":
        return DisTrO.from_config(model, opt_cfg, lr_cfg)
    raise TrainingError(f"optimizer.kind: unknown optimizer {kind!r} (adamw or distro)")


def optimizer_update(optimizer: torch.optim.Optimizer, *, steps_done: int) -> None:
    """One update from the gradients in ``.grad``, the run's step ``steps_done + 1``. DisTrO
    runs as a network of one peer: it applies exactly the results it generated, its momentum
    warmup following the run's step (see :meth:`DisTrO.generate`) rather than its own count,
    which a skipped step would leave behind."""
    if isinstance(optimizer, DisTrO):
        optimizer.apply([optimizer.generate(steps_done=steps_done)])
    else:
        optimizer.step()


def prepare_data(cfg: "RunConfig", *, location: str | Path | None = None, progress: bool = True) -> "RunData":
    """The run's train/val providers. The default location (``data/fortunes``) is built on
    first use; any other must already exist. The data's vocabulary must fit the model's."""
    from psyche.data import DataError, builds_on_first_use, ensure_default_dataset, provider_kind, providers_for, read_meta

    # A folder written in a config file is relative to that file (RunConfig.data_location).
    loc = str(location if location is not None else cfg.data_location())
    local = provider_kind(loc, cfg.data.provider) == "local"
    if local and builds_on_first_use(loc) and not (Path(loc) / "meta.json").is_file():
        ensure_default_dataset(loc, progress=progress)
    if local:
        vocab = read_meta(loc).get("vocab_size", 0)
        if vocab > cfg.model.vocab_size:
            raise DataError(f"{loc}: the tokenizer's vocabulary ({vocab}) exceeds model.vocab_size ({cfg.model.vocab_size})")
    return providers_for(cfg, location=loc)


def tokenizer_path_for(data: "RunData") -> Path | None:
    """The ``tokenizer.json`` next to a local train split, if there is one."""
    name = getattr(data.train.source, "name", "")
    p = Path(name).parent / "tokenizer.json"
    return p if p.is_file() else None


def train(cfg: "RunConfig", *, out_dir: str | Path, steps: int | None = None, optimizer: OptimizerKind | None = None,
          device: str | None = None, data_location: str | Path | None = None, batch_size: int | None = None,
          eval_every: int | None = None, eval_batches: int = 4, checkpoint_every: int = 0,
          resume: str | Path | None = None, stop_at: int | None = None, console: "Console | None" = None,
          progress: bool = True) -> TrainResult:
    """Train ``cfg``'s model on one machine to ``steps`` total steps (default
    ``coordinator.total_steps``); write ``out_dir/metrics.jsonl`` (one JSON line per
    step, numbered 1..``steps``: step, loss, lr, tokens_per_sec, grad_norm, and val_loss
    when measured) and ``out_dir/checkpoint/`` (its ``step`` is the number of steps
    completed, as in a client's checkpoint). ``resume`` continues from a checkpoint folder
    written by this function (weights, optimizer state, step) with the next step. The LR
    schedule spans ``steps``; ``stop_at`` ends this call after that many steps
    (checkpointing there), so a later ``resume`` finishes the run exactly as an
    uninterrupted one would have.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind: OptimizerKind = optimizer or cfg.optimizer.kind
    B = batch_size or cfg.coordinator.global_batch_size_end
    dev = torch.device(resolve_device(device))
    amp = default_autocast_dtype(dev)

    data = prepare_data(cfg, location=data_location, progress=progress)
    tokenizer_path = tokenizer_path_for(data)
    start = 0
    state: dict[str, Any] = {}
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model, state, start = ckpt.model, ckpt.state, ckpt.step
        if steps is None and "total_steps" in state:
            steps = int(state["total_steps"])  # keep the interrupted run's schedule
        if state.get("optimizer_kind", kind) != kind:
            raise TrainingError(f"{resume}: was trained with {state['optimizer_kind']}, cannot resume with {kind}")
    else:
        model = build_model(cfg.model)
    total = steps if steps is not None else cfg.coordinator.total_steps
    model.to(dev)  # type: ignore[arg-type]  # transformers' wrapper of .to drops the bound self in its types
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, kind=kind)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    end = total if stop_at is None else max(start, min(stop_at, total))
    n_params = count_parameters(model)
    every = eval_every or max(1, total // 5)
    console.print(f"training {cfg.name} on {dev}: {n_params / 1e6:.2f}M params, {kind}, {total} steps x "
                  f"{B} x {cfg.model.seq_len} tokens" + (f", resuming after step {start}" if start else ""),
                  highlight=False)

    initial_val = evaluate(model, data.val, batches=eval_batches, batch_size=B, autocast_dtype=amp)
    console.print(f"val loss {'after step ' + str(start) if start else 'before training'}: {initial_val:.4f}",
                  highlight=False)
    metrics_path = out / "metrics.jsonl"
    ckpt_dir = out / "checkpoint"
    skipped = consecutive_skips = 0
    tokens_done = 0
    first_loss = last_loss = math.nan
    val_loss = initial_val

    def checkpoint(step_done: int) -> Path:
        extra = {"step": step_done, "optimizer_kind": kind, "optimizer": opt.state_dict(),
                 "config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(),
                 "total_steps": total, "val_loss": val_loss}
        return save_checkpoint(model, ckpt_dir, tokenizer_path=tokenizer_path, extra=extra)

    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                          "{task.fields[tps]:,.0f} tok/s  val {task.fields[val]:.4f}"),
               TimeElapsedColumn())
    # A resumed run continues its metrics file; a fresh run starts a new one.
    with metrics_path.open("a" if resume is not None else "w") as log, Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=math.nan, lr=0.0, tps=0.0, val=initial_val)
        # `step` is the step's number (from 1); `step - 1` steps are done before it.
        for step in range(start + 1, end + 1):
            # 1) the learning rate of this step
            lr = lr_at(step - 1, cfg.lr, total)
            for group in opt.param_groups:
                group["lr"] = lr
            # 2) this step's samples, forward/backward over micro-batches, clip
            t0 = time.perf_counter()
            batch = data.train.batch(range((step - 1) * B, step * B))  # (B, T+1)
            stats = compute_gradients(model, batch, micro_batch_size=cfg.optimizer.micro_batch_size,
                                      grad_clip=cfg.optimizer.grad_clip, autocast_dtype=amp)
            # 3) update, unless the loss or gradient is not finite
            if stats.finite:
                optimizer_update(opt, steps_done=step - 1)
                consecutive_skips = 0
            else:
                model.zero_grad(set_to_none=True)
                skipped += 1
                consecutive_skips += 1
                bar.console.print(f"step {step}: non-finite loss/grad norm ({stats.loss}, {stats.grad_norm}); update skipped")
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingError(f"step {step}: {consecutive_skips} non-finite steps in a row; training diverged")
            if dev.type == "cuda":
                torch.cuda.synchronize()  # so the throughput below measures the work, not the queue
            dt = time.perf_counter() - t0
            tokens_done += stats.tokens
            first_loss = stats.loss if math.isnan(first_loss) else first_loss
            last_loss = stats.loss
            record: dict[str, Any] = {"step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                                      "tokens": stats.tokens, "tokens_per_sec": stats.tokens / dt if dt > 0 else None,
                                      "skipped": not stats.finite}
            # 4) evaluate every `every` steps and after the last one
            if step % every == 0 or step == end:
                val_loss = evaluate(model, data.val, batches=eval_batches, batch_size=B, autocast_dtype=amp)
                record["val_loss"] = val_loss
                bar.console.print(f"step {step}: loss {stats.loss:.4f}  val {val_loss:.4f}  lr {lr:.2e}  "
                                  f"{record['tokens_per_sec'] or 0:,.0f} tok/s", highlight=False)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(task, advance=1, loss=stats.loss, lr=lr, tps=record["tokens_per_sec"] or 0.0, val=val_loss)
            # 5) periodic checkpoint
            if checkpoint_every and step % checkpoint_every == 0 and step < end:
                checkpoint(step)
    path = checkpoint(end)
    console.print(f"val loss {initial_val:.4f} -> {val_loss:.4f}; checkpoint written to {path}"
                  + (f" (stopped at step {end} of {total}; continue with --resume {path})" if end < total else ""),
                  highlight=False)
    return TrainResult(checkpoint=path, metrics_path=metrics_path, steps=end, tokens=tokens_done,
                       first_loss=first_loss, last_loss=last_loss, initial_val_loss=initial_val,
                       final_val_loss=val_loss, skipped_steps=skipped, parameters=n_params)
