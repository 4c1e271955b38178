"""Helpers for end-to-end tests: a real coordinator server and real client processes
(:mod:`psyche.testing.network`)."""

from __future__ import annotations

from psyche.testing.network import Network, small_config

__all__ = ["Network", "small_config"]
