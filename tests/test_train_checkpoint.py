"""Checkpoints load in Transformers offline and resume exactly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from psyche.config import ModelConfig
from psyche.data.tokenize import EOT, train_bpe
from psyche.train import CheckpointError, build_model, load_checkpoint, save_checkpoint

TINY = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, seq_len=32)
TEXT = ["A fortune cookie says: you will write many tests today.", "The sky is blue and the grass is green.",
        "Never trust a computer you cannot throw out of a window."] * 20


@pytest.fixture
def tokenizer_file(tmp_path):
    tok = train_bpe(TEXT, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_round_trip_loads_in_transformers_and_generates(tmp_path, tokenizer_file):
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    extra = {"step": 17, "optimizer": opt.state_dict(), "config_digest": "abc"}
    out = save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tokenizer_file, extra=extra)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "psyche_state.json").read_text()) == {"step": 17, "config_digest": "abc"}

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == EOT and tok.eos_token_id == hf.config.eos_token_id == 0
    for (n, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(hf.state_dict().items())):
        assert torch.equal(a, b), n
    ids = tok("The sky", return_tensors="pt")
    gen = hf.generate(**ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    assert isinstance(tok.decode(gen[0]), str)

    ck = load_checkpoint(out)
    assert ck.step == 17 and ck.tokenizer_path == out / "tokenizer.json"
    opt2 = torch.optim.AdamW(ck.model.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.state["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_save_replaces_an_older_checkpoint(tmp_path, tokenizer_file):
    save_checkpoint(build_model(TINY, seed=1), tmp_path / "c", tokenizer_path=tokenizer_file, extra={"step": 1})
    save_checkpoint(build_model(TINY, seed=2), tmp_path / "c", tokenizer_path=tokenizer_file, extra={"step": 2})
    ck = load_checkpoint(tmp_path / "c")
    assert ck.step == 2
    assert torch.equal(ck.model.lm_head.weight, build_model(TINY, seed=2).lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "tokenizer.json"]


def test_build_model_from_checkpoint(tmp_path, tokenizer_file):
    save_checkpoint(build_model(TINY, seed=3), tmp_path / "c", tokenizer_path=tokenizer_file, extra={})
    m = build_model(TINY.model_copy(update={"checkpoint": str(tmp_path / "c")}))
    assert torch.equal(m.lm_head.weight, build_model(TINY, seed=3).lm_head.weight)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_save_never_replaces_a_foreign_folder(tmp_path, tokenizer_file):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        save_checkpoint(build_model(TINY), tmp_path / "notes", tokenizer_path=tokenizer_file, extra={})
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
