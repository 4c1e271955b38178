"""Requests to psyche serve, fuzzed: whatever bytes or JSON arrive, reading them either gives a
typed request or an OpenAI-shaped 400 naming what is wrong, never another exception."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from psyche.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request

KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
        "seed", "stream", "stream_options", "logit_bias", "logprobs", "echo", "user", "tools", "role", "content",
        "presence_penalty", "response_format", "suffix", "best_of", "type", "text", "include_usage"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=6)),
    max_leaves=20)
bodies = st.one_of(
    st.binary(max_size=200),
    values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=8).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=400, deadline=None)
@given(body=bodies, kind=st.sampled_from([CompletionRequest, ChatRequest]))
def test_any_body_reads_as_a_request_or_a_400_naming_the_problem(body, kind):
    try:
        req = parse_request(kind, body)
    except APIError as exc:
        assert exc.status == 400 and exc.message
        assert set(exc.body()["error"]) == {"message", "type", "param", "code"}
        return
    assert isinstance(req, kind)
    assert 1 <= req.n <= 8 and 0 <= req.temperature <= 2 and 0 < req.top_p <= 1
    assert len(req.stops()) <= 4


def test_the_usual_requests_read():
    c = parse_request(CompletionRequest, b'{"model": "m", "prompt": ["a", "b"], "stop": "x", "logit_bias": {"5": -100}}')
    assert c.prompts() == ["a", "b"] and c.stops() == ["x"] and c.biases(10) == ((5, -100.0),)
    chat = parse_request(ChatRequest, json.dumps({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 5, "max_tokens": 9}).encode())
    assert [m.text() for m in chat.messages] == ["be brief", "hi there"] and chat.wanted_tokens() == 5
