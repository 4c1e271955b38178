"""The dashboard in a real headless Chromium, against a live run (a server and real clients).

The page must load with no console errors, show the run, count steps done
(0 before training, the step under way beside it, all of them once finished),
advance its step counter and loss chart while the run trains, follow the server
through a restart without a reload, explain its witness table and say where a
checkpoint is and who wrote it, stay under 1 MB transferred, fit a phone's
width, and switch to dark colours. The test saves a screenshot (to
``docs/dashboard.png`` when ``PSYCHE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from psyche.dashboard import status_delta
from tests.netutil import ROOT, Network, small_config

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("PSYCHE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# While the server is down the browser reports each refused reconnection on the console;
# those are the only errors allowed, and only while it is down.
RECONNECT_NOISE = ("WebSocket connection to", "ERR_CONNECTION_REFUSED")


def require_browser():
    """Playwright's Python package and the Debian Chromium, or a failure saying how to get them."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: run `make install` (it is in the [test] extra)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make install` (Debian package `chromium`) "
                    "or set PSYCHE_CHROMIUM to a Chromium binary")
    return async_playwright


async def poll(page, js: str, what: str, timeout: float, net: Network):
    """Evaluate ``js`` in the page until it is truthy; fail naming ``what`` (with the run's logs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = await page.evaluate(js)
        if value:
            return value
        for name, p in net.procs.items():
            assert p.poll() in (None, 0), f"{name} exited with {p.returncode} while waiting for {what}:\n{net.log(name)}"
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {net.try_status()}")


def _ring(keys):
    return [{"epoch": e, "step": s, "seen": [f"{e}{s}"]} for e, s in keys]


DELTA_CASES = [
    ({"step": 1, "history": []}, {"step": 2, "history": [{"step": 1, "loss": 3.5, "val_loss": None}]}),
    ({"history": [{"step": s, "loss": 1.0} for s in range(1, 5)], "x": 1},
     {"history": [{"step": s, "loss": 1.0 + (s == 4)} for s in range(3, 7)], "y": [1, 2]}),
    ({"witness_outcomes": _ring([(0, 9), (0, 10), (1, 11)])}, {"witness_outcomes": _ring([(0, 10), (1, 11), (1, 12)])}),
    ({"witness_rounds": _ring([(0, 1), (0, 2)])}, {"witness_rounds": _ring([(0, 2), (0, 1)])}),
]

STEP = "(() => { const e = document.querySelector('#step-value'); return e ? parseInt(e.textContent) : 0; })()"
LOSS_POINTS = "(() => { const s = document.querySelector('#chart-loss svg'); return s ? +(s.dataset.points || 0) : 0; })()"
CONN = "document.querySelector('#conn').dataset.state"
STATE = "(() => { const e = document.querySelector('#run-badge'); return e ? e.textContent.trim() : ''; })()"


async def open_page(pw, *, errors: list[str], transferred: list, noise: Callable[[str], bool]):
    """Headless Chromium and a light 1280x900 page in it, whose console errors (but those
    ``noise`` allows) and script errors go to ``errors`` and finished requests to
    ``transferred``; returns (browser, page)."""
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = await browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="light")

    def on_console(msg):
        if msg.type == "error" and not noise(msg.text):
            errors.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("requestfinished", lambda req: transferred.append(req))
    return browser, page


def visible(page, selector: str):
    """The text a viewer sees in ``selector`` (whitespace collapsed)."""
    return page.evaluate(f"(() => {{ const e = document.querySelector({selector!r}); "
                         "return e ? e.innerText.replace(/\\s+/g, ' ').trim() : null; })()")


@pytest.mark.timeout(600)
def test_dashboard_follows_a_live_run_in_chromium(tmp_path, data_dir):
    async_playwright = require_browser()
    net = Network(tmp_path, small_config("dash-e2e", data=data_dir, total_steps=14, init_min_clients=2,
                                         min_clients=1, witness_nodes=1))
    try:
        net.start_server()

        def start_clients() -> None:
            net.start_client(0, "--nproc-per-node", "2")  # a node of two ranks: shown under its speed
            net.start_client(1, "--max-upload-rate", "5M")  # its cap shows under its traffic

        asyncio.run(_drive_browser(async_playwright, net, tmp_path, start_clients))
    finally:
        net.stop()


async def _drive_browser(async_playwright, net: Network, tmp_path: Path, start_clients) -> None:
    run_id = net.cfg.run_id
    errors: list[str] = []
    allowed_noise = {"on": False}
    transferred: list = []

    async with async_playwright() as pw:
        browser, page = await open_page(
            pw, errors=errors, transferred=transferred,
            noise=lambda text: allowed_noise["on"] and any(n in text for n in RECONNECT_NOISE))

        # The runs list shows the run, with no step done yet; its row leads to the run's page.
        steps = net.cfg.coordinator.total_steps
        await page.goto(net.url + "/")
        await page.wait_for_selector(f"a[href='/runs/{run_id}']", timeout=30_000)
        assert await visible(page, "#runs thead") == "Run State Steps done Tokens trained Tokens/s Clients"
        assert f"0 / {steps}" in await visible(page, "#runs-body tr")
        await page.click(f"a[href='/runs/{run_id}']")
        await page.wait_for_url(f"**/runs/{run_id}")
        await page.wait_for_function(f"document.querySelector('#run-name').textContent === {run_id!r}", timeout=30_000)
        assert await poll(page, f"{CONN} === 'live'", "the live feed", 30, net)
        # Before any training: step 0 of the total.
        assert await visible(page, "#step-value") == "0"
        assert await visible(page, "#step-value + span") == f"/ {steps}"
        assert await visible(page, "#step-now") == "no step trained yet"
        start_clients()
        for prev, new in DELTA_CASES:  # the page's applyDelta agrees with the server's deltas
            got = await page.evaluate("([p, d]) => PsycheDashboard.applyDelta(p, d)", [prev, status_delta(prev, new)])
            assert got == new, (prev, new, got)

        # While the run trains, the step counter and the loss chart advance with no reload.
        nav_count = await page.evaluate("performance.getEntriesByType('navigation').length")
        step1 = await poll(page, f"{STEP} >= 3 && {LOSS_POINTS} >= 1 && {STEP}", "training to reach step 3", 240, net)
        # While a round is under way, its step is named beside the count of steps done.
        done, now = await poll(page, "(() => { const n = document.querySelector('#step-now').textContent; "
                               f"return /^now (training|witnessing) step/.test(n) && [{STEP}, n]; }})()",
                               "a round under way", 60, net)
        assert re.fullmatch(r"now (training|witnessing) step (\d+)", now).group(2) == str(done + 1), (done, now)
        points1 = await page.evaluate(LOSS_POINTS)
        await poll(page, f"{STEP} > {step1} && {LOSS_POINTS} > {points1}", "the step and loss chart to advance", 120, net)

        # The server is killed and restarted on the same database: the page reconnects by itself.
        allowed_noise["on"] = True
        net.kill("server")
        await poll(page, f"{CONN} !== 'live'", "the page to notice the server is gone", 30, net)
        step_down = await page.evaluate(STEP)
        net.start_server()
        await poll(page, f"{CONN} === 'live'", "the page to reconnect", 60, net)
        allowed_noise["on"] = False
        await poll(page, f"{STEP} > {step_down}", "training to go on after the restart", 120, net)
        assert await page.evaluate("performance.getEntriesByType('navigation').length") == nav_count, "no reload"
        assert await page.evaluate(LOSS_POINTS) >= step_down - 1

        # Shown on the page: clients, witness outcomes (explained), the config.
        assert await page.locator("#clients-body tr").count() == 2
        assert sorted(await page.locator("#clients-body .cap").all_text_contents()) == ["2 ranks", "≤ 5.0 MB/s"]
        clients_head = await page.locator("#clients-body").locator("xpath=../thead/tr/th").all_inner_texts()
        assert clients_head[3:6] == ["Points", "Share", "Speed"]
        # Each member's share of the round under way, and its speed once the coordinator measured it.
        shares = await poll(page, "(() => { const got = [...document.querySelectorAll('#clients-body tr')].map((r) => "
                            "[r.cells[4].innerText.trim(), r.cells[5].innerText.trim().split('\\n')[0]]); "
                            "return got.length === 2 && got.every(([s, v]) => /^\\d+ \\(\\d+%\\)$/.test(s) "
                            "&& /^[\\d,]+ tok\\/s$/.test(v)) && got; })()", "each client's share and speed", 60, net)
        assert 98 <= sum(int(re.search(r"\((\d+)%\)", s).group(1)) for s, _ in shares) <= 102, shares
        assert await page.locator("#witness-body .pill-ok").count() >= 1
        witness_head = page.locator("#witness-body").locator("xpath=../thead/tr/th")
        assert await witness_head.all_inner_texts() == ["Step", "Witness reports", "Trainers seen by a quorum", "Outcome"]
        assert "the quorum needed: 2/3 of them rounded down" in await witness_head.nth(1).get_attribute("title")
        assert "filled if at least a quorum of the witness reports" in await witness_head.nth(2).get_attribute("title")
        assert re.fullmatch(r"\d+ of \d+ \(need \d+\)", (await page.locator("#witness-body td.num").first.inner_text()).strip())
        key = [" ".join(t.split()) for t in await page.locator("#witness-key dt, #witness-key dd").all_inner_texts()]
        assert key[:4] == ["all seen", "a quorum of witnesses reported, and every trainer's result reached a quorum of them",
                           "N not seen", "a quorum reported, but N trainers' results reached fewer than a quorum of "
                           "witnesses: a member's health check can then drop those trainers from the epoch, without points"]
        assert key[4:] == ["no quorum", "fewer reports than the quorum: nobody can be judged, and the epoch ends after this round",
                           "N condemned", "verification found N results that do not match their trainers' assigned "
                           "data: nobody applied them, and their trainers were dropped from the epoch without points",
                           "waiting for witnesses", "the round still takes reports",
                           "details not kept", "an older round: only its counts are kept (the coordinator stores who was "
                           "seen for the last 4 rounds of an epoch, and this page keeps those it saw live)"]
        assert "hidden_size" in await page.locator("#config-grid").text_content()

        await poll(page, f"{STEP} >= 10", "a few more steps for the screenshot", 120, net)
        await page.wait_for_timeout(500)
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("PSYCHE_UPDATE_SCREENSHOT") == "1":
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "dashboard.png")

        # Under 1 MB for the whole page (HTML, script, style, icon).
        total = 0
        for req in transferred:
            sizes = await req.sizes()
            total += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        assert 0 < total < 1_000_000, total

        # A phone's width: nothing sticks out sideways. Dark mode: dark background.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.wait_for_timeout(300)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await page.emulate_media(color_scheme="dark")
        rgb = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(int(v) for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]) < 150, rgb

        # Finished: every step done, and the checkpoint says who wrote it, where, and its hash.
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.emulate_media(color_scheme="light")
        await poll(page, f"{STATE} === 'Finished' && {STEP} === {steps}", "the run to finish", 240, net)
        assert await visible(page, "#step-now") == f"all {steps} steps done"
        assert await page.title() == f"{net.cfg.name} · step {steps}/{steps} · Psyche"
        await poll(page, f"(document.querySelector('#ckpt-body td.mono') || {{}}).innerText?.startsWith('{steps} ')",
                   "the final checkpoint", 60, net)
        head = await page.locator("#ckpt-body").locator("xpath=../thead/tr/th").all_inner_texts()
        assert head == ["After step", "Written by", "sha256", "Folder, on that client's machine"]
        row = page.locator("#ckpt-body tr").first
        step_cell, by, sha, _ = [" ".join(t.split()) for t in await row.locator("td").all_inner_texts()]
        ids = {a["id"][:8] for a in net.try_status()["accounts"]}
        assert re.fullmatch(rf"{steps} epoch \d+", step_cell) and by in ids and re.fullmatch(r"[0-9a-f]{12}", sha)
        assert await row.locator("td code").inner_text() == str(net.root / "checkpoint")
        assert f"on the machine of client {by}" in await row.locator("td").nth(3).get_attribute("title")
        snippet = (await visible(page, "#ckpt-load")).split(" from transformers")[0]
        assert snippet == f"# on client {by}'s machine, which wrote it (sha256 {sha}…)"
        await page.screenshot(path=str(tmp_path / "dashboard-finished.png"), full_page=True)
        await browser.close()
    assert not errors, "\n".join(errors)
