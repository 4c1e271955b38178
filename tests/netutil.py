"""Helpers for end-to-end tests: a real coordinator server and real client processes
(:mod:`psyche.testing.network`)."""

from __future__ import annotations

from pathlib import Path

from psyche.testing.network import Network, small_config

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "Network", "small_config"]
