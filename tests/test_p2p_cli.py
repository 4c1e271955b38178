"""`psyche keygen`, and the key file as the iroh endpoint key (endpoint id == public key)."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from psyche.cli import app
from psyche.identity import Identity
from psyche.p2p import P2PNode
from psyche.p2p.iroh_transport import ticket_id


def test_keygen_creates_0600_key_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "node.key"
    r = CliRunner().invoke(app, ["keygen", str(path)])
    assert r.exit_code == 0, r.output
    assert path.stat().st_mode & 0o777 == 0o600
    ident = Identity.load(path)
    assert ident.public_key.hex() in r.output
    again = CliRunner().invoke(app, ["keygen", str(path)])
    assert again.exit_code == 1 and "already exists" in again.output
    assert Identity.load(path).public_key == ident.public_key
    assert CliRunner().invoke(app, ["keygen", str(path), "--force"]).exit_code == 0
    assert Identity.load(path).public_key != ident.public_key


def test_nodes_creating_the_same_key_at_once_all_get_that_one_key(tmp_path):
    """A key file appears whole: a node loading it while another writes it never reads half.

    (Threads racing on one path: before the file was written aside and linked into place,
    most rounds had a thread read an empty or partial key.)
    """
    from tests.concurrently import run_at_once

    for round_ in range(20):
        path = tmp_path / f"node-{round_}.key"
        got = run_at_once(lambda: Identity.load_or_create(path).public_key, 8)  # noqa: B023 - called in-loop
        assert not [g for g in got if isinstance(g, Exception)], got
        assert len(set(got)) == 1, "every node holds the same key"
        assert path.stat().st_mode & 0o777 == 0o600
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_iroh_endpoint_id_is_the_node_key(tmp_path):
    ident = Identity.load_or_create(tmp_path / "k")

    async def main():
        node = await P2PNode.start(ident, "r")
        try:
            assert ticket_id(node.address) == ident.public_key
        finally:
            await node.close()

    asyncio.run(main())
