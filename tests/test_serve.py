"""``psyche serve`` as its users meet it: a real server process, spoken to with the official
``openai`` Python client (and raw HTTP where the client would hide what is sent).

Chat and text completions, streamed and not, agree with ``model.generate``; 8 concurrent
streams all complete, in shared batches; every bad request gets OpenAI's error shape with
its status and names the parameter; a full queue answers 429; and a checkpoint written
into a watched folder during a stream leaves that stream on its model, while the next
request reports the new step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from psyche.config import ModelConfig
from psyche.data.tokenize import EOT, train_bpe
from psyche.generate import Generator
from psyche.train import build_model, compute_gradients, save_checkpoint
from tests.netutil import Serve

openai = pytest.importorskip("openai", reason="the openai client is in the [test] extra: run `make install`")

pytestmark = pytest.mark.e2e

TEXT = ["the cat sat on the mat and looked at the dog", "a dog ran in the park with a red ball"] * 30
CONTEXT = 2048
EOT_ID = 0  # train_bpe puts <|endoftext|> first
NO_END = {str(EOT_ID): -100}  # a completion that runs to max_tokens


def trained_checkpoint(out: Path, *, step: int, seed: int, steps: int = 15) -> Path:
    """A tiny LLaMA that has seen TEXT a little (it writes words, not bytes), saved as a run's
    checkpointer saves one: weights, tokenizer and ``step`` in its state."""
    tok = train_bpe(TEXT, vocab_size=290)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_path = out.parent / "tokenizer.json"
    tok.save(str(tok_path))
    assert tok.token_to_id(EOT) == EOT_ID
    cfg = ModelConfig(vocab_size=290, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, seq_len=CONTEXT)
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed)
    ids = [i for t in TEXT for i in tok.encode(t).ids + [EOT_ID]]
    batch = torch.tensor([ids[k : k + 33] for k in range(0, 32 * 16, 32)])  # (16, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        compute_gradients(model, batch, micro_batch_size=16, grad_clip=1.0)
        opt.step()
    return save_checkpoint(model, out, tokenizer_path=tok_path, extra={"step": step, "config": {"name": "tiny"}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("serve") / "checkpoint", step=7, seed=1)


@pytest.fixture(scope="module")
def serve(checkpoint, tmp_path_factory):
    s = Serve("--checkpoint", str(checkpoint), log=tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield s
    s.stop()
    assert s.proc.returncode in (0, -15), s.log.read_text()
    assert "Traceback" not in s.log.read_text()  # nothing a test sent crashed a request


def test_models_and_text_completions(serve, checkpoint):
    models = serve.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].psyche == {"step": 7, "run_id": None, "checkpoint": str(checkpoint), "context": CONTEXT}

    r = serve.client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0)
    reference = "".join(Generator.from_checkpoint(checkpoint).stream("the cat", max_new_tokens=20, temperature=0))
    assert r.choices[0].text == reference  # greedy, as model.generate does it
    assert r.system_fingerprint == "psyche-step-7" and r.model == "tiny"
    assert r.usage.prompt_tokens == 3  # <|endoftext|> the cat
    assert 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # Seeded sampling repeats; another seed differs; n choices and several prompts are indexed.
    a, b, c = (serve.client.completions.create(model="tiny", prompt="a dog", max_tokens=30, temperature=1.2, seed=s,
                                               logit_bias=NO_END).choices[0].text for s in (5, 5, 6))
    assert a == b != c
    many = serve.client.completions.create(model="tiny", prompt=["the cat", "a dog"], n=2, max_tokens=5, seed=1, echo=True)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert [ch.text.split(" ")[:2] for ch in many.choices[::2]] == [["the", "cat"], ["a", "dog"]]

    # A stop sequence ends the text before it, and is not part of it.
    stopped = serve.client.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0, stop=["mat"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == reference.split("mat")[0]


def test_text_stream_matches_the_whole_answer(serve):
    whole = serve.client.completions.create(model="tiny", prompt="a dog ran", max_tokens=40, temperature=0, logit_bias=NO_END)
    chunks = list(serve.client.completions.create(model="tiny", prompt="a dog ran", max_tokens=40, temperature=0,
                                                  logit_bias=NO_END, stream=True))
    assert len(chunks) > 5  # text arrives while the model writes it
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert {c.system_fingerprint for c in chunks} == {"psyche-step-7"}

    # On the wire: server-sent events ending with [DONE].
    with httpx.stream("POST", serve.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_streamed_and_not(serve):
    messages = [{"role": "system", "content": "You finish sentences."}, {"role": "user", "content": "the cat"}]
    whole = serve.client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0,
                                                 stop=[], logit_bias=NO_END)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 25
    # The documented default template: "System: ...\n\nUser: ...\n\nAssistant:" after <|endoftext|>.
    prompt = "System: You finish sentences.\n\nUser: the cat\n\nAssistant:"
    assert whole.usage.prompt_tokens == 1 + len(serve_tokenizer(serve).encode(prompt).ids)

    chunks = list(serve.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=25, temperature=0, stop=[], logit_bias=NO_END, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25
    assert chunks[-2].choices[0].finish_reason == "length"

    # Without a stop of its own, a chat reply ends at the template's end of turn (a blank line).
    default = serve.client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=1.0, seed=3)
    assert "\n\n" not in default.choices[0].message.content


def serve_tokenizer(serve):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(serve.client.models.list().data[0].psyche["checkpoint"]) / "tokenizer.json"))


def test_eight_concurrent_streams_complete_in_shared_batches(serve):
    before = serve.health()

    async def all_streams() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> tuple[str, str]:
            stream = await client.completions.create(model="tiny", prompt="the cat", max_tokens=60, seed=i, stream=True,
                                                     logit_bias=NO_END)
            text, reason = "", ""
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    results = asyncio.run(all_streams())
    assert [reason for _, reason in results] == ["length"] * 8
    assert len({text for text, _ in results}) > 1  # each its own seed
    after = serve.health()
    completions = after["batched_completions"] - before["batched_completions"]
    batches = after["batches"] - before["batches"]
    assert completions == 8 and batches < 8, (batches, completions)  # decoded together, not one by one


@pytest.mark.parametrize("request_, error, param", [
    (dict(model="gpt-4", prompt="x"), "NotFoundError", "model"),
    (dict(prompt="xq " * CONTEXT, max_tokens=10), "BadRequestError", "prompt"),
    (dict(prompt="x", max_tokens=CONTEXT), "BadRequestError", "prompt"),
    (dict(prompt="x", temperature=3), "BadRequestError", "temperature"),
    (dict(prompt="x", top_p=0), "BadRequestError", "top_p"),
    (dict(prompt="x", n=99), "BadRequestError", "n"),
    (dict(prompt="x", max_tokens=-1), "BadRequestError", "max_tokens"),
    (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "BadRequestError", "stop"),
    (dict(prompt="x", logprobs=2), "BadRequestError", "logprobs"),
    (dict(prompt="x", presence_penalty=1.0), "BadRequestError", "presence_penalty"),
    (dict(prompt="x", logit_bias={"99999": 1}), "BadRequestError", "logit_bias"),
    (dict(prompt="x", logit_bias={"5": 500}), "BadRequestError", "logit_bias"),
    (dict(prompt="x", extra_body={"frobnicate": True}), "BadRequestError", "frobnicate"),
    (dict(prompt=[]), "BadRequestError", "prompt"),
])
def test_bad_completion_requests_get_openai_errors(serve, request_, error, param):
    with pytest.raises(openai.APIStatusError) as info:
        serve.client.completions.create(**{"model": "tiny", **request_})
    assert type(info.value).__name__ == error
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param and body["message"]


@pytest.mark.parametrize("request_, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": "f"}}]),
     "tools"),
    (dict(messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}), "response_format"),
])
def test_bad_chat_requests_get_openai_errors(serve, request_, param):
    with pytest.raises(openai.BadRequestError) as info:
        serve.client.chat.completions.create(model="tiny", **request_)
    assert info.value.body["param"] == param


def test_malformed_bodies_are_refused_and_the_server_goes_on(serve):
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b'{"max_tokens": 3}', 400),
                         (b"\xff\xfe", 400), (b'{"prompt": "x"}' + b" " * (2 << 20), 413)]:
        r = httpx.post(serve.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:20], r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    assert httpx.post(serve.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    # A browser page elsewhere (the dashboard's Try it box) may call it.
    pre = httpx.options(serve.url + "/v1/completions", headers={
        "Origin": "http://dashboard.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://dashboard.example")


def test_a_full_queue_answers_429_and_a_swap_spares_the_stream_in_flight(checkpoint, tmp_path):
    """One batch of one at a time and a queue of 2: a burst overflows it. Then a checkpoint
    written into the watched folder while a long stream runs: the stream ends whole on step
    7, and the next request is answered by step 8."""
    folder = trained_checkpoint(tmp_path / "watched" / "checkpoint", step=7, seed=1)
    s = Serve("--checkpoint", str(folder), "--watch", "--poll", "0.1", "--max-batch", "1", "--max-queue", "2",
              log=tmp_path / "serve.log")
    try:
        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                rs = await asyncio.gather(*(http.post("/v1/completions", json={
                    "prompt": "the cat", "max_tokens": 300, "logit_bias": NO_END}) for _ in range(12)))
            for r in rs:
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            return [r.status_code for r in rs]

        statuses = asyncio.run(burst())
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses

        # A long stream (about 2 s on one core); the new checkpoint lands once it has begun.
        stream = s.client.completions.create(model="tiny", prompt="the cat", max_tokens=1800, temperature=0, stream=True,
                                             logit_bias=NO_END)
        chunks = [next(stream)]
        swapped_while_streaming: list[bool] = []

        def write_and_watch() -> None:
            trained_checkpoint(folder, step=8, seed=2, steps=5)
            deadline = time.time() + 60
            while time.time() < deadline:
                if s.models()[0]["psyche"]["step"] == 8:
                    swapped_while_streaming.append(not done.is_set())
                    return
                time.sleep(0.05)

        done = threading.Event()
        writer = threading.Thread(target=write_and_watch)
        writer.start()
        chunks.extend(stream)
        done.set()
        writer.join()
        assert swapped_while_streaming == [True], "the swap should land while the stream runs"
        assert {c.system_fingerprint for c in chunks} == {"psyche-step-7"}
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in chunks)) > 1000  # the whole stream, not cut short

        # A client that goes away mid-stream frees its row: the batch drops it unfinished.
        with httpx.stream("POST", s.url + "/v1/completions", json={
                "prompt": "the cat", "max_tokens": 1800, "stream": True, "logit_bias": NO_END}) as gone:
            next(gone.iter_lines())
        deadline = time.time() + 30
        while s.health()["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert s.health()["cancelled"] == 1

        after = s.client.completions.create(model="tiny", prompt="the cat", max_tokens=5)
        assert after.system_fingerprint == "psyche-step-8" and after.psyche["step"] == 8
        assert "serving tiny at step 8" in s.log.read_text()
    finally:
        s.stop()
