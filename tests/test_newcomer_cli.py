"""What a newcomer sees from `psyche` itself: its help, its version, whole output lines, `psyche doctor`.

Each test runs the real `psyche` command in a subprocess, with its output piped, as a
user running it from a script or into a log file would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomli_w
import typer.main

from psyche.cli import COMMAND_GROUPS, app
from tests.netutil import Network, small_config

ROOT = Path(__file__).resolve().parents[1]


def psyche(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "psyche.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def all_commands() -> list[list[str]]:
    """Every command path: ['server'], ['solana', 'create-run'], ..."""
    out = []

    def walk(cmd, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer carries its own copy of click)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append(path)

    walk(typer.main.get_command(app), [])
    return out


def test_version_is_printed():
    res = psyche("--version")
    assert res.returncode == 0
    from importlib.metadata import version

    assert res.stdout == f"psyche {version('psyche')}\n"


def test_help_lists_commands_in_groups_in_the_order_a_newcomer_meets_them():
    res = psyche("--help")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    titles = [ln[:-1] for ln in lines if ln.endswith(":") and not ln.startswith(" ") and ln != "Options:"]
    assert titles == list(COMMAND_GROUPS), titles
    listed = [ln.split()[0] for ln in lines if ln.startswith("  ") and not ln.startswith("   ")
              and ln.split()[0] != "--version" and ln.split()[0] != "--help" and ln.split()[0][0].isalpha()
              and ln.split()[0].islower()]
    expected = [n for names in COMMAND_GROUPS.values() for n in names]
    assert [n for n in listed if n in expected] == expected
    assert "psyche doctor" in res.stdout, "the top help points a newcomer at psyche doctor"


def test_no_help_line_shows_a_type_tag():
    """Options say what to pass (URL, FILE, N), never a `<bool>` or `<str>` tag."""
    commands = all_commands()
    assert ["doctor"] in commands and ["solana", "create-run"] in commands
    for path in commands:
        res = psyche(*path, "--help")
        assert res.returncode == 0, (path, res.stderr)
        for tag in ("<bool>", "<str>", "<path>", "<int>", "<float>", "<int range>", "<float range>"):
            assert tag not in res.stdout, f"psyche {' '.join(path)} --help shows {tag}:\n{res.stdout}"


def test_every_command_that_computes_picks_its_device_the_same_way():
    with_device = []
    for path in all_commands():
        text = psyche(*path, "--help").stdout
        if "--device" in text:
            with_device.append(path[-1])
            option = text[text.index("--device"):].split("\n  --", 1)[0]
            assert "auto (cuda if present, else cpu)" in option and "[default: auto]" in option, (path, option)
    assert sorted(with_device) == ["client", "doctor", "generate", "serve", "train"]


def test_output_to_a_pipe_is_never_cut_into_short_lines(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "run-config-with-a-long-name.toml"
    deep.parent.mkdir(parents=True)
    deep.write_text((ROOT / "config" / "tiny-fortunes.toml").read_text())
    res = psyche("validate-config", str(deep), cwd=ROOT)
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(f"OK  {deep}  (run tiny-fortunes, digest ") and first.endswith(")"), first


def _config_file(tmp_path: Path, data: Path | str) -> Path:
    path = tmp_path / "run.toml"
    cfg = small_config("doc", data=Path(data) if not str(data).startswith("psyche:") else Path("."))
    d = cfg.model_dump(mode="json", exclude_none=True)
    d["data"]["location"] = str(data)
    path.write_text(tomli_w.dumps(d))
    return path


def _findings(res: subprocess.CompletedProcess) -> dict[str, str]:
    """{check: status} from doctor's lines, all of which must be findings or the summary."""
    out = {}
    for line in (res.stdout + res.stderr).splitlines():
        status, _, rest = line.strip().partition("  ")
        if status in ("ok", "warn", "FAIL"):
            out[rest.split(":", 1)[0]] = status
        else:
            assert line.startswith(("ready:", "error:", "waiting up to ")), f"unexpected line {line!r}"
    assert "Traceback" not in res.stderr
    return out


