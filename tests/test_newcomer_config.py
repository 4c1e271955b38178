"""A newcomer's config, data and checkpoint mistakes: each told in whole lines, with what to do.

Each test runs the real `psyche` command in a subprocess with its output piped and
checks the lines a user reads, word for word.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psyche.config import load_config, parse_config
from psyche.data import data_problems
from psyche.data.tokenize import DEFAULT_CORPUS_DIR

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = """
[model]
vocab_size = {vocab}
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 2
seq_len = 16
"""


def psyche(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Wide, so each message is compared whole; tests/test_newcomer_cli.py checks that piped
    # output is never cut into short lines at any width.
    env = dict(os.environ, COLUMNS="1000", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "psyche.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def token_folder(path: Path, *, vocab: int, tokens: int = 400) -> Path:
    """A token folder written by hand (no tokenizer training): ``tokens`` ids below ``vocab``."""
    path.mkdir(parents=True)
    splits = {}
    for name in ("train", "val"):
        arr = (np.arange(tokens) % min(vocab, 250)).astype("<u2")
        arr.tofile(path / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": tokens}
    (path / "meta.json").write_text(json.dumps({"format": "psyche-tokens", "dtype": "uint16",
                                                "vocab_size": vocab, "splits": splits}))
    return path


@pytest.fixture
def layout(tmp_path):
    """``tmp/cfg/mine.toml`` naming ``data/mine`` (so ``tmp/cfg/data/mine``), run from ``tmp/work``."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    config = tmp_path / "cfg" / "mine.toml"
    config.write_text('name = "mine"\n[data]\nlocation = "data/mine"\n' + TINY_MODEL.format(vocab=4096)
                      + "[coordinator]\ntotal_steps = 4\nglobal_batch_size_start = 2\nglobal_batch_size_end = 2\n"
                      + '[lr]\nwarmup_steps = 1\n[optimizer]\nkind = "adamw"\nmicro_batch_size = 2\n')
    return tmp_path


def test_validate_config_names_a_missing_data_folder_and_the_command_that_builds_it(layout):
    data = layout / "cfg" / "data" / "mine"
    res = psyche("validate-config", "../cfg/mine.toml", cwd=layout / "work")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [
        f'error: ../cfg/mine.toml: data.location: no folder {data} ("data/mine" in the config, relative to its '
        f"folder); build it with `psyche tokenize --out {data}` (add --corpus FILE_OR_FOLDER for your own text)",
    ]
    assert not data.exists() and sorted(p.name for p in layout.iterdir()) == ["cfg", "work"], "nothing was created"

    # The command it names builds the folder the config means, wherever it is run from.
    corpus = layout / "corpus.txt"
    words = "red green blue cat dog bird runs sleeps eats the a".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n%\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)) + "\n")
    made = psyche("tokenize", "--out", data, "--corpus", corpus, "--vocab-size", 300, cwd=layout / "work")
    assert made.returncode == 0, made.stderr
    res = psyche("validate-config", "../cfg/mine.toml", cwd=layout / "work")
    assert res.returncode == 0, res.stderr
    digest = load_config(layout / "cfg" / "mine.toml").digest()[:12]
    assert res.stdout.splitlines() == [
        f"OK  ../cfg/mine.toml  (run mine, digest {digest}; data {data}: a token folder that fits the model)"]


def test_validate_config_refuses_data_with_a_larger_vocabulary_than_the_model(layout):
    data = token_folder(layout / "cfg" / "data" / "mine", vocab=8000)
    res = psyche("validate-config", layout / "cfg" / "mine.toml", cwd=layout / "work")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"error: {layout / 'cfg' / 'mine.toml'}: model.vocab_size: the token folder {data} has a vocabulary of 8000 (its meta.json) but "
        f"model.vocab_size is 4096; set model.vocab_size = 8000 or more, or rebuild the data with "
        f"`psyche tokenize --vocab-size 4096 --out {data}` (with the --corpus it was built from)",
    ]


def test_validate_config_says_a_remote_location_is_not_checked(tmp_path):
    (tmp_path / "r.toml").write_text('name = "r"\n[data]\nlocation = "psyche://127.0.0.1:9"\n')
    res = psyche("validate-config", "r.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    digest = load_config(tmp_path / "r.toml").digest()[:12]
    assert res.stdout.splitlines() == [
        f"OK  r.toml  (run r, digest {digest}; data psyche://127.0.0.1:9: remote, not checked here: "
        "each client checks it when it opens it)"]


def test_train_opens_data_relative_to_the_config_file(layout):
    data = layout / "cfg" / "data" / "mine"
    res = psyche("train", "--config", "../cfg/mine.toml", "--out", layout / "run", cwd=layout / "work")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f'error: ../cfg/mine.toml: data.location: no folder {data} ("data/mine" in the config, relative to its '
        f"folder); build it with `psyche tokenize --out {data}` (add --corpus FILE_OR_FOLDER for your own text)"]
    assert not (layout / "run").exists(), "a refused train creates no output folder"
    token_folder(data, vocab=300)
    res = psyche("train", "--config", "../cfg/mine.toml", "--out", layout / "run", "--steps", 2, cwd=layout / "work")
    assert res.returncode == 0, res.stderr
    assert (layout / "run" / "checkpoint" / "config.json").is_file()


