"""Checkpoints: a ``save_pretrained`` folder plus what it takes to resume.

A checkpoint folder holds::

    config.json, generation_config.json, model.safetensors    (model.save_pretrained)
    tokenizer.json, tokenizer_config.json, ...                 (PreTrainedTokenizerFast.save_pretrained)
    psyche_state.pt     torch.save of the whole ``extra`` dict (step, optimizer state, ...)
    psyche_state.json   the JSON-representable part of it, for people and dashboards

so ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load it offline, and :func:`load_checkpoint` resumes from it. Its ``step`` is the number of
optimizer steps the weights include (``psyche train`` and clients alike; the coordinator's
checkpoint record uses the same count), so a resume continues with step ``step + 1``.
Folders are written to a temporary sibling and renamed into place: a crash never leaves
half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from psyche.data.tokenize import EOT
from psyche.fsutil import replace_dir
from psyche.train.model import load_pretrained, quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATE_PT = "psyche_state.pt"
STATE_JSON = "psyche_state.json"


class CheckpointError(ValueError):
    """A folder is not a loadable checkpoint; the message names the folder and the file."""


def _json_part(extra: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in extra.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue  # tensors, optimizer state: only in the .pt file
        out[k] = v
    return out


def save_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, *, model_max_length: int | None = None) -> None:
    """Write ``tokenizer_path`` (a tokenizers JSON) to ``out_dir`` in Hugging Face form,
    with ``<|endoftext|>`` as BOS/EOS/pad if the tokenizer has it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    special: dict[str, str] = {}
    if Tokenizer.from_file(str(tokenizer_path)).token_to_id(EOT) is not None:
        special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    kwargs: dict[str, Any] = dict(tokenizer_file=str(tokenizer_path), clean_up_tokenization_spaces=False, **special)
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    PreTrainedTokenizerFast(**kwargs).save_pretrained(str(out_dir))


def save_checkpoint(model: "PreTrainedModel", out_dir: str | Path, *, tokenizer_path: str | Path | None,
                    extra: dict[str, Any]) -> Path:
    """Write ``model``, the tokenizer and ``extra`` (step, optimizer state, config digest,
    ...) as a checkpoint folder at ``out_dir``, replacing any older one there. Returns the path."""
    quiet_transformers()
    out = Path(out_dir)
    if out.exists() and not (out / "config.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # Never replace a folder that is not a checkpoint: it may hold anything.
        raise CheckpointError(f"{out}: exists and is not a checkpoint folder (no config.json); not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_path is not None:
            save_tokenizer(tokenizer_path, tmp, model_max_length=getattr(model.config, "max_position_embeddings", None))
        torch.save(extra, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(_json_part(extra), indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (float32, on ``device``) and the saved ``extra`` dict."""

    path: Path
    model: "PreTrainedModel"
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """Optimizer steps completed when it was saved (0 if not recorded)."""
        return int(self.state.get("step", 0))

    @property
    def tokenizer_path(self) -> Path | None:
        """The folder's ``tokenizer.json``, if it has one."""
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint` (or any
    ``save_pretrained`` causal-LM folder, whose state is then empty)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")
    try:
        model = load_pretrained(path, device=device)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the model ({exc})") from None
    state: dict[str, Any] = {}
    if (path / STATE_PT).is_file():
        try:
            # weights_only: a checkpoint may come from a peer; never unpickle code.
            state = torch.load(path / STATE_PT, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises a variety of pickle/zip errors
            raise CheckpointError(f"{path / STATE_PT}: unreadable ({exc})") from None
    elif (path / STATE_JSON).is_file():
        state = json.loads((path / STATE_JSON).read_text())
    return Checkpoint(path=path, model=model, state=state)
