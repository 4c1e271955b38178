"""Helpers for end-to-end tests: a real coordinator server and real client processes
(:mod:`psyche.testing.network`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from psyche.localports import free_port
from psyche.testing.network import Network, small_config, wait_serving

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "Network", "Serve", "small_config"]


class Serve:
    """A ``psyche serve ARGS`` process on a free port, logging to ``log``, and an ``openai``
    client for it (``ready=False``: do not wait for it to answer)."""

    def __init__(self, *args: str, log: Path, ready: bool = True):
        import openai

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", "serve", "--port", str(self.port),
                                      "--device", "cpu", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        if ready and not wait_serving(self.url, self.proc, timeout=120):
            self.stop()
            raise AssertionError(f"psyche serve did not start:\n{log.read_text()}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def health(self) -> dict:
        """``GET /healthz``: the model served and the batches decoded so far."""
        return httpx.get(self.url + "/healthz").json()

    def models(self) -> list[dict]:
        """``GET /v1/models``' list (empty before a followed run published a checkpoint)."""
        return httpx.get(self.url + "/v1/models").json()["data"]

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 20 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
