"""Psyche in Python: cooperative training of language models over the internet.

The map of the package follows the design document:

- :mod:`psyche.coordinator` — the pure, deterministic run state machine.
- :mod:`psyche.distro` — the DisTrO optimizer and its DCT + top-k codec.
- :mod:`psyche.train` — model building, LR schedules, the training step, checkpoints.
- :mod:`psyche.data` — token files addressed by sample index, and tokenization.
- :mod:`psyche.p2p` — signed broadcast and verified blob transfer over iroh.
- :mod:`psyche.ledger` — where the coordinator state lives (embedded, server, solana).
- :mod:`psyche.client` — the per-node runtime that acts on coordinator state.
- :mod:`psyche.dashboard` — the live web page.
- :mod:`psyche.cli` — the ``psyche`` command; :mod:`psyche.console`, the one-line
  refusals and consoles every command shares.
- :mod:`psyche.config` — the run config and its rules; :mod:`psyche.identity`, the ed25519 key.
- :mod:`psyche.testing` — the harness wing: simulators, workers and swarms for tests and benchmarks.

``make check`` holds the package to this map: the import-linter contracts in
``pyproject.toml`` let every import point down only, and mypy type-checks it.
"""

__version__ = "0.1.0"
