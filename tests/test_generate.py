"""Streaming generation from a checkpoint folder."""

import pytest
import torch

from psyche.config import ModelConfig
from psyche.data.tokenize import EOT, train_bpe
from psyche.generate import GenerateError, Generator, generate
from psyche.train import build_model, compute_gradients, save_checkpoint

TEXT = ["the cat sat on the mat and looked at the dog", "a dog ran in the park with a red ball"] * 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = train_bpe(TEXT, vocab_size=290)
    tok.save(str(root / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=290, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, seq_len=64)
    model = build_model(cfg)
    # A few steps on the text so the model emits words and spaces, not random bytes.
    ids = [i for t in TEXT for i in tok.encode(t).ids + [tok.token_to_id(EOT)]]
    batch = torch.tensor([ids[k : k + 33] for k in range(0, 32 * 16, 32)])  # (16, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        compute_gradients(model, batch, micro_batch_size=16, grad_clip=1.0)
        opt.step()
    return save_checkpoint(model, root / "ckpt", tokenizer_path=root / "tokenizer.json", extra={})


def test_stream_is_seeded_and_incremental(checkpoint):
    gen = Generator.from_checkpoint(checkpoint)
    a = list(gen.stream("the cat", max_new_tokens=40, seed=1, temperature=1.5))
    b = list(gen.stream("the cat", max_new_tokens=40, seed=1, temperature=1.5))
    c = list(gen.stream("the cat", max_new_tokens=40, seed=2, temperature=1.5))
    assert a == b and "".join(a) != "".join(c)
    assert len(a) > 1 and " " in "".join(a)  # text arrives in pieces while generating
    assert "".join(generate(checkpoint, "the cat", max_new_tokens=40, seed=1, temperature=1.5)) == "".join(a)


def test_greedy_and_limits(checkpoint):
    gen = Generator.from_checkpoint(checkpoint)
    assert list(gen.stream("a dog", max_new_tokens=0)) == []
    g1 = "".join(gen.stream("a dog", max_new_tokens=10, temperature=0, seed=1))
    g2 = "".join(gen.stream("a dog", max_new_tokens=10, temperature=0, seed=2))
    assert g1 == g2  # greedy ignores the seed
    with pytest.raises(GenerateError, match="temperature"):
        list(gen.stream("x", temperature=-1))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(GenerateError, match="no config.json"):
        Generator.from_checkpoint(tmp_path)
