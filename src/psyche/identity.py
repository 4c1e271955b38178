"""A participant's identity: one ed25519 key, used as the iroh endpoint key, the Solana signer
and to sign messages.

The key file holds the 32 secret bytes as one line of hex, mode 0600. The same
32 bytes are the iroh ``SecretKey`` and the Solana keypair's seed, so a node's iroh
endpoint id equals its public key, which is also its client id in the coordinator.

This module imports nothing of ours: the P2P layer, the ledgers and the CLI all use
the key, so it lives below every one of them.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_HEADER = "psyche-ed25519-secret-v1"


class IdentityError(Exception):
    """The key file cannot be used (missing, unreadable, malformed or too open): fix the file.

    ``path`` names the file and ``problem`` says what is wrong with it.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class Identity:
    """An ed25519 key pair.

    >>> ident = Identity.generate()
    >>> Identity.verify(ident.public_key, b"hi", ident.sign(b"hi"))
    True
    """

    __slots__ = ("_key", "secret_bytes", "public_key")

    def __init__(self, secret_bytes: bytes) -> None:
        if len(secret_bytes) != 32:
            raise ValueError(f"an ed25519 secret is 32 bytes, got {len(secret_bytes)}")
        self._key = Ed25519PrivateKey.from_private_bytes(secret_bytes)
        self.secret_bytes = bytes(secret_bytes)
        self.public_key: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        """Return a fresh random identity (not saved anywhere)."""
        return cls(os.urandom(32))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file written by :meth:`save`.

        Raises :class:`IdentityError` if the file is missing, readable by group
        or others (like ssh, we refuse a key others could have copied), or
        malformed.
        """
        p = Path(path)
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise IdentityError(str(p), "no such key file") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(str(p), f"permissions {stat.S_IMODE(mode):04o} are too open; run chmod 600")
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if len(lines) != 2 or lines[0] != _HEADER:
            raise IdentityError(str(p), f"not a psyche key file (expected a '{_HEADER}' line and a hex line)")
        try:
            secret = bytes.fromhex(lines[1])
        except ValueError:
            raise IdentityError(str(p), "the secret line is not hex") from None
        if len(secret) != 32:
            raise IdentityError(str(p), f"the secret is {len(secret)} bytes, expected 32")
        return cls(secret)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the secret to ``path`` with mode 0600 (created that way, never widened).

        The file appears whole or not at all (written aside, then linked into place), so
        a process loading it at the same moment never reads half a key.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() and not overwrite:
            raise IdentityError(str(p), "already exists (refusing to overwrite a key)")
        fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")  # mode 0600
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{_HEADER}\n{self.secret_bytes.hex()}\n")
            os.chmod(tmp, 0o600)
            if overwrite:
                os.replace(tmp, p)
            else:
                try:
                    os.link(tmp, p)  # fails if another process created the key meanwhile
                except FileExistsError:
                    raise IdentityError(str(p), "already exists (refusing to overwrite a key)") from None
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at ``path``, creating a new one (0600) if the file does not exist."""
        p = Path(path)
        if not p.exists():
            ident = cls.generate()
            try:
                ident.save(p)
            except IdentityError:
                pass  # another process created it between exists() and open(): load theirs
            else:
                return ident
        return cls.load(p)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte ed25519 signature of ``message``."""
        return self._key.sign(message)

    @staticmethod
    def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is a valid signature of ``message`` by ``public_key``; never raises."""
        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __repr__(self) -> str:
        return f"Identity({self.public_key.hex()[:16]}…)"
