"""The model behind ``psyche serve``: dynamic batching of completions on a Transformers model.

Requests that arrive together are decoded together. One worker thread takes whatever is
waiting in a bounded queue (up to ``max_batch`` completions, gathering for at most
``gather_s`` after the first), left-pads their prompts into one batch and decodes it token
by token with the model's key/value cache. Each row samples with its own temperature,
top-p and seeded generator, and leaves the batch (its cache rows dropped) at its own end:
end of text, a stop sequence, ``max_tokens`` or the context's end. Completions that
arrive meanwhile wait for the next batch. A full queue refuses at once (:class:`QueueFull`,
HTTP 429), so a burst never grows memory or latency without bound.

The served model can be replaced at any time (:meth:`Engine.swap`): a batch in flight
finishes on the model it started with, and the next batch starts on the new one. Every
completion says which model and step answered it (:class:`Started`).

Events reach the asyncio side through :class:`Ticket`, whose queue the worker feeds with
``call_soon_threadsafe``: the event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from psyche.serve.textstream import REPLACEMENT, TextStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("psyche.serve")

EOT = "<|endoftext|>"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The chat template for a tokenizer that has none (every checkpoint a run writes): each
message as ``Role: content`` followed by a blank line, then ``Assistant:`` for the reply. A
blank line ends a reply (a default stop sequence of chat completions with this template)."""

DEFAULT_CHAT_STOP = ("\n\n",)
"""Stop sequences chat completions get under :data:`DEFAULT_CHAT_TEMPLATE` unless the
request gives its own: the template's end of a turn."""


class EngineError(Exception):
    """Base of what :meth:`Engine.submit` refuses. Grouped by what the caller can do::

        EngineError
        ├── NoModel         nothing is loaded yet (a followed run has no checkpoint); retry later
        ├── QueueFull       too many completions waiting; retry later (429)
        └── PromptTooLong   the prompt and max_tokens do not fit the context; shorten them (400)
    """


class NoModel(EngineError):
    """No model is loaded yet."""


class QueueFull(EngineError):
    """The queue of waiting completions is full."""


class PromptTooLong(EngineError):
    """The prompt plus ``max_tokens`` exceeds the model's context; the message gives the counts."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ServedModel:
    """A loaded checkpoint and what is said about it: ``name`` (the model id clients ask
    for), ``step`` (the optimizer steps it holds, if known), ``run_id`` (when following a run)
    and ``checkpoint`` (where it was loaded from)."""

    model: Any  # transformers.PreTrainedModel in eval mode, or the vLLM engine holding it
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    config: Any  # transformers.PretrainedConfig
    name: str
    step: int | None
    run_id: str | None
    checkpoint: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def context(self) -> int:
        """The most tokens (prompt and completion together) the model attends over."""
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores (its logits' width)."""
        return int(self.config.vocab_size)

    @property
    def eot_id(self) -> int | None:
        """The ``<|endoftext|>`` token: documents start after it and completions end at it."""
        eot = self.tokenizer.convert_tokens_to_ids(EOT)
        return eot if isinstance(eot, int) and eot >= 0 and eot != self.tokenizer.unk_token_id else None

    @property
    def has_own_chat_template(self) -> bool:
        """Whether the tokenizer brings its own chat template (else :data:`DEFAULT_CHAT_TEMPLATE`)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """The prompt's tokens, after an ``<|endoftext|>`` as every training document is."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ([self.eot_id] if self.eot_id is not None else []) + ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat as prompt text, with the tokenizer's template or the default one."""
        template = None if self.has_own_chat_template else DEFAULT_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        return str(text)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in a completion (no leading ``<|endoftext|>``)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def recorded(path: Path) -> tuple[str | None, int | None]:
    """The run name and step a psyche checkpoint folder records (None where it records none)."""
    import json

    from psyche.train.checkpoint import STATE_JSON

    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(state, dict):
        return None, None
    config = state.get("config")
    name = config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else None
    step = state.get("step") if isinstance(state.get("step"), int) else None
    return name, step


def load_served(path: str | Path, *, device: str = "cpu", name: str | None = None, step: int | None = None,
                run_id: str | None = None, source: str | None = None) -> ServedModel:
    """Load the checkpoint folder ``path`` with Transformers to serve. ``name`` defaults to
    the run's name recorded in the checkpoint (else the folder's name), ``step`` to the step
    it records; ``source`` is what ``/v1/models`` says it came from (default: ``path``)."""
    from transformers import AutoTokenizer

    from psyche.train.model import load_pretrained

    path = Path(path)
    recorded_name, recorded_step = recorded(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = load_pretrained(path, device=device).eval()
    return ServedModel(model=model, tokenizer=tokenizer, config=model.config, name=name or recorded_name or path.name,
                       step=step if step is not None else recorded_step, run_id=run_id, checkpoint=source or str(path))


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How one completion is sampled."""

    max_tokens: int
    """The most tokens to generate."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Sample among the likeliest tokens whose probabilities add up to ``top_p``."""
    stop: tuple[str, ...] = ()
    """Sequences that end the completion (not included in it)."""
    seed: int | None = None
    """The same seed, prompt and settings give the same text (on the same model and hardware)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` pairs added to the logits before sampling (-100 bans a token, 100 forces it)."""


