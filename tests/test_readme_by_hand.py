"""The README's "Running a network by hand" block, run as it is on a fresh copy of the tree.

The block is read from README.md at test time (the one after the ``by-hand`` marker),
so what a newcomer copies is what this test runs: tokenize, validate the config, a
server, ``psyche doctor --wait``, three clients, and the run must reach Finished.

It runs in a network namespace of its own when this machine allows one (root and
``unshare --net``), so the README's fixed port 8000 is free whatever else runs here;
elsewhere the port is swapped for a free one, the only change made to the block.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from psyche.demo import free_port

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- by-hand:"


def by_hand_block() -> str:
    """The ```sh block that follows the by-hand marker in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER):]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match, "README.md: no ```sh block after the by-hand marker"
    return match.group(1)


def fresh_copy(dest: Path) -> None:
    """The project's files as a clone has them (tracked, plus new files not ignored), and its .venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def own_network_namespace() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


def test_readme_by_hand_block_runs_to_finished(tmp_path):
    block = by_hand_block()
    assert "psyche server" in block and "psyche client" in block and "psyche doctor" in block
    tree = tmp_path / "clone"
    tree.mkdir()
    fresh_copy(tree)
    script = tree / "by-hand.sh"
    if own_network_namespace():
        script.write_text(block)
        command = ["unshare", "--net", "sh", "-c", "ip link set lo up && exec bash -e by-hand.sh"]
    else:
        script.write_text(block.replace("8000", str(free_port())))
        command = ["bash", "-e", "by-hand.sh"]
    log = tmp_path / "by-hand.log"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=tree, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the server, should `kill %1` not have ended it
            except ProcessLookupError:
                pass
    text = log.read_text(errors="replace")
    assert code == 0, f"the by-hand block exited with {code}:\n{text[-6000:]}"
    lines = text.splitlines()
    assert any(ln.startswith("wrote data/fortunes: ") for ln in lines), text[-3000:]
    assert any(ln.startswith("OK  config/tiny-fortunes.toml  (run tiny-fortunes") for ln in lines), text[-3000:]
    assert "ready: `psyche client --server http://127.0.0.1:" in text, text[-3000:]
    # Whole lines even into a file: each client's last word and its step lines are one line each.
    finished = [ln for ln in lines if re.fullmatch(r"[0-9a-f]{8} run finished at step 40; final state digest [0-9a-f]{64}", ln)]
    assert len(finished) == 3 and len({ln.rsplit(" ", 1)[1] for ln in finished}) == 1, text[-6000:]
    assert sum(bool(re.fullmatch(r"[0-9a-f]{8} step \d+: trained samples \[\d+, \d+\) loss [\d.]+ \([\d,]+ tok/s\), "
                                 r"result [\d,]+ bytes", ln)) for ln in lines) >= 3 * 40 - 3, text[-6000:]
    assert "Traceback" not in text, text[-6000:]
    assert (tree / "ckpt").is_dir() and any((tree / "ckpt").rglob("config.json")), "a checkpointer wrote the model"
