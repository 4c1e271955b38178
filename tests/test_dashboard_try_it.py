"""The run page's "Try it" box in a real headless Chromium, against a real ``psyche serve``.

A coordinator server started with ``--inference-url`` (no clients: the box needs none) points
at ``psyche serve --checkpoint DIR`` over a tiny checkpoint of step 7. On the run's page the box
sends a prompt and shows the completion as it streams in (text growing chunk by chunk, the
button disabled meanwhile), the step and model that answered, and then, in the box and never
as a script error, the inference server's own refusal (OpenAI's error body) and an inference
server that is gone. The box fits a phone's width and follows dark mode; the page stays under
1 MB. A server without ``--inference-url`` says so in its status (null) and its page has no box.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.netutil import Network, Serve, small_config
from tests.test_dashboard_browser import open_page, poll, require_browser

pytestmark = pytest.mark.e2e

STEP = 7
"""The step the test checkpoint records: what the box must say answered."""
TEXT = ["the cat sat on the mat and looked at the dog", "a dog ran in the park with a red ball"] * 30
# Chromium's own line for a request that failed (not the page's): allowed only while the test
# makes the inference server refuse or vanish on purpose.
LOAD_FAILED = "Failed to load resource"

META = "document.querySelector('#try-meta').textContent"
BUSY = "document.querySelector('#try-go').disabled"
# Each change to the streamed text, with whether the button was disabled at that moment.
WATCH_TEXT = """() => {
  window.tryUpdates = [];
  const go = document.querySelector('#try-go');
  new MutationObserver(() => window.tryUpdates.push(go.disabled))
    .observe(document.querySelector('#try-text'), {childList: true, characterData: true, subtree: true});
}"""


def tiny_checkpoint(root: Path) -> Path:
    """A 1-layer LLaMA trained on TEXT as one stream, recording step STEP: it answers in words and,
    having never seen an end of text, goes on to max_tokens (its chance of ending is ~1e-8 a token),
    its context of 256 tokens leaving room for a completion long enough to arrive in many pieces."""
    import torch

    from psyche.config import ModelConfig
    from psyche.data.tokenize import train_bpe
    from psyche.train import build_model, compute_gradients, save_checkpoint

    tok = train_bpe(TEXT, vocab_size=290)
    tok.save(str(root / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=290, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = tok.encode(" ".join(TEXT)).ids
    batch = torch.tensor([ids[k : k + 33] for k in range(0, 32 * 16, 32)])  # (16, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        compute_gradients(model, batch, micro_batch_size=16, grad_clip=1.0)
        opt.step()
    return save_checkpoint(model, root / "ckpt", tokenizer_path=root / "tokenizer.json", extra={"step": STEP})


@pytest.mark.timeout(300)
def test_try_it_streams_a_completion_from_the_runs_inference_server(tmp_path, data_dir):
    async_playwright = require_browser()
    started = time.monotonic()
    ckpt = tiny_checkpoint(tmp_path)
    net = Network(tmp_path / "served", small_config("try-it", data=data_dir))
    plain = Network(tmp_path / "plain", small_config("no-try-it", data=data_dir))
    serve = Serve("--checkpoint", str(ckpt), log=tmp_path / "serve.log")
    try:
        net.start_server("--inference-url", serve.url + "/v1")  # an OpenAI base URL: the status gives the root
        plain.start_server()
        assert net.status()["inference_url"] == serve.url
        assert plain.status()["inference_url"] is None
        [model] = serve.models()
        assert model["psyche"]["step"] == STEP, model
        asyncio.run(_drive_browser(async_playwright, net, plain, serve, model["id"], tmp_path))
    finally:
        serve.stop()
        net.stop()
        plain.stop()
    print(f"try-it e2e: {time.monotonic() - started:.1f} s")


async def _drive_browser(async_playwright, net: Network, plain: Network, serve: Serve, model_id: str,
                         tmp_path: Path) -> None:
    serve_url = serve.url
    errors: list[str] = []
    expect_load_failures = {"on": False}
    transferred: list = []

    async with async_playwright() as pw:
        browser, page = await open_page(pw, errors=errors, transferred=transferred,
                                        noise=lambda text: expect_load_failures["on"] and LOAD_FAILED in text)

        # A server without --inference-url: its run's page has no box.
        await page.goto(f"{plain.url}/runs/{plain.cfg.run_id}")
        await page.wait_for_function(f"document.querySelector('#run-name').textContent === {plain.cfg.name!r}",
                                     timeout=30_000)
        await poll(page, "document.querySelector('#conn').dataset.state === 'live'", "the plain run's live feed", 30, plain)
        assert await page.evaluate("document.querySelector('#try').hidden")
        assert not await page.locator("#try").is_visible()

        # With one: the box, saying where it asks.
        transferred.clear()
        await page.goto(f"{net.url}/runs/{net.cfg.run_id}")
        await page.wait_for_selector("#try", state="visible", timeout=30_000)
        assert await page.locator("#try-where").text_content() == f"the run's model, served at {serve_url}"
        assert not await page.locator("#try-out").is_visible()  # nothing asked yet

        # A prompt: the completion streams in, the button disabled meanwhile, then says who answered.
        await page.evaluate(WATCH_TEXT)
        await page.fill("#try-prompt", "the cat")
        await page.fill("#try-max", "200")
        await page.fill("#try-temp", "0.8")
        await page.click("#try-go")
        await poll(page, f"!{BUSY} && {META}.includes('answered by step')", "the completion to end", 120, net)
        meta = await page.evaluate(META)
        assert meta == f"answered by step {STEP} · model {model_id} · stopped at max tokens", meta
        assert await page.evaluate("document.querySelector('#try-meta').classList.contains('bad')") is False
        assert await page.locator("#try-prompt-out").text_content() == "the cat"
        text = await page.locator("#try-text").text_content()
        assert len(text.split()) >= 20, text  # 200 tokens of words
        assert await page.evaluate("document.querySelector('#try-text').children.length") == 0, "text nodes only"
        updates = await page.evaluate("window.tryUpdates")
        assert len(updates) >= 2, f"the text arrived in {len(updates)} piece(s), not as a stream"
        assert updates[0] is True, "the button is disabled while the answer streams"

        # The box on a phone, and in dark colours.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.wait_for_timeout(300)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await page.locator("#try").screenshot(path=str(tmp_path / "try-it-phone.png"))
        await page.emulate_media(color_scheme="dark")
        rgb = await page.evaluate("getComputedStyle(document.querySelector('#try-prompt')).backgroundColor")
        assert sum(int(v) for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]) < 150, rgb
        await page.locator("#try").screenshot(path=str(tmp_path / "try-it-dark.png"))
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.emulate_media(color_scheme="light")

        # The page itself (HTML, script, style, icon, not the inference server's answers): under 1 MB.
        total = 0
        for req in transferred:
            if not req.url.startswith(serve_url):
                sizes = await req.sizes()
                total += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        assert 0 < total < 1_000_000, total

        # A request the inference server refuses: its OpenAI error message, in the box.
        expect_load_failures["on"] = True
        await page.evaluate("document.querySelector('#try-max').removeAttribute('max')")  # past the page's own cap
        await page.fill("#try-max", "100000000")
        await page.click("#try-go")
        await poll(page, f"!{BUSY} && document.querySelector('#try-meta').classList.contains('bad')",
                   "the refusal to show", 60, net)
        refusal = await page.evaluate(META)
        direct = httpx.post(serve_url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 100000000,
                                                                 "temperature": 0.8, "stream": True}, timeout=30)
        assert 400 <= direct.status_code < 500 and refusal == direct.json()["error"]["message"], (refusal, direct.text)

        # The inference server gone: the box says it cannot reach it.
        serve.stop()
        await page.fill("#try-max", "20")
        await page.click("#try-go")
        await poll(page, f"!{BUSY} && {META}.startsWith('cannot reach')", "the unreachable server to show", 60, net)
        assert await page.evaluate(META) == f"cannot reach the inference server at {serve_url}"
        expect_load_failures["on"] = False
        await page.screenshot(path=str(tmp_path / "try-it.png"), full_page=True)
        await browser.close()
    assert not errors, "\n".join(errors)
