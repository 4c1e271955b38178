"""The model behind ``psyche serve``: dynamic batching of completions on a Transformers model.

Requests that arrive together are decoded together. One worker thread takes whatever is
waiting in a bounded queue (up to ``max_batch`` completions, gathering for at most
``gather_s`` after the first), left-pads their prompts into one :class:`Batch` and decodes
it token by token with the model's key/value cache. Each row samples with its own
temperature, top-p and seeded generator, and leaves the batch (its cache rows dropped) at
its own end: end of text, a stop sequence, ``max_tokens`` or the context's end.
Completions that arrive meanwhile join the running batch between two steps, while it has
fewer than ``max_batch`` rows (continuous batching), so a request never waits for a whole
batch to end. A full queue refuses at once (:class:`QueueFull`, HTTP 429), so a burst never
grows memory or latency without bound.

The served model can be replaced at any time (:meth:`Engine.swap`): a batch in flight
finishes on the model it started with (nothing joins it any more), and the next batch
starts on the new one. Every
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from psyche.data.tokenize import EOT
from psyche.serve.textstream import REPLACEMENT, TextStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("psyche.serve")


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

    @cached_property  # asked for every row at every decoding step
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
        """Batches decoded so far (a batch runs until its last row ends)."""
        self.batched_completions = 0
        """Completions those batches held, together (those that joined a running one too)."""
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
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                return
            served = self._served
            if served is None:  # (submit refuses before a model is loaded)
                continue
            batch = Batch(served, on_cancel=self._count_cancelled)
            self._join(batch, [first], gather=True)
            self.batches += 1
            try:
                while batch.step():
                    if self._stopping:
                        return
                    # Completions waiting join between two steps, while the model is the one
                    # served: after a swap they wait for the next batch, on the new model.
                    if self._served is served and batch.joinable and len(batch.rows) < self.max_batch:
                        self._join(batch, [])
            except Exception as exc:  # a model error fails this batch, never the server
                log.exception("a batch of %d completions failed", len(batch.rows))
                batch.fail(f"the model failed: {type(exc).__name__}: {exc}")

    def _count_cancelled(self) -> None:
        self.cancelled += 1

    def _join(self, batch: Batch, tickets: list[Ticket], *, gather: bool = False) -> None:
        """Admit ``tickets`` and those waiting into ``batch``, up to ``max_batch`` rows (with
        ``gather``, waiting up to ``gather_s`` for more to arrive)."""
        deadline = time.monotonic() + (self.gather_s if gather else 0.0)
        while len(batch.rows) + len(tickets) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if gather \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stopping = True
                break
            tickets.append(nxt)
        live = [t for t in tickets if not t.cancelled]
        self.cancelled += len(tickets) - len(live)
        if live:
            try:
                self.batched_completions += batch.admit(live)
            except Exception as exc:  # reading these prompts failed: they fail, the batch goes on
                log.exception("admitting %d completions failed", len(live))
                for t in live:
                    t.emit(Failed(f"the model failed: {type(exc).__name__}: {exc}"))


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


@dataclass
class _Row:
    """One completion in a batch."""

    ticket: Ticket
    prompt_tokens: int
    generator: "torch.Generator"
    text: "Detokenizer"
    stream: TextStream
    generated: list[int] = field(default_factory=list)


def _cache_layers(cache: Any) -> list[Any] | None:
    """The layers of a Transformers key/value cache whose ``keys``/``values`` tensors
    (B, H, T, D) can be joined along the batch; None for a cache of another kind."""
    layers = getattr(cache, "layers", None)
    if layers and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return list(layers)
    return None


def _left_pad(x: "torch.Tensor", width: int, dim: int) -> "torch.Tensor":
    """``x`` with zeros prepended along ``dim`` up to ``width``."""
    import torch

    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


class Batch:
    """Completions decoded together on one model, token by token with its key/value cache.

    Rows are left-padded to a common width: each row's attention mask hides its padding
    and its positions count from its own first token. Completions can join between two
    steps (:meth:`admit`): they are read in a pass of their own, and their cache is padded
    on the left to the batch's width and appended; rows leave at their own end, their
    cache rows dropped. Every row samples with its own settings and generator.
    """

    def __init__(self, served: ServedModel, *, on_cancel: Callable[[], None] = lambda: None):
        self.served = served
        self.on_cancel = on_cancel
        """Called for each row dropped because its ticket was cancelled."""
        self.device = next(served.model.parameters()).device
        self.cache_arg = _cache_argument(served.model)
        """The name the model's forward takes its key/value cache by (read once, not per step)."""
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: "torch.Tensor | None" = None  # (b, T)
        self.next_pos: "torch.Tensor | None" = None  # (b,)
        self.logits: "torch.Tensor | None" = None  # (b, V): the next token's, not yet sampled

    @property
    def joinable(self) -> bool:
        """Whether completions can join now (the cache is of a kind whose rows can be appended)."""
        return self.cache is None or _cache_layers(self.cache) is not None

    def admit(self, tickets: list[Ticket]) -> int:
        """Start ``tickets`` in this batch (reading their prompts); those that cannot start
        (too long for this model, nothing to generate) end at once. Returns how many joined."""
        import torch

        served = self.served
        rows: list[tuple[Ticket, list[int]]] = []
        for t in tickets:
            ids = t.ids if t.encoded_by is served else served.encode(t.prompt)
            try:
                check_fits(served, len(ids), t.sampling.max_tokens)
            except PromptTooLong as exc:  # the model was swapped for one with a shorter context
                t.emit(Failed(str(exc)))
                continue
            t.emit(Started(served, len(ids)))
            if t.sampling.max_tokens == 0:
                t.emit(Finished("length", 0))
                continue
            rows.append((t, ids))
        if not rows:
            return 0
        pad = served.eot_id if served.eot_id is not None else 0
        width = max(len(ids) for _, ids in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, T)
        for i, (_, ids) in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
        with torch.inference_mode():
            out = self.served.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=positions.to(self.device), use_cache=True)
        logits = out.logits[:, -1, :].float().cpu()  # (b, V)
        next_pos = positions[:, -1] + 1  # (b,)
        new = []
        for t, ids in rows:
            seed = t.sampling.seed if t.sampling.seed is not None else random.getrandbits(63)
            new.append(_Row(t, len(ids), torch.Generator().manual_seed(seed), Detokenizer(served.tokenizer),
                            TextStream(t.sampling.stop)))
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.logits, self.rows = out.past_key_values, mask, next_pos, logits, new
            return len(new)
        assert self.mask is not None and self.next_pos is not None and self.logits is not None
        # Join: both caches padded on the left to the wider one, then stacked along the batch.
        total = max(self.mask.shape[1], width)
        old_layers, new_layers = _cache_layers(self.cache), _cache_layers(out.past_key_values)
        assert old_layers is not None and new_layers is not None
        for old, add in zip(old_layers, new_layers):
            old.keys = torch.cat([_left_pad(old.keys, total, 2), _left_pad(add.keys, total, 2)], dim=0)
            old.values = torch.cat([_left_pad(old.values, total, 2), _left_pad(add.values, total, 2)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, total, 1), _left_pad(mask, total, 1)], dim=0)
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows.extend(new)
        return len(new)

    def step(self) -> bool:
        """Sample each row's next token, hand out what became final, drop the rows that
        ended, and run the model once on the new tokens. False once no row is left."""
        import torch

        if not self.rows:
            return False
        assert self.logits is not None and self.mask is not None and self.next_pos is not None
        served = self.served
        tokens = sample_next(self.logits, [r.ticket.sampling for r in self.rows], [r.generator for r in self.rows])
        keep: list[int] = []
        for k, row in enumerate(self.rows):
            t = row.ticket
            if t.cancelled:
                self.on_cancel()
                continue
            row.generated.append(tokens[k])
            if tokens[k] == served.eot_id:
                self._finish(row, "stop")
                continue
            if piece := row.stream.feed(row.text.step(row.generated)):
                t.emit(Text(piece))
            if row.stream.stopped:
                t.emit(Finished("stop", len(row.generated)))
            elif len(row.generated) >= t.sampling.max_tokens or row.prompt_tokens + len(row.generated) >= served.context:
                self._finish(row, "length")
            else:
                keep.append(k)
        if not keep:
            self.rows = []
            return False
        step_tokens = torch.tensor([tokens[k] for k in keep], dtype=torch.long)  # (b,)
        if len(keep) < len(self.rows):
            # Rows that ended leave the batch: their cache rows go with them.
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.device))
            self.mask, self.next_pos = self.mask[index], self.next_pos[index]
            self.rows = [self.rows[k] for k in keep]
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)  # (b, T+1)
        with torch.inference_mode():
            out = served.model(input_ids=step_tokens[:, None].to(self.device), attention_mask=self.mask.to(self.device),
                               position_ids=self.next_pos[:, None].to(self.device), use_cache=True,
                               **{self.cache_arg: self.cache})
        self.next_pos = self.next_pos + 1
        self.logits = out.logits[:, -1, :].float().cpu()
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        if piece := row.stream.finish(row.text.flush(row.generated)):
            row.ticket.emit(Text(piece))
        row.ticket.emit(Finished(reason, len(row.generated)))

    def fail(self, message: str) -> None:
        """End every row with ``message`` (the model failed)."""
        for row in self.rows:
            row.ticket.emit(Failed(message))
        self.rows = []


def _cache_argument(model: Any) -> str:
    # Transformers 5 names the cache argument `cache`; older releases `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
