"""`psyche keygen`, and the key file as the iroh endpoint key (endpoint id == public key)."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from psyche.cli import app
from psyche.p2p import Identity, P2PNode
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


def test_iroh_endpoint_id_is_the_node_key(tmp_path):
    ident = Identity.load_or_create(tmp_path / "k")

    async def main():
        node = await P2PNode.start(ident, "r")
        try:
            assert ticket_id(node.address) == ident.public_key
        finally:
            await node.close()

    asyncio.run(main())
