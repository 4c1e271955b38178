"""The sample provider: deterministic sample → tokens, and errors that name file and offset."""

import json

import numpy as np
import pytest
import torch

from psyche.data import (
    DataError,
    DataMissingError,
    SampleIndexError,
    TokenFile,
    TokenWidthError,
    open_provider,
    open_token_folder_split,
    provider_kind,
)


def make_folder(path, tokens_train, tokens_val=None, *, dtype="uint16"):
    """A token folder written by hand, so each test controls the exact bytes."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, toks in (("train", tokens_train), ("val", tokens_val if tokens_val is not None else tokens_train[:50])):
        arr = np.asarray(toks, dtype="<u2" if dtype == "uint16" else "<u4")
        arr.tofile(path / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": int(arr.size)}
    (path / "meta.json").write_text(json.dumps({"format": "psyche-tokens", "dtype": dtype, "vocab_size": 70000,
                                                "splits": splits}))
    return path


def test_samples_are_slots_of_the_file_and_deterministic(tmp_path):
    folder = make_folder(tmp_path / "d", np.arange(1000) % 60000)
    p = open_provider(folder, seq_len=10, shuffle_seed=3)
    assert p.num_samples == 99  # (1000 - 1) // 10
    x = p.batch([0, 1, 2])
    assert x.dtype == torch.long and x.shape == (3, 11)
    for row in x:  # each sample is seq_len+1 consecutive tokens starting on a slot boundary
        assert row[0] % 10 == 0 and torch.equal(row, torch.arange(row[0], row[0] + 11))
    again = open_provider(folder, seq_len=10, shuffle_seed=3)
    assert torch.equal(again.batch(range(99)), p.batch(range(99)))
    other = open_provider(folder, seq_len=10, shuffle_seed=4)
    assert not torch.equal(other.batch(range(99)), p.batch(range(99)))
    # one epoch covers every slot exactly once
    starts = sorted(int(r[0]) for r in p.batch(range(99)))
    assert starts == list(range(0, 990, 10))


def test_repeat_continues_with_new_epochs(tmp_path):
    folder = make_folder(tmp_path / "d", np.arange(101))
    p = open_provider(folder, seq_len=10, shuffle_seed=0, repeat=True)
    e0 = [int(r[0]) for r in p.batch(range(10))]
    e1 = [int(r[0]) for r in p.batch(range(10, 20))]
    assert sorted(e0) == sorted(e1) == list(range(0, 100, 10)) and e0 != e1
    with pytest.raises(SampleIndexError):
        open_provider(folder, seq_len=10, repeat=False).sample(10)


def test_uint32_tokens(tmp_path):
    folder = make_folder(tmp_path / "d", np.arange(100_000, 100_300), dtype="uint32")
    p = open_provider(folder, seq_len=8, split="val")
    assert int(p.batch([0]).min()) >= 100_000


def test_missing_folder_file_and_meta(tmp_path):
    with pytest.raises(DataMissingError, match="meta.json"):
        open_provider(tmp_path / "nowhere", seq_len=8)
    folder = make_folder(tmp_path / "d", np.arange(100))
    (folder / "val.bin").unlink()
    with pytest.raises(DataMissingError, match=r"val\.bin"):
        open_provider(folder, split="val", seq_len=8)
    with pytest.raises(DataMissingError):
        TokenFile(tmp_path / "x.bin")


def test_wrong_token_width(tmp_path):
    bad = tmp_path / "odd.bin"
    bad.write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(TokenWidthError, match=r"odd\.bin.*5 bytes.*byte offset 4"):
        TokenFile(bad, dtype="uint16")
    # meta.json says uint32 but the file was written as uint16: its token count disagrees
    folder = make_folder(tmp_path / "d", np.arange(100))
    meta = json.loads((folder / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenWidthError, match=r"train\.bin.*meta.json records 100"):
        open_provider(folder, seq_len=8)
    # the caller expects another width than meta.json declares
    folder2 = make_folder(tmp_path / "d2", np.arange(100))
    with pytest.raises(TokenWidthError, match="uint16 but uint32 was expected"):
        open_token_folder_split(folder2, "train", expect_dtype="uint32")


def test_out_of_range_reads_name_file_and_byte_offset(tmp_path):
    tf = TokenFile(make_folder(tmp_path / "d", np.arange(100)) / "train.bin")
    with pytest.raises(SampleIndexError, match=r"train\.bin: tokens \[95, 105\) \(bytes 190\.\.210\)"):
        tf.read_tokens(95, 10)
    assert tf.read_tokens(90, 10).tolist() == list(range(90, 100))


def test_tokens_beyond_the_model_vocabulary(tmp_path):
    folder = make_folder(tmp_path / "d", [5] * 50 + [9999] + [5] * 49)
    p = open_provider(folder, seq_len=99, vocab_size=4096)
    with pytest.raises(DataError, match=r"token 9999 at byte offset 100 is >= the model's vocab_size 4096"):
        p.sample(0)


def test_too_short_and_unknown_provider(tmp_path):
    folder = make_folder(tmp_path / "d", np.arange(5))
    with pytest.raises(DataError, match="hold no sample"):
        open_provider(folder, seq_len=8)
    with pytest.raises(DataError, match="'ftp' is not available"):
        open_provider(folder, seq_len=2, provider="ftp")
    assert provider_kind("https://x/y") == "http" and provider_kind("psyche://h:1") == "server"
    assert provider_kind("data/fortunes") == "local"


def test_http_and_server_providers_are_found_by_name():
    # Nothing listens on port 1: the error comes from the HTTP source itself, naming the URL.
    with pytest.raises(DataError, match=r"127\.0\.0\.1:1") as info:
        open_provider("http://127.0.0.1:1/tokens", seq_len=8)
    assert "not available" not in str(info.value)


def test_providers_for_opens_a_config_files_folder_relative_to_that_file(tmp_path, monkeypatch):
    from psyche.config import load_config
    from psyche.data import providers_for

    make_folder(tmp_path / "cfg" / "data" / "mine", np.arange(2000) % 50, np.arange(2000) % 50)
    (tmp_path / "cfg" / "run.toml").write_text('name = "x"\n[data]\nlocation = "data/mine"\n')
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # not where the folder is: it must be found from the file
    data = providers_for(load_config(tmp_path / "cfg" / "run.toml"))
    assert data.train.source.name == str(tmp_path / "cfg" / "data" / "mine" / "train.bin")