def test_a_config_files_folder_changes_where_data_is_opened_but_not_its_digest(tmp_path):
    text = 'name = "same"\n[data]\nlocation = "data/x"\n'
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "run.toml").write_text(text)
    a, b = load_config(tmp_path / "a" / "run.toml"), load_config(tmp_path / "b" / "c" / "run.toml")
    assert a.digest() == b.digest()
    assert a.data.location == b.data.location == "data/x"  # what peers compare stays as written
    assert (a.data_location(), b.data_location()) == (str(tmp_path / "a" / "data/x"), str(tmp_path / "b/c/data/x"))
    # A config from a server has no file: relative to the current folder, as before.
    served = parse_config(a.model_dump(mode="json"))
    assert served.digest() == a.digest() and served.data_location() == "data/x"
    # The default location, unset in a file, is the current folder's data/fortunes.
    (tmp_path / "d.toml").write_text('name = "d"\n')
    assert load_config(tmp_path / "d.toml").data_location() == "data/fortunes"
    problems = data_problems(a)
    assert [p.field for p in problems] == ["data.location"] and str(tmp_path / "a" / "data/x") in problems[0].message


@pytest.mark.parametrize("toml, line", [
    ('name = "t"\n[coordinator]\ntotal_step = 10\n', "coordinator.total_step: unknown field; did you mean `total_steps`?"),
    ('name = "t"\n[cordinator]\ntotal_steps = 10\n', "cordinator: unknown section; did you mean [coordinator]?"),
    ('name = "t"\n[model]\nlayers = 2\n', "model.layers: unknown field; the known fields of [model] are: architecture, "
     "checkpoint, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
     "num_key_value_heads, rope_theta, tie_word_embeddings, seq_len, init_seed"),
])
def test_a_misspelt_field_gets_the_name_it_was_meant_to_be(tmp_path, toml, line):
    (tmp_path / "t.toml").write_text(toml)
    # Every command that reads a config says its problems the same way.
    for command in (["validate-config", "t.toml"], ["train", "--config", "t.toml"]):
        res = psyche(*command, cwd=tmp_path)
        assert res.returncode == 1 and res.stderr.splitlines() == [f"error: t.toml: {line}"], command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"], "a refused train creates nothing"


def test_generate_says_a_checkpoint_is_missing_or_where_it_is(tmp_path):
    for sub in ("runs/demo/checkpoint", "runs/two/a", "runs/two/b"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "config.json").write_text("{}")
    (tmp_path / "runs/demo/logs").mkdir()
    cases = {
        "doesnotexist": "error: --checkpoint doesnotexist: no such folder (pass the checkpoint folder psyche train "
                        "or demo wrote, e.g. runs/<run name>/checkpoint)",
        "runs/demo": "error: --checkpoint runs/demo: not a checkpoint folder (no config.json); "
                     "did you mean runs/demo/checkpoint?",
        "runs/two": "error: --checkpoint runs/two: not a checkpoint folder (no config.json); it holds 2 checkpoints: "
                    "pass one of runs/two/a, runs/two/b",
        "runs/demo/logs": "error: --checkpoint runs/demo/logs: not a checkpoint folder (no config.json)",
    }
    for arg, line in cases.items():
        res = psyche("generate", "--checkpoint", arg, cwd=tmp_path)
        assert res.returncode == 1 and res.stderr.splitlines() == [line], (arg, res.stderr)


def test_tokenize_help_says_what_it_reads_and_how_it_splits_and_does_so(tmp_path):
    res = psyche("tokenize", "--help", cwd=tmp_path)
    text = " ".join(res.stdout.split())
    for said in (f"Without --corpus: every fortune file in {DEFAULT_CORPUS_DIR}",
                 "the regular files directly in it (not its subfolders), in name order, skipping symlinks and *.dat files",
                 "a file with a line that is exactly % (the fortune format) is cut at those lines; "
                 "any other file at blank lines (paragraphs)",
                 "Each document is followed by the <|endoftext|> token"):
        assert said in text, said
    # What it says is what it does: a subfolder, a symlink and a .dat file are not read; a file
    # of % lines is cut there and one without at blank lines, whatever the file's name.
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "hidden.txt").write_text("never read\n\nnever read either\n")
    (corpus / "b-cookies").write_text("one\n%\ntwo\nlines\n%\nthree\n")
    (corpus / "b-cookies.dat").write_bytes(b"\x00\x01index")
    (corpus / "a-paragraphs.md").write_text("first para\nstill first\n\nsecond\n\n\nthird\n")
    (corpus / "link").symlink_to(corpus / "b-cookies")
    res = psyche("tokenize", "--corpus", corpus, "--out", tmp_path / "tok", "--vocab-size", 260, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert [(Path(s["path"]).name, s["documents"]) for s in meta["sources"]] == [("a-paragraphs.md", 3), ("b-cookies", 3)]


def test_tiny_fortunes_says_its_real_parameter_count():
    from psyche.train import build_model

    cfg = load_config(ROOT / "config" / "tiny-fortunes.toml")
    said = re.search(r"([\d.]+)M-parameter", cfg.description)
    assert said, cfg.description
    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert float(said.group(1)) == round(n / 1e6, 2)
