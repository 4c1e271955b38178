"""Commands that refuse what they were asked say why in one line and leave nothing behind."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from psyche.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_server_refuses_a_bad_config_and_leaves_nothing_behind(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\n[coordinator]\nwarmup_time = 900\nepoch_time = 600\n')
    db, key = tmp_path / "run.sqlite", tmp_path / "server.key"
    res = runner.invoke(app, ["server", "--config", str(bad), "--db", str(db), "--key", str(key)])
    assert res.exit_code == 1 and "warmup_time must be < epoch_time" in res.output
    missing = runner.invoke(app, ["server", "--db", str(db), "--key", str(key)])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        good = ROOT / "config" / "tiny-fortunes.toml"
        taken = runner.invoke(app, ["server", "--config", str(good), "--db", str(db), "--key", str(key),
                                    "--port", str(port)])
    assert taken.exit_code == 1 and "cannot listen" in taken.output and "--port" in taken.output
    assert not db.exists() and not key.exists(), "a refused command creates no database and no key"


def test_demo_refuses_a_busy_port_before_starting_anything(tmp_path):
    import io
    import socket

    from rich.console import Console

    from psyche.demo import run_demo

    out = io.StringIO()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = run_demo(clients=2, steps=2, out=tmp_path / "demo", port=busy.getsockname()[1],
                        console=Console(file=out, width=200))
    assert code == 1 and "cannot listen" in out.getvalue() and "--port" in out.getvalue()
    assert not (tmp_path / "demo").exists()


def test_an_unusable_key_file_is_named_with_its_problem(tmp_path):
    runner = CliRunner()
    loose = tmp_path / "loose.key"
    loose.write_text("psyche-ed25519-secret-v1\n" + "00" * 32 + "\n")
    loose.chmod(0o644)
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    db = tmp_path / "run.sqlite"
    cases = [
        (["server", "--config", str(ROOT / "config" / "tiny-fortunes.toml"), "--db", str(db), "--key", str(loose)],
         "too open; run chmod 600"),
        (["pause", "--server", "http://127.0.0.1:9", "--key", str(junk)], "not a psyche key file"),
        (["resume", "--server", "http://127.0.0.1:9", "--key", str(tmp_path / "none.key")], "no such key file"),
        (["client", "--server", "http://127.0.0.1:9", "--key", str(loose)], "too open; run chmod 600"),
    ]
    for args, problem in cases:
        res = runner.invoke(app, args)
        said = " ".join(res.output.split())  # rich wraps long lines
        assert res.exit_code == 1, (args, res.output)
        assert "--key" in said and problem in said, (args, res.output)
    assert not db.exists(), "the server created no database for a refused key"


def test_a_device_this_machine_lacks_is_refused_before_joining(tmp_path):
    import torch

    from psyche.train.device import device_problem

    assert device_problem("cpu") is None
    assert "not a device" in device_problem("tpu")
    assert "only" in device_problem("meta")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in device_problem("cuda:0")
    else:
        assert device_problem("cuda") is None
        assert "CUDA device(s)" in device_problem(f"cuda:{torch.cuda.device_count()}")
    runner = CliRunner()
    # The server URL is never reached: the device is checked first.
    for args in (["client", "--server", "http://127.0.0.1:9", "--key", str(tmp_path / "c.key"), "--device", "tpu"],
                 ["generate", "--checkpoint", str(tmp_path), "--device", "tpu"],
                 ["train", "--device", "tpu"]):
        res = runner.invoke(app, args)
        said = " ".join(res.output.split())
        assert res.exit_code == 1 and "--device 'tpu' is not a device" in said, (args, res.output)
    assert not (tmp_path / "c.key").exists()


def test_a_rate_cap_that_is_not_a_rate_is_refused_before_joining(tmp_path):
    runner = CliRunner()
    for flag in ("--max-upload-rate", "--max-download-rate"):
        res = runner.invoke(app, ["client", "--server", "http://127.0.0.1:9", "--key", str(tmp_path / "c.key"), flag, "5 Mbit/s"])
        said = " ".join(res.output.split())
        assert res.exit_code == 1 and f"{flag}: '5 Mbit/s' is not a rate" in said and "e.g. 500K" in said, res.output
    assert not (tmp_path / "c.key").exists()


def test_an_inference_url_that_is_not_a_url_is_refused_before_starting(tmp_path):
    runner = CliRunner()
    db, key = tmp_path / "run.sqlite", tmp_path / "server.key"
    for bad in ("127.0.0.1:8001", "ftp://host/", "http://host:port"):
        res = runner.invoke(app, ["server", "--config", str(ROOT / "config" / "tiny-fortunes.toml"), "--db", str(db),
                                  "--key", str(key), "--port", "0", "--inference-url", bad])
        assert res.exit_code == 1, (bad, res.output)
        assert res.output.splitlines() == [f"error: --inference-url must be a URL like http://HOST:PORT (got {bad!r})"]
    assert not db.exists() and not key.exists(), "a refused command creates no database and no key"


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "runs" / "demo" / "checkpoint").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "checkpoint" / "config.json").write_text("{}")
    cases = [
        ([], "pass exactly one of --checkpoint DIR, --follow URL or --follow-solana URL"),
        (["--checkpoint", str(tmp_path), "--follow", "http://127.0.0.1:1"], "pass exactly one of"),
        (["--checkpoint", str(tmp_path / "nope")], "--checkpoint " + str(tmp_path / "nope") + ": no such folder"),
        (["--checkpoint", str(tmp_path / "runs" / "demo")], "did you mean " + str(tmp_path / "runs/demo/checkpoint")),
        (["--follow", "127.0.0.1:8000"], "--follow must be a URL like http://HOST:PORT"),
        (["--follow-solana", "http://127.0.0.1:8899"], "--follow-solana needs --run-id"),
        (["--follow", "http://127.0.0.1:8000", "--watch"], "--watch watches the --checkpoint folder"),
        (["--checkpoint", str(tmp_path / "runs/demo/checkpoint"), "--engine", "tgi"], "--engine must be auto, transformers or vllm"),
        (["--checkpoint", str(tmp_path / "runs/demo/checkpoint"), "--engine", "vllm"], "--engine vllm"),
    ]
    for args, said in cases:
        res = runner.invoke(app, ["serve", *args])
        assert res.exit_code == 1 and len(res.output.splitlines()) == 1 and said in res.output, (args, res.output)


def test_every_command_says_a_config_problem_the_same_way(tmp_path):
    """One ``error: FILE: field: rule`` line per problem, from every command that reads a config."""
    import pytest

    from psyche.config import ConfigError, load_config

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\n[coordinator]\nwarmup_time = 900\nepoch_time = 600\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert [p.field for p in info.value.problems] == ["coordinator.warmup_time", "coordinator.epoch_time"]
    expected = [f"error: {bad}: {p.field}: {p.message}" for p in info.value.problems]
    assert expected[0] == f"error: {bad}: coordinator.warmup_time: warmup_time must be < epoch_time (900 >= 600)"
    key = tmp_path / "node.key"
    runner = CliRunner()
    for args in (["validate-config", str(bad)],
                 ["train", "--config", str(bad), "--out", str(tmp_path / "run")],
                 ["server", "--config", str(bad), "--db", str(tmp_path / "run.sqlite"), "--key", str(key), "--port", "0"],
                 ["demo", "--config", str(bad), "--out", str(tmp_path / "demo")],
                 ["solana", "create-run", "--config", str(bad), "--rpc", "http://127.0.0.1:9", "--keypair", str(key)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and res.output.splitlines() == expected, (args, res.output)
    # In a process of its own: a client imports transformers in a thread from its start.
    client = subprocess.run([sys.executable, "-m", "psyche.cli", "client", "--solana", "http://127.0.0.1:9", "--run-id", "b",
                             "--config", str(bad), "--key", str(key)], capture_output=True, text=True, timeout=120)
    assert client.returncode == 1 and client.stderr.splitlines() == expected, client.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"], "a refused config creates nothing"
    # psyche doctor reports every check; its config finding carries the same lines.
    res = runner.invoke(app, ["doctor", "--config", str(bad), "--key", str(key)])
    assert res.exit_code == 1
    assert [line for line in res.output.splitlines() if "config:" in line] == [
        f"FAIL  config: {line.removeprefix('error: ')}" for line in expected]


def test_a_node_layout_that_cannot_be_run_is_refused_before_joining(tmp_path):
    """``--nproc-per-node`` and ``--devices``: the option and the rule, before any server is dialled."""
    import torch

    runner = CliRunner()
    base = ["client", "--server", "http://127.0.0.1:9", "--key", str(tmp_path / "c.key")]
    cases = [(["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
             (["--nproc-per-node", "3", "--devices", "cpu,cpu"], "--nproc-per-node 3 does not match the 2 device(s)"),
             (["--devices", "cpu,tpu"], "--devices: 'tpu' is not a device")]
    if not torch.cuda.is_available():
        cases.append((["--devices", "cuda:0,cuda:1"], "--devices cuda:0: CUDA is not available here"))
    for extra, said in cases:
        res = runner.invoke(app, base + extra)
        out = " ".join(res.output.split())
        assert res.exit_code == 1 and said in out, (extra, res.output)
    assert not (tmp_path / "c.key").exists()