def test_doctor_says_ready_for_a_good_config_and_creates_nothing(tmp_path, data_dir):
    cfg = _config_file(tmp_path, data_dir)
    res = psyche("doctor", "--config", str(cfg), "--key", str(tmp_path / "node.key"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _findings(res) == {"software": "ok", "device": "ok", "key": "ok", "config": "ok", "data": "ok",
                              "memory": "ok", "disk": "ok", "p2p": "ok"}
    assert res.stdout.splitlines()[-1] == "ready: this machine can train"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"], "doctor creates no key or folder"


def test_doctor_names_every_problem_on_one_line_each(tmp_path):
    cfg = _config_file(tmp_path, tmp_path / "no-such-data")
    key = tmp_path / "open.key"
    key.write_text("not a key\n")
    key.chmod(0o644)
    res = psyche("doctor", "--config", str(cfg), "--key", str(key), "--device", "cuda:7",
                 "--bind", "192.0.2.1:0", cwd=tmp_path)
    assert res.returncode == 1
    found = _findings(res)
    assert found["device"] == found["key"] == found["data"] == found["p2p"] == "FAIL", found
    err = res.stderr.splitlines()
    assert any(ln.startswith("FAIL  key: ") and "chmod 600" in ln for ln in err)
    assert any(ln.startswith("FAIL  data: ") and "no-such-data" in ln and "psyche tokenize" in ln for ln in err), err
    assert any(ln.startswith("FAIL  p2p: ") and "192.0.2.1" in ln and "--bind" in ln for ln in err)
    assert err[-1] == "error: 4 problem(s) above: fix each FAIL line, then run psyche doctor again"


def test_doctor_without_a_run_says_what_it_did_not_check(tmp_path):
    res = psyche("doctor", "--key", str(tmp_path / "k.key"), cwd=tmp_path)
    assert res.returncode == 0
    assert _findings(res)["run"] == "warn"
    assert "no --server or --config given" in res.stdout


def test_doctor_against_a_server_that_is_not_there(tmp_path):
    from psyche.localports import free_port

    url = f"http://127.0.0.1:{free_port()}"
    res = psyche("doctor", "--server", url, "--key", str(tmp_path / "k.key"), cwd=tmp_path)
    assert res.returncode == 1
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("FAIL  coordinator: "))
    assert line == (f"FAIL  coordinator: cannot reach {url} (connection refused); is `psyche server` running "
                    "there, and does this machine reach that address?")
    waited = psyche("doctor", "--server", url, "--wait", "1.5", "--key", str(tmp_path / "k.key"), cwd=tmp_path)
    assert waited.stdout.splitlines()[0] == f"waiting up to 1.5 s for the coordinator at {url} to answer"
    assert f"FAIL  coordinator: cannot reach {url} after waiting 1.5 s (connection refused); " in waited.stderr
    bad = psyche("doctor", "--server", "127.0.0.1:8000", "--key", str(tmp_path / "k.key"), cwd=tmp_path)
    assert ("FAIL  coordinator: --server must be a URL like http://HOST:PORT (got '127.0.0.1:8000')"
            in bad.stderr.splitlines())


def test_doctor_against_a_live_server_reads_the_run_and_reaches_its_members(tmp_path, data_dir):
    (tmp_path / "net").mkdir()
    net = Network(tmp_path / "net", small_config("doctored", data=data_dir, init_min_clients=3))
    try:
        net.start_server()
        res = psyche("doctor", "--server", net.url, "--key", str(tmp_path / "k.key"), cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        found = _findings(res)
        assert found["coordinator"] == found["data"] == found["memory"] == found["peers"] == "ok"
        assert (f"  ok  coordinator: {net.url} reachable; run doctored is WaitingForMembers, 0 of 10 steps done, "
                "0 member(s), 0 waiting to start") in res.stdout.splitlines()
        assert "  ok  peers: no other member to reach yet" in res.stdout.splitlines()
        assert res.stdout.splitlines()[-1] == f"ready: `psyche client --server {net.url}` can join"
        # Two nodes join and wait for a third: both answer over P2P, and one's key is taken.
        for i in range(2):
            net.start_client(i)
        net.wait_state(lambda s: len(s["pending"]) == 2, 60, "two clients waiting")
        res = psyche("doctor", "--server", net.url, "--key", str(tmp_path / "k.key"), cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "  ok  peers: 2 of 2 member(s) answered over P2P from here" in res.stdout.splitlines()
        taken = net.root / "client-0.key"
        res = psyche("doctor", "--server", net.url, "--key", str(taken), cwd=tmp_path)
        assert res.returncode == 1
        line = next(ln for ln in res.stderr.splitlines() if ln.startswith("FAIL  key: "))
        assert line.startswith(f"FAIL  key: {taken} is in use by a live node at 127.0.0.1:")
        assert line.endswith("(another psyche client?); give each node its own key: --key other.key")
        assert "  ok  peers: 1 of 1 member(s) answered over P2P from here" in res.stdout.splitlines()
        other = _config_file(tmp_path, data_dir)
        mismatch = psyche("doctor", "--server", net.url, "--config", str(other), "--key", str(tmp_path / "k.key"),
                          cwd=tmp_path)
        assert mismatch.returncode == 1
        assert any(ln.startswith(f"FAIL  config: {other} is not the config of run doctored")
                   for ln in mismatch.stderr.splitlines())
    finally:
        net.stop()
