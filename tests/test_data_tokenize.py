"""`psyche tokenize`: corpus → token folder (train.bin, val.bin, tokenizer.json, meta.json)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from psyche.data import EOT, DataError, DataMissingError, ensure_default_dataset, read_meta, tokenize_corpus
from tests.concurrently import run_at_once

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jolly boxer and my grandmother knits warm socks for winter evenings").split()


def write_corpus(folder: Path, *, docs: int = 120, seed: int = 0) -> Path:
    """A few KB of fortune-format text: documents separated by lines holding '%'."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(docs):
        n = int(rng.integers(5, 25))
        texts.append(f"Fortune {i}: " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)) + ".")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a").write_text("\n%\n".join(texts[: docs // 2]) + "\n%\n")
    (folder / "b").write_text("\n%\n".join(texts[docs // 2 :]) + "\n")
    (folder / "a.dat").write_bytes(b"\x00\x01index")  # fortune index files are skipped
    (folder / "a.u8").symlink_to(folder / "a")  # and symlinks too
    return folder


def test_token_folder_contents(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    meta = tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=tmp_path / "tok", val_fraction=0.1, progress=False)
    out = tmp_path / "tok"
    assert json.loads((out / "meta.json").read_text()) == meta == read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a", "b"]
    assert sum(s["documents"] for s in meta["sources"]) == 120
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    assert meta["eot_token_id"] == eot
    for split in ("train", "val"):
        info = meta["splits"][split]
        raw = (out / info["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == info["sha256"]
        ids = np.frombuffer(raw, dtype="<u2")
        assert ids.size == info["tokens"] and ids.max() < meta["vocab_size"]
        # every document ends with the end-of-text token
        assert ids[-1] == eot and int((ids == eot).sum()) == info["documents"]
    assert meta["splits"]["val"]["documents"] >= 1
    # the held-out documents are whole documents: decode val and find them in the corpus
    val = np.frombuffer((out / "val.bin").read_bytes(), dtype="<u2").tolist()
    docs = tok.decode(val, skip_special_tokens=False).split(EOT)[:-1]
    corpus_text = (corpus / "a").read_text() + (corpus / "b").read_text()
    assert docs and all(d in corpus_text and d.startswith("Fortune") for d in docs)


def test_tokenizing_is_deterministic(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    m1 = tokenize_corpus(corpus=[corpus], vocab_size=320, out_dir=tmp_path / "t1", progress=False)
    m2 = tokenize_corpus(corpus=[corpus], vocab_size=320, out_dir=tmp_path / "t2", progress=False)
    assert m1["splits"] == m2["splits"] and m1["tokenizer"] == m2["tokenizer"]


def test_given_tokenizer_is_reused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=tmp_path / "t1", progress=False)
    meta = tokenize_corpus(corpus=[corpus / "b"], tokenizer=tmp_path / "t1" / "tokenizer.json",
                           out_dir=tmp_path / "t2", progress=False)
    assert meta["tokenizer"]["trained"] is False
    assert (tmp_path / "t2" / "tokenizer.json").read_bytes() == (tmp_path / "t1" / "tokenizer.json").read_bytes()


def test_missing_corpus_and_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(DataMissingError, match="nope"):
        tokenize_corpus(corpus=[tmp_path / "nope"], out_dir=tmp_path / "o", progress=False)
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(DataMissingError, match="tok.json"):
        tokenize_corpus(corpus=[corpus], tokenizer=tmp_path / "tok.json", out_dir=tmp_path / "o", progress=False)
    (tmp_path / "one").write_text("only one document\n")
    with pytest.raises(DataError, match="at least 2"):
        tokenize_corpus(corpus=[tmp_path / "one"], out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_default_corpus_missing_says_what_to_install(tmp_path, monkeypatch):
    import psyche.data.tokenize as tk

    monkeypatch.setattr(tk, "DEFAULT_CORPUS_DIR", tmp_path / "games" / "fortunes")
    with pytest.raises(DataMissingError, match="install the Debian package fortunes, or pass --corpus"):
        tk.ensure_default_dataset(tmp_path / "out")


def test_ensure_dataset_concurrent_builders_agree(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "data" / "fortunes"
    results = run_at_once(lambda: ensure_default_dataset(out, corpus=[corpus]), 4)
    assert results == [out] * 4, results
    assert read_meta(out)["splits"]["train"]["tokens"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["fortunes"]  # no temp folders left
    # a second call reuses the folder as is
    before = (out / "meta.json").stat().st_mtime_ns
    assert ensure_default_dataset(out, corpus=[corpus]) == out
    assert (out / "meta.json").stat().st_mtime_ns == before


def test_ensure_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("hi")
    with pytest.raises(DataError, match="no meta.json"):
        ensure_default_dataset(tmp_path / "x")


def test_fortunes_default_dataset():
    """The real default corpus (Debian fortunes), built once in data/fortunes."""
    if not Path("/usr/share/games/fortunes").is_dir():
        pytest.skip("Debian package fortunes is not installed")
    out = ensure_default_dataset()
    meta = read_meta(out)
    assert meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] > 500_000 and meta["splits"]["val"]["tokens"] > 10_000
    assert len(meta["sources"]) > 20


def test_tokenize_never_replaces_a_foreign_folder(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a token folder"):
        tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=tmp_path / "precious", progress=False)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"
    # an existing token folder is replaced
    tokenize_corpus(corpus=[corpus], vocab_size=300, out_dir=tmp_path / "tok", progress=False)
    meta = tokenize_corpus(corpus=[corpus / "a"], vocab_size=300, out_dir=tmp_path / "tok", progress=False)
    assert read_meta(tmp_path / "tok") == meta and len(meta["sources"]) == 1
