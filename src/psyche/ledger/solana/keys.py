"""Reading a participant's key as a Solana keypair.

Two file formats are accepted: psyche's own key file (``psyche-ed25519-secret-v1``
and a hex line, see :mod:`psyche.identity`) and the Solana CLI's keypair
JSON (an array of 64 numbers). Either way the same ed25519 key is the Solana
signer, the coordinator client id and the iroh endpoint id.
"""

from __future__ import annotations

import json
from pathlib import Path

from solders.keypair import Keypair

from psyche.identity import Identity, IdentityError


def load_keypair(path: Path, *, create: bool = False) -> Keypair:
    """The keypair in ``path``; with ``create``, a fresh psyche key file is written if it is missing.

    Raises ``ValueError`` naming the file and what is wrong with it.
    """
    if path.exists() and path.read_text().lstrip().startswith("["):
        try:
            raw = bytes(json.loads(path.read_text()))
            return Keypair.from_bytes(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a Solana keypair file (a JSON array of 64 bytes): {exc}") from None
    try:
        ident = Identity.load_or_create(path) if create else Identity.load(path)
    except (IdentityError, OSError) as exc:  # both name the file and the problem
        raise ValueError(str(exc)) from None
    return Keypair.from_seed(ident.secret_bytes)
