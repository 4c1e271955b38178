"""The OpenAI API's shapes, as far as ``psyche serve`` speaks it: requests, responses, errors.

Requests are validated here, once, into typed models; every rule a request can break
becomes an :class:`APIError` in OpenAI's error shape (``{"error": {"message", "type",
"param", "code"}}``) with the status OpenAI gives it, so the official clients raise their
usual exceptions (``BadRequestError``, ``NotFoundError``, ``RateLimitError``...).

Supported: ``model``, ``prompt`` (a string or a list of strings), ``messages`` (text
content, as a string or a list of text parts), ``max_tokens`` (and chat's
``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``logit_bias``, ``stream`` with ``stream_options.include_usage``, ``echo`` (completions)
and ``user`` (ignored). Options this server cannot honour (log probabilities, penalties,
tools, structured output) are refused by name rather than silently ignored; their
"off" values are accepted, since clients send them by default.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8
"""The most choices one request may ask for (each is one row of a batch)."""
MAX_STOP = 4
"""The most stop sequences, as OpenAI allows."""
MAX_PROMPTS = 16
"""The most prompts in one completions request."""


class APIError(Exception):
    """A request refused, in OpenAI's error shape: ``status``, ``message``, ``type``,
    ``param`` (the offending field, if one) and ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients expect."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    """Send a last chunk with the token usage (and no choices) before ``[DONE]``."""


class _Sampled(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """The served model's id (``GET /v1/models``); may be left out."""
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their "off" values only (clients send the defaults); see _refuse_unsupported.
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI's JSON has it) -> a bias from -100 to 100 added to its logit."""

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are from -100 to 100 (got {bias} for token {key})")
        if v is not None and len(v) > 300:
            raise ValueError(f"at most 300 tokens (got {len(v)})")
        return v

    def biases(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """The logit bias as ``(token id, bias)`` pairs; :class:`APIError` for an id past the vocabulary."""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if int(key) >= vocab_size:
                raise APIError(400, f"logit_bias: token {key} is not in the vocabulary ({vocab_size} tokens)",
                               param="logit_bias", code="invalid_value")
            out.append((int(key), float(bias)))
        return tuple(out)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stops)})")
        return [s for s in stops if s]

    def stops(self) -> list[str]:
        """The stop sequences (validated into a list)."""
        return list(self.stop or [])


class CompletionRequest(_Sampled):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"a list of 1 to {MAX_PROMPTS} prompts (got {len(v)})")
        return v

    def prompts(self) -> list[str]:
        """The prompts, one or several."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: carried, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v):
            return v
        raise ValueError("content must be text: a string or a list of {\"type\": \"text\", \"text\": ...} "
                         "parts (images, audio and files are not supported)")

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampled):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None

    def wanted_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``, if either is given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


RequestT = TypeVar("RequestT", CompletionRequest, ChatRequest)


def _refuse_unsupported(req: _Sampled) -> None:
    def refuse(param: str) -> None:
        raise APIError(400, f"{param} is not supported by this server", param=param, code="unsupported_parameter")

    if req.logprobs not in (None, False, 0):
        refuse("logprobs")
    if req.presence_penalty:
        refuse("presence_penalty")
    if req.frequency_penalty:
        refuse("frequency_penalty")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            refuse("suffix")
        if req.best_of not in (None, 1):
            refuse("best_of")
    if isinstance(req, ChatRequest):
        if req.tools:
            refuse("tools")
        if req.tool_choice not in (None, "none"):
            refuse("tool_choice")
        if req.response_format and req.response_format.get("type") != "text":
            refuse("response_format")
        if req.top_logprobs:
            refuse("top_logprobs")


def parse_request(kind: type[RequestT], body: bytes) -> RequestT:
    """``body`` as a ``kind`` request; :class:`APIError` 400 naming the first broken field otherwise."""
    import json

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"{param} is required", param=param, code="missing_required_parameter") from None
        raise APIError(400, f"{param}: {err['msg']} (got {err.get('input')!r:.80})", param=param,
                       code="invalid_value") from None
    _refuse_unsupported(req)
    return req


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