# --- events a completion produces, in order: Started, Text*, then Finished or Failed.

@dataclass(frozen=True)
class Started:
    """The completion entered a batch on ``model`` with ``prompt_tokens`` prompt tokens."""

    model: ServedModel
    prompt_tokens: int


@dataclass(frozen=True)
class Text:
    """The next piece of the completion's text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The completion ended: ``reason`` is ``"stop"`` (end of text or a stop sequence) or
    ``"length"`` (``max_tokens`` or the context's end)."""

    reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The completion could not be finished; ``message`` says why."""

    message: str


Event = Started | Text | Finished | Failed


class Ticket:
    """One submitted completion, as seen from the event loop: iterate :meth:`events`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: str, sampling: Sampling, *,
                 ids: list[int], encoded_by: ServedModel):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.prompt = prompt
        self.sampling = sampling
        self.ids = ids
        """The prompt's tokens, as ``encoded_by`` reads it (a batch on another model encodes it again)."""
        self.encoded_by = encoded_by
        self.cancelled = False
        """Set when nobody waits for the rest (a client went away): its row leaves the batch."""

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the event loop (called from the engine's thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop closed (the server is stopping): nobody is listening
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating for this completion."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """The completion's events until it finishes or fails."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class InferenceEngine(Protocol):
    """What the server needs of an engine: :class:`Engine` (Transformers, any device) and
    :class:`~psyche.serve.vllm_engine.VLLMEngine` (vLLM, on GPUs) both are one."""

    @property
    def served(self) -> ServedModel | None:
        """The model new completions start on (None before one is loaded)."""
        ...

    def load(self, path: Path, *, name: str | None = None, step: int | None = None, run_id: str | None = None,
             source: str | None = None) -> ServedModel:
        """Load the checkpoint folder ``path`` the way this engine serves it (arguments as
        :func:`load_served`); the folder may be deleted once this returns. Blocking."""
        ...

    def swap(self, served: ServedModel) -> None:
        """Serve ``served`` from now on; completions in flight finish on their model."""
        ...

    def start(self) -> None:
        """Get ready to take completions (called once the event loop runs)."""
        ...

    def stop(self) -> None:
        """Finish or drop what is in flight and release the model. Blocking."""
        ...

    def submit(self, prompt: str, sampling: Sampling, *, ids: list[int] | None = None) -> "Ticket":
        """Queue a completion (from the event loop; ``ids``: the prompt's tokens on the served
        model, if known); raises :class:`EngineError`."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for ``/healthz``."""
        ...


class Engine:
    """Serves completions from one model at a time in dynamic batches (module docstring).

    ``device``: where :meth:`load` puts models. ``max_batch``: completions decoded together.
    ``max_queue``: completions that may wait for a batch before :meth:`submit` refuses more.
    ``gather_s``: how long the worker waits after the first waiting completion for others
    to join its batch.
    """

    def __init__(self, served: ServedModel | None = None, *, device: str = "cpu", max_batch: int = 8,
                 max_queue: int = 64, gather_s: float = 0.005):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.device = device
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._served = served
        self._queue: queue.Queue[Ticket | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches = 0
        """Batches decoded so far."""
        self.batched_completions = 0
        """Completions those batches held, together."""
        self.cancelled = 0
        """Completions dropped because nobody waited for them any more (a client went away)."""

    @property
    def served(self) -> ServedModel | None:
        """The model the next batch starts on (None before one is loaded)."""
        return self._served

    def load(self, path: Path, *, name: str | None = None, step: int | None = None, run_id: str | None = None,
             source: str | None = None) -> ServedModel:
        """:func:`load_served` onto this engine's device."""
        return load_served(path, device=self.device, name=name, step=step, run_id=run_id, source=source)

    def swap(self, served: ServedModel) -> None:
        """Serve ``served`` from the next batch on; a batch in flight finishes on its model."""
        self._served = served

    def stats(self) -> dict[str, int]:
        """Batches decoded, the completions they held, and those dropped unfinished, so far."""
        return {"batches": self.batches, "batched_completions": self.batched_completions, "cancelled": self.cancelled}

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="psyche-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the batch in flight (completions still waiting are dropped)."""
        if self._thread is not None:
            self._stopping = True
            try:
                self._queue.put_nowait(None)  # wakes a worker waiting for work
            except queue.Full:
                pass  # a worker with a full queue is busy: it sees _stopping after its batch
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt: str, sampling: Sampling, *, ids: list[int] | None = None) -> Ticket:
        """Queue a completion of ``prompt`` (``ids``: its tokens on the served model, if the
        caller has them); its events come through the returned ticket.

        Raises :class:`NoModel`, :class:`PromptTooLong` or :class:`QueueFull` (the
        completion was not queued). Call from the event loop.
        """
        served = self._served
        if served is None:
            raise NoModel("no checkpoint is loaded yet")
        ids = ids if ids is not None else served.encode(prompt)
        check_fits(served, len(ids), sampling.max_tokens)
        ticket = Ticket(asyncio.get_running_loop(), prompt, sampling, ids=ids, encoded_by=served)
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} completions are already waiting; retry shortly") from None
        self.start()
        return ticket

    # --- the worker thread

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            tickets = [first]
            stopping = False
            deadline = time.monotonic() + self.gather_s
            while len(tickets) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                tickets.append(nxt)
            waiting = len(tickets)
            tickets = [t for t in tickets if not t.cancelled]
            self.cancelled += waiting - len(tickets)
            served = self._served
            if tickets and served is not None:
                self.batches += 1
                self.batched_completions += len(tickets)
                try:
                    self.cancelled += decode_batch(served, tickets)
                except Exception as exc:  # a model error fails this batch, never the server
                    log.exception("a batch of %d completions failed", len(tickets))
                    for t in tickets:
                        t.emit(Failed(f"the model failed: {type(exc).__name__}: {exc}"))
            if stopping or self._stopping:
                return


