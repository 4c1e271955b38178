"""The live web page of every run: runs list, per-run status, charts, clients, witnesses.

Served by ``psyche server`` and ``psyche demo`` (:func:`mount_dashboard`) and, against
a remote server, by ``psyche dashboard --server URL`` (:func:`create_proxy_app`).
Every script and style comes from ``static/`` in this package: no CDN, works offline.
Updates are pushed over WebSockets as JSON (see :mod:`psyche.dashboard.feed`).
"""

from psyche.dashboard.app import create_proxy_app, mount_dashboard
from psyche.dashboard.feed import Feed, apply_delta, status_delta

__all__ = ["Feed", "apply_delta", "create_proxy_app", "mount_dashboard", "status_delta"]
