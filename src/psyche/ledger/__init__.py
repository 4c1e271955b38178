"""Ledger backends: where a run's coordinator state lives and how instructions reach it.

One interface (:mod:`psyche.ledger.base`) and three hosts: :mod:`~psyche.ledger.embedded`
(in-process), :mod:`~psyche.ledger.server` with :mod:`~psyche.ledger.remote` as its client
(HTTP + WebSocket, SQLite), and :mod:`psyche.ledger.solana`. Deliberately empty: importing
one host must not import the others (nor torch, FastAPI or solders along with them).
"""