def check_fits(served: ServedModel, prompt_tokens: int, max_tokens: int) -> None:
    """Raise :class:`PromptTooLong` unless ``prompt_tokens + max_tokens`` fit ``served``'s context."""
    if prompt_tokens + max_tokens > served.context:
        raise PromptTooLong(
            f"this model's context is {served.context} tokens, but {prompt_tokens + max_tokens} were asked for "
            f"({prompt_tokens} in the prompt and {max_tokens} to complete); shorten the prompt or lower max_tokens")


def sample_next(logits: "torch.Tensor", sampling: list[Sampling], generators: list["torch.Generator"]) -> list[int]:
    """One token per row of ``logits`` (b, V), after the row's logit bias: greedy at
    temperature 0, else drawn with the row's own generator from its temperature-scaled,
    top-p-truncated distribution."""
    import torch

    out: list[int] = []
    for row, s, gen in zip(logits, sampling, generators):
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias)
            row = row.clone()
            row[list(ids)] += torch.tensor(bias, dtype=row.dtype)
        if s.temperature == 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row.float() / s.temperature, dim=-1)  # (V,)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the likeliest tokens until their mass reaches top_p (always the first).
            drop = (sorted_p.cumsum(0) - sorted_p) >= s.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


class Detokenizer:
    """One completion's text, decoded as its tokens come, in time independent of its length.

    Decoding every token alone garbles characters split across tokens, and decoding all of
    them after each new one costs time growing with the completion. So each step decodes
    only a window: the tokens since the last whole piece of text, with a few before them for
    context (how Hugging Face's text-generation-inference streams), and adds what the newest
    tokens changed. A piece still ending in U+FFFD (a character missing bytes) waits.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # window start: tokens before it are in self.text for good
        self._read = 0  # tokens up to here are in self.text

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def step(self, ids: list[int]) -> str:
        """The text of ``ids`` (all the completion's tokens so far; one more than last time)."""
        before = self._decode(ids[self._prefix:self._read])
        now = self._decode(ids[self._prefix:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(ids)
        return self.text

    def flush(self, ids: list[int]) -> str:
        """The whole text of ``ids`` at the end: what still waits is added as it decodes."""
        before = self._decode(ids[self._prefix:self._read])
        now = self._decode(ids[self._prefix:])
        if len(now) > len(before):
            self.text += now[len(before):]
        self._prefix = self._read = len(ids)
        return self.text


def decode_batch(served: ServedModel, tickets: list[Ticket]) -> int:
    """Complete every ticket's prompt on ``served`` together (module docstring), emitting
    each ticket's events; returns how many were cancelled on the way."""
    import torch

    model = served.model
    device = next(model.parameters()).device
    rows: list[tuple[Ticket, list[int]]] = []
    for t in tickets:
        ids = t.ids if t.encoded_by is served else served.encode(t.prompt)
        try:
            check_fits(served, len(ids), t.sampling.max_tokens)
        except PromptTooLong as exc:  # the model was swapped for one with a shorter context
            t.emit(Failed(str(exc)))
            continue
        if t.sampling.max_tokens == 0:
            t.emit(Started(served, len(ids)))
            t.emit(Finished("length", 0))
            continue
        rows.append((t, ids))
    if not rows:
        return 0
    pad = served.eot_id if served.eot_id is not None else 0
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, (_, ids) in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    # Left padding: each row's positions count from its own first real token.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    generators = []
    for t, _ in rows:
        seed = t.sampling.seed if t.sampling.seed is not None else random.getrandbits(63)
        generators.append(torch.Generator().manual_seed(seed))
    for t, ids in rows:
        t.emit(Started(served, len(ids)))
    generated: list[list[int]] = [[] for _ in rows]
    streams = [TextStream(t.sampling.stop) for t, _ in rows]
    texts = [Detokenizer(served.tokenizer) for _ in rows]
    active = list(range(len(rows)))  # batch position -> row
    cancelled = 0

    def finish(r: int, reason: str) -> None:
        t = rows[r][0]
        if piece := streams[r].finish(texts[r].flush(generated[r])):
            t.emit(Text(piece))
        t.emit(Finished(reason, len(generated[r])))

    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), use_cache=True)
        cache = out.past_key_values
        # Transformers 5 names the cache argument `cache`; older releases `past_key_values`.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        next_pos = positions[:, -1] + 1  # (B,)
        logits = out.logits[:, -1, :].float().cpu()  # (B, V)
        while True:
            tokens = sample_next(logits, [rows[r][0].sampling for r in active], [generators[r] for r in active])
            keep: list[int] = []
            for k, r in enumerate(active):
                t, ids = rows[r]
                if t.cancelled:
                    cancelled += 1
                    continue
                if tokens[k] == served.eot_id:
                    generated[r].append(tokens[k])
                    finish(r, "stop")
                    continue
                generated[r].append(tokens[k])
                piece = streams[r].feed(texts[r].step(generated[r]))
                if piece:
                    t.emit(Text(piece))
                if streams[r].stopped:
                    t.emit(Finished("stop", len(generated[r])))
                elif len(generated[r]) >= t.sampling.max_tokens or len(ids) + len(generated[r]) >= served.context:
                    finish(r, "length")
                else:
                    keep.append(k)
            if not keep:
                return cancelled
            step_tokens = torch.tensor([tokens[k] for k in keep], dtype=torch.long)  # (b,)
            if len(keep) < len(active):
                # Rows that ended leave the batch: their cache rows go with them.
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index.to(device))
                mask, next_pos = mask[index], next_pos[index]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)  # (b, T+n)
            out = model(input_ids=step_tokens[:, None].to(device), attention_mask=mask.to(device),
                        position_ids=next_pos[:, None].to(device), use_cache=True, **{cache_arg: cache})
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :].float().cpu()
