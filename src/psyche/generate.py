"""``psyche generate``: stream text from a checkpoint folder.

Transformers' ``generate`` samples (temperature, top-k; greedy at temperature 0) in a
worker thread and a ``TextIteratorStreamer`` hands the decoded text over as tokens
come, so the command prints while the model is still generating. The prompt is
preceded by ``<|endoftext|>``, as every training document is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psyche.data.tokenize import EOT


class GenerateError(ValueError):
    """The checkpoint or the sampling options cannot be used; the message says which."""


def checkpoint_folder_problem(path: Path) -> str | None:
    """Why ``path`` is not a checkpoint folder (a ``save_pretrained`` folder with a
    ``config.json``), as one line naming it and what to pass instead; ``None`` if it is one.

    A folder that is not one itself but holds exactly one checkpoint folder (``runs/demo``
    holds ``runs/demo/checkpoint``) gets that one suggested; several are listed.
    """
    if (path / "config.json").is_file():
        return None
    if not path.exists():
        return f"{path}: no such folder (pass the checkpoint folder psyche train or demo wrote, e.g. runs/<run name>/checkpoint)"
    if not path.is_dir():
        return f"{path}: is a file, not a checkpoint folder (pass the folder that holds config.json)"
    found = sorted(sub for sub in path.iterdir() if (sub / "config.json").is_file())
    if len(found) == 1:
        return f"{path}: not a checkpoint folder (no config.json); did you mean {found[0]}?"
    if found:
        shown = ", ".join(str(sub) for sub in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return f"{path}: not a checkpoint folder (no config.json); it holds {len(found)} checkpoints: pass one of {shown}"
    return f"{path}: not a checkpoint folder (no config.json)"


@dataclass
class Generator:
    """A model and tokenizer loaded from a checkpoint folder, ready to sample."""

    model: Any
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    eot_id: int | None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu") -> "Generator":
        """Load ``path`` with ``AutoModelForCausalLM``/``AutoTokenizer`` (offline)."""
        from transformers import AutoTokenizer

        from psyche.train.model import load_pretrained

        path = Path(path)
        if problem := checkpoint_folder_problem(path):
            raise GenerateError(problem)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise GenerateError(f"{path}: no usable tokenizer ({exc})") from None
        model = load_pretrained(path, device=device).eval()
        eot = tokenizer.convert_tokens_to_ids(EOT)
        return cls(model=model, tokenizer=tokenizer, eot_id=eot if isinstance(eot, int) and eot >= 0 else None)

    def stream(self, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
               top_k: int | None = 50, seed: int = 0) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as tokens are sampled; stops
        after ``max_new_tokens`` or at ``<|endoftext|>``. The same seed gives the same text;
        temperature 0 is greedy."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        if temperature < 0:
            raise GenerateError(f"temperature must be >= 0 (got {temperature})")
        if max_new_tokens < 0:
            raise GenerateError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
        if max_new_tokens == 0:
            return
        device = next(self.model.parameters()).device
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        # Training documents follow an end-of-text token, so a prompt starts after one too;
        # an empty prompt then asks for a whole new document.
        if self.eot_id is not None:
            ids = [self.eot_id] + ids
        if not ids:
            raise GenerateError("empty prompt and the tokenizer has no <|endoftext|> token to start from")
        x = torch.tensor([ids], device=device)  # (1, T)
        # The streamer hands over decoded text as generate() produces tokens (in a thread).
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else dict(do_sample=False)
        kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                      eos_token_id=self.eot_id, pad_token_id=self.eot_id, streamer=streamer, **sampling)
        if temperature > 0:
            kwargs.update(top_p=1.0)
        failure: list[BaseException] = []

        def run() -> None:
            # Sampling draws from the global CPU RNG: seed it privately and restore it after.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                try:
                    self.model.generate(**kwargs)
                except BaseException as exc:  # surfaced in the caller's thread below
                    failure.append(exc)
                    streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if failure:
            raise failure[0]


def generate(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, device: str = "cpu") -> Iterator[str]:
    """Stream the continuation of ``prompt`` from the checkpoint folder ``checkpoint``."""
    gen = Generator.from_checkpoint(checkpoint, device=device)
    yield from gen.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
