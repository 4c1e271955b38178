"""``psyche serve`` on vLLM: the same server, with vLLM's engine doing the batching on GPUs.

vLLM (``pip install 'psyche[vllm]'`` on a CUDA machine) batches continuously and pages its
key/value cache, which is what a busy GPU server wants; :class:`VLLMEngine` puts it behind
the interface of :class:`~psyche.serve.engine.Engine`, so the HTTP side, the checks, the
error shapes and the following of a run are the same code. What differs:

- a completion is one vLLM request (``AsyncLLMEngine.generate``) whose cumulative text is
  turned into the same :class:`~psyche.serve.engine.Text` events; stop sequences and the
  end-of-text token are vLLM's to apply (``stop``, ``stop_token_ids``); the prompt goes in
  as token ids, after ``<|endoftext|>`` as in training;
- a swap builds a second vLLM engine for the new checkpoint and sends new completions to
  it; the old one is shut down once its last completion ends. Both hold their weights and
  cache on the GPU meanwhile, so each engine takes ``gpu_memory_utilization`` (default
  0.4) of the GPU's memory;
- ``max_queue`` bounds the completions in flight (vLLM's own scheduler decides how many
  run at once).

This machine (CPU only, CI) cannot run vLLM; the module imports it only when used.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

from psyche.serve.engine import (
    Failed,
    Finished,
    NoModel,
    QueueFull,
    Sampling,
    ServedModel,
    Started,
    Text,
    Ticket,
    check_fits,
    recorded,
)

log = logging.getLogger("psyche.serve")


def vllm_available() -> bool:
    """Whether vLLM can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """:class:`~psyche.serve.engine.InferenceEngine` on vLLM (module docstring)."""

    def __init__(self, *, max_queue: int = 256, gpu_memory_utilization: float = 0.4):
        if not vllm_available():
            raise RuntimeError("vLLM is not installed: pip install 'psyche[vllm]' (on a machine with CUDA GPUs)")
        self.max_queue = max_queue
        self.gpu_memory_utilization = gpu_memory_utilization
        self._served: ServedModel | None = None
        self._in_flight: dict[int, int] = {}  # id(served) -> completions running on it
        self._retired: dict[int, ServedModel] = {}  # swapped out, shut down when idle
        self._tasks: set[asyncio.Task] = set()
        self.completions = 0

    @property
    def served(self) -> ServedModel | None:
        return self._served

    def load(self, path: Path, *, name: str | None = None, step: int | None = None, run_id: str | None = None,
             source: str | None = None) -> ServedModel:
        """A vLLM engine over the folder ``path`` (its weights are on the GPU when this returns)."""
        from transformers import AutoConfig, AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        path = Path(path)
        recorded_name, recorded_step = recorded(path)
        args = AsyncEngineArgs(model=str(path), tokenizer=str(path), gpu_memory_utilization=self.gpu_memory_utilization)
        engine = AsyncLLMEngine.from_engine_args(args)
        return ServedModel(model=engine, tokenizer=AutoTokenizer.from_pretrained(str(path)),
                           config=AutoConfig.from_pretrained(str(path)), name=name or recorded_name or path.name,
                           step=step if step is not None else recorded_step, run_id=run_id,
                           checkpoint=source or str(path))

    def swap(self, served: ServedModel) -> None:
        old, self._served = self._served, served
        if old is not None:
            self._retired[id(old)] = old
            self._shutdown_if_idle(old)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for served in [*self._retired.values(), *([self._served] if self._served else [])]:
            _shutdown(served)
        self._retired.clear()

    def stats(self) -> dict[str, int]:
        return {"completions": self.completions, "in_flight": sum(self._in_flight.values())}

    def submit(self, prompt: str, sampling: Sampling, *, ids: list[int] | None = None) -> Ticket:
        served = self._served
        if served is None:
            raise NoModel("no checkpoint is loaded yet")
        ids = ids if ids is not None else served.encode(prompt)
        check_fits(served, len(ids), sampling.max_tokens)
        if sum(self._in_flight.values()) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} completions are already running; retry shortly")
        ticket = Ticket(asyncio.get_running_loop(), prompt, sampling, ids=ids, encoded_by=served)
        self._in_flight[id(served)] = self._in_flight.get(id(served), 0) + 1
        self.completions += 1
        task = asyncio.create_task(self._complete(served, ids, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ticket

    async def _complete(self, served: ServedModel, ids: list[int], ticket: Ticket) -> None:
        from vllm import SamplingParams

        s = ticket.sampling
        params = SamplingParams(n=1, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                stop=list(s.stop) or None, seed=s.seed, logit_bias=dict(s.logit_bias) or None,
                                stop_token_ids=[served.eot_id] if served.eot_id is not None else None)
        request_id = uuid.uuid4().hex
        sent = ""
        ticket.emit(Started(served, len(ids)))
        try:
            if s.max_tokens == 0:
                ticket.emit(Finished("length", 0))
                return
            async for out in served.model.generate({"prompt_token_ids": ids}, params, request_id):
                if ticket.cancelled:
                    await served.model.abort(request_id)
                    return
                choice = out.outputs[0]
                # vLLM's text is the whole completion so far: send what is new.
                if len(choice.text) > len(sent):
                    ticket.emit(Text(choice.text[len(sent):]))
                    sent = choice.text
                if out.finished:
                    reason = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
                    ticket.emit(Finished(reason, len(choice.token_ids)))
                    return
            ticket.emit(Failed("vLLM ended the completion without finishing it"))
        except asyncio.CancelledError:
            await asyncio.shield(served.model.abort(request_id))
            raise
        except Exception as exc:  # vLLM's errors fail this completion, never the server
            log.exception("a vLLM completion failed")
            ticket.emit(Failed(f"the model failed: {type(exc).__name__}: {exc}"))
        finally:
            self._in_flight[id(served)] -= 1
            self._shutdown_if_idle(served)

    def _shutdown_if_idle(self, served: ServedModel) -> None:
        if id(served) in self._retired and not self._in_flight.get(id(served)):
            del self._retired[id(served)]
            self._in_flight.pop(id(served), None)
            _shutdown(served)
            log.info("released the vLLM engine of step %s", served.step)


def _shutdown(served: ServedModel) -> None:
    engine: Any = served.model
    shutdown = getattr(engine, "shutdown", None)  # vLLM's v1 engine; older ones free on collection
    if callable(shutdown):
        shutdown()
