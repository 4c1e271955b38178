"""`psyche tokenize`, `psyche train` and `psyche generate` end to end through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from psyche.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    words = "red green blue cat dog bird runs sleeps eats quickly slowly happily the a".split()
    docs = [" ".join(rng.choice(words, int(rng.integers(4, 20)))).capitalize() + "." for _ in range(400)]
    (root / "corpus").mkdir()
    (root / "corpus" / "text").write_text("\n%\n".join(docs) + "\n")
    return root


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_tokenize_train_generate(workdir):
    tok = workdir / "tok"
    code, out = run("tokenize", "--corpus", workdir / "corpus", "--vocab-size", 300, "--out", tok)
    assert code == 0, out
    assert "train +" in out and (tok / "train.bin").is_file()
    meta = json.loads((tok / "meta.json").read_text())

    (workdir / "run.toml").write_text(f"""
name = "cli-test"
[coordinator]
total_steps = 8
global_batch_size_start = 4
global_batch_size_end = 4
[model]
vocab_size = {meta["vocab_size"]}
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 2
seq_len = 16
[data]
location = "{tok}"
[lr]
warmup_steps = 2
peak_lr = 3e-3
[optimizer]
kind = "adamw"
micro_batch_size = 2
""")
    code, out = run("train", "--config", workdir / "run.toml", "--out", workdir / "run", "--steps", 6)
    assert code == 0, out
    ckpt = workdir / "run" / "checkpoint"
    assert f"checkpoint: {ckpt}" in out.replace("\n", " ") or str(ckpt) in out
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))

    code, out1 = run("generate", "--checkpoint", ckpt, "--prompt", "Red", "--max-new-tokens", 12, "--seed", 3)
    assert code == 0, out1
    assert out1.startswith("Red") and len(out1.strip()) > 3
    code, out2 = run("generate", "--checkpoint", ckpt, "--prompt", "Red", "--max-new-tokens", 12, "--seed", 3)
    assert out2 == out1  # the same seed gives the same text
    code, greedy = run("generate", "--checkpoint", ckpt, "--prompt", "", "--temperature", 0, "--max-new-tokens", 5)
    assert code == 0, greedy


def test_user_errors_are_one_line_without_traceback(workdir, tmp_path):
    code, out = run("tokenize", "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert code == 1 and "missing.txt" in out and "Traceback" not in out
    (tmp_path / "run.toml").write_text(f'name = "x"\n[data]\nlocation = "{tmp_path / "nodata"}"\n')
    code, out = run("train", "--config", tmp_path / "run.toml", "--out", tmp_path / "r")
    assert code == 1 and "nodata" in out and "psyche tokenize" in out and "Traceback" not in out
    code, out = run("train", "--config", tmp_path / "run.toml", "--optimizer", "sgd")
    assert code == 1 and "--optimizer" in out
    code, out = run("generate", "--checkpoint", tmp_path, "--prompt", "x")
    assert code == 1 and "no config.json" in out
