"""The dashboard in a real headless Chromium, against a live run (a server and real clients).

The page must load with no console errors, show the run, advance its step
counter and loss chart while the run trains, follow the server through a
restart without a reload, stay under 1 MB transferred, fit a phone's width,
and switch to dark colours. The test saves a screenshot (to
``docs/dashboard.png`` when ``PSYCHE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from psyche.dashboard import status_delta
from psyche.data import ensure_default_dataset
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


@pytest.fixture(scope="module")
def data_dir():
    return ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)


@pytest.mark.timeout(600)
def test_dashboard_follows_a_live_run_in_chromium(tmp_path, data_dir):
    async_playwright = require_browser()
    net = Network(tmp_path, small_config("dash-e2e", data=data_dir, total_steps=14, init_min_clients=2,
                                         min_clients=1, witness_nodes=1))
    try:
        net.start_server()
        net.start_client(0)
        net.start_client(1, "--max-upload-rate", "5M")  # its cap shows under its traffic
        asyncio.run(_drive_browser(async_playwright, net, tmp_path))
    finally:
        net.stop()


async def _drive_browser(async_playwright, net: Network, tmp_path: Path) -> None:
    run_id = net.cfg.run_id
    errors: list[str] = []
    allowed_noise = {"on": False}
    transferred: list = []

    def on_console(msg):
        if msg.type == "error" and not (allowed_noise["on"] and any(n in msg.text for n in RECONNECT_NOISE)):
            errors.append(f"console: {msg.text}")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="light")
        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("requestfinished", lambda req: transferred.append(req))

        # The runs list shows the run; its row leads to the run's page.
        await page.goto(net.url + "/")
        await page.wait_for_selector(f"a[href='/runs/{run_id}']", timeout=30_000)
        await page.click(f"a[href='/runs/{run_id}']")
        await page.wait_for_url(f"**/runs/{run_id}")
        await page.wait_for_function(f"document.querySelector('#run-name').textContent === {run_id!r}", timeout=30_000)
        assert await poll(page, f"{CONN} === 'live'", "the live feed", 30, net)
        for prev, new in DELTA_CASES:  # the page's applyDelta agrees with the server's deltas
            got = await page.evaluate("([p, d]) => PsycheDashboard.applyDelta(p, d)", [prev, status_delta(prev, new)])
            assert got == new, (prev, new, got)

        # While the run trains, the step counter and the loss chart advance with no reload.
        nav_count = await page.evaluate("performance.getEntriesByType('navigation').length")
        step1 = await poll(page, f"{STEP} >= 3 && {LOSS_POINTS} >= 1 && {STEP}", "training to reach step 3", 240, net)
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

        # Shown on the page: clients, witness outcomes, the config.
        assert await page.locator("#clients-body tr").count() == 2
        assert await page.locator("#clients-body .cap").all_text_contents() == ["≤ 5.0 MB/s"]
        assert await page.locator("#witness-body .pill-ok").count() >= 1
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
        await browser.close()
    assert not errors, "\n".join(errors)
