"""The trainer: a Transformers LLaMA, LR schedules, the gradient half of a step, checkpoints.

Public API::

    build_model(model_cfg, *, seed=None, eot_token_id=0) -> LlamaForCausalLM
    lr_at(step, lr_cfg, total_steps) -> float
    compute_gradients(model, batch, *, micro_batch_size, grad_clip, autocast_dtype=None) -> StepStats
    evaluate(model, provider, *, batches, batch_size, autocast_dtype=None) -> float
    save_checkpoint(model, out_dir, *, tokenizer_path, extra) -> Path
    load_checkpoint(path, *, device="cpu") -> Checkpoint(path, model, state)
    build_optimizer(model, opt_cfg, lr_cfg, *, kind) -> AdamW | DisTrO
    train(run_cfg, *, out_dir, steps=None, optimizer=None, ...) -> TrainResult
"""

from psyche.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint, save_tokenizer
from psyche.train.loop import (
    TrainingError,
    TrainResult,
    build_optimizer,
    optimizer_update,
    prepare_data,
    tokenizer_path_for,
    train,
)
from psyche.train.model import build_model, count_parameters, llama_config, load_pretrained
from psyche.train.schedule import lr_at
from psyche.train.step import StepStats, compute_gradients, default_autocast_dtype, evaluate

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "StepStats",
    "TrainResult",
    "TrainingError",
    "build_model",
    "build_optimizer",
    "compute_gradients",
    "count_parameters",
    "default_autocast_dtype",
    "evaluate",
    "llama_config",
    "load_checkpoint",
    "load_pretrained",
    "lr_at",
    "optimizer_update",
    "prepare_data",
    "save_checkpoint",
    "save_tokenizer",
    "tokenizer_path_for",
    "train",
]
