"""Build the on-chain program from its C source: clang (bpfel) + our SBF linker.

``build_program()`` compiles ``psyche/ledger/program/psyche_run.c`` with Debian's
clang for the upstream ``bpfel`` target and links it with
:mod:`psyche.ledger.solana.sbf_link`. The result is cached by the hash of the
source, the flags and the compiler's version, under ``build/solana/`` in the
source tree (or ``$PSYCHE_BUILD_DIR``, or the user cache when the tree is not
writable). No binary is committed: every checkout builds its own.

Run ``python -m psyche.ledger.solana.build`` to build and print the path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from psyche.ledger.solana.sbf_link import link

SOURCE = Path(__file__).resolve().parents[1] / "program" / "psyche_run.c"
CFLAGS = ("-target", "bpfel", "-mcpu=v1", "-O2", "-fno-builtin", "-fno-jump-tables", "-ffreestanding",
          "-nostdlib", "-Wall", "-Werror")
# Solana's VM runs the original eBPF instruction set (v1: no 32-bit jumps); every helper
# is inlined or a plain relative call; no data sections, no library calls (see the C file).


class BuildError(RuntimeError):
    """The program could not be built; the message says what to install or what failed."""


def _clang() -> str:
    for name in ("clang", "clang-14", "clang-15", "clang-16", "clang-17"):
        found = shutil.which(name)
        if found:
            return found
    raise BuildError("clang not found: install Debian's clang (apt-get install clang) to build the Solana program")


def _default_dir() -> Path:
    env = os.environ.get("PSYCHE_BUILD_DIR")
    if env:
        return Path(env) / "solana"
    root = Path(__file__).resolve().parents[4]  # the source checkout (src/psyche/ledger/solana/..)
    if (root / "pyproject.toml").exists() and os.access(root, os.W_OK):
        return root / "build" / "solana"
    return Path.home() / ".cache" / "psyche" / "solana"


def build_program(*, out_dir: Path | None = None, force: bool = False) -> Path:
    """Compile and link the program if needed; return the path of the ``.so``.

    Cached by content: a changed source, flag or compiler gives a new file. Raises
    :class:`BuildError` if clang is missing or the compile fails.
    """
    clang = _clang()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
    out_dir = out_dir or _default_dir()
    target = out_dir / f"psyche_run-{key}.so"
    if target.exists() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "psyche_run.o"
        proc = subprocess.run([clang, *CFLAGS, "-c", str(SOURCE), "-o", str(obj)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"clang failed on {SOURCE}:\n{proc.stderr.strip()}")
        elf = link(obj.read_bytes())
    partial = target.with_suffix(".tmp")
    partial.write_bytes(elf)
    partial.replace(target)  # atomic: concurrent builders never see half a file
    return target


@cache
def program_elf() -> bytes:
    """The program's ELF bytes (built on first use in this process)."""
    return build_program().read_bytes()


if __name__ == "__main__":
    try:
        print(build_program(force="--force" in sys.argv))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
