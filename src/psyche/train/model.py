"""The model: a Hugging Face ``LlamaForCausalLM`` built from the run config's sizes.

Model code stays plain Transformers; nothing here knows about peers or devices
beyond "build on CPU, deterministically".
"""

from __future__ import annotations

import hashlib

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from psyche.config import ModelConfig

_MODEL_CODE_IMPORT = threading.Lock()
"""Held while the Transformers model code is imported (see :func:`import_model_code`)."""


def llama_config(model_cfg: "ModelConfig", *, eot_token_id: int = 0) -> "LlamaConfig":
    """The ``transformers.LlamaConfig`` for ``model_cfg``'s sizes.

    ``eot_token_id`` (the tokenizer's ``<|endoftext|>``, id 0 for ``psyche tokenize``
    output) serves as BOS, EOS and padding, so generation stops at a document end.
    """
    import_model_code()
    from transformers import LlamaConfig

    # transformers 5 types its __init__ with rope_parameters only, yet still takes rope_theta
    # (folding it into rope_parameters); 4.x (>= 4.45, which we support) knows only rope_theta.
    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_key_value_heads,
        max_position_embeddings=model_cfg.seq_len,
        rope_theta=model_cfg.rope_theta,  # transformers 5 folds this into rope_parameters
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_token_id=eot_token_id,
        eos_token_id=eot_token_id,
        pad_token_id=eot_token_id,
        use_cache=True,
    )


def quiet_transformers() -> None:
    """Turn off Transformers' own progress bars and info logs (we show rich progress)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu") -> "PreTrainedModel":
    """``AutoModelForCausalLM.from_pretrained(path)`` in float32 on ``device``."""
    import_model_code()
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    # Transformers wraps PreTrainedModel.to in a decorator whose types drop the bound self.
    return model.to(device)  # type: ignore[arg-type]


def import_model_code() -> None:
    """Import the Transformers model classes :func:`build_model` needs.

    They take seconds to import; a client calls this in a background thread when it
    starts, so the import overlaps waiting for the run rather than delaying its warmup.
    Safe from several threads at once, and every function here that needs the model code
    calls it first: Transformers' lazy imports are not thread-safe (a thread importing a
    class while another is still importing its module gets "cannot import name
    'LlamaForCausalLM'"), so the import runs under a lock; once done, a call is cheap.
    """
    with _MODEL_CODE_IMPORT:
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401


def build_model(model_cfg: "ModelConfig", *, seed: int | None = None, eot_token_id: int = 0) -> "PreTrainedModel":
    """A causal LM for ``model_cfg``: loaded from ``model_cfg.checkpoint`` if set, else
    freshly initialised on CPU in float32 from ``seed`` (default ``model_cfg.init_seed``).

    Promises: the same config and seed give bit-identical weights, on any call and in any
    process, and the global torch RNG is left as it was.
    """
    import_model_code()
    from transformers import LlamaForCausalLM

    if model_cfg.checkpoint:
        return load_pretrained(model_cfg.checkpoint)
    seed = model_cfg.init_seed if seed is None else seed
    config = llama_config(model_cfg, eot_token_id=eot_token_id)
    # fork_rng restores the caller's RNG state; initialisation draws only from our seed.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 (hex) over the raw bytes of every ``state_dict`` tensor (contiguous, on CPU), in
    sorted key order: equal on two nodes exactly when they hold bit-identical weights."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    """The number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
