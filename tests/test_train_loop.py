"""The single-machine training loop: real training on fortunes, metrics, exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from psyche.config import parse_config
from psyche.data import ensure_default_dataset, tokenize_corpus
from psyche.train import load_checkpoint, train

FORTUNES = Path("/usr/share/games/fortunes")


def tiny_config(*, vocab_size: int, steps: int, kind: str = "adamw", batch: int = 8, seq_len: int = 64,
                peak_lr: float = 3e-3):
    return parse_config({
        "name": "tiny-test",
        "coordinator": {"total_steps": steps, "global_batch_size_start": batch, "global_batch_size_end": batch},
        "model": {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "seq_len": seq_len},
        "lr": {"kind": "cosine", "peak_lr": peak_lr, "warmup_steps": 2, "final_lr": peak_lr / 10},
        "optimizer": {"kind": kind, "micro_batch_size": 4, "grad_clip": 1.0},
    })


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def fortunes():
    if not FORTUNES.is_dir():
        pytest.skip("Debian package fortunes is not installed")
    return ensure_default_dataset()


@pytest.mark.parametrize("kind", ["adamw", "distro"])
def test_training_on_fortunes_lowers_the_loss(tmp_path, fortunes, kind):
    cfg = tiny_config(vocab_size=4096, steps=20, kind=kind)
    r = train(cfg, out_dir=tmp_path, optimizer=kind, data_location=fortunes, eval_every=10, progress=False)
    assert r.steps == 20 and r.skipped_steps == 0 and r.tokens == 20 * 8 * 64
    # an untrained model is near ln(4096) = 8.32; 20 small steps of real text must beat it clearly
    assert r.initial_val_loss == pytest.approx(np.log(4096), abs=0.15)
    assert r.final_val_loss < r.initial_val_loss - (1.0 if kind == "adamw" else 0.5)
    assert r.last_loss < r.first_loss - 0.5
    rows = read_metrics(r.metrics_path)
    assert [m["step"] for m in rows] == list(range(1, 21))  # step k: the k-th update
    assert all({"step", "loss", "lr", "tokens_per_sec", "grad_norm"} <= m.keys() for m in rows)
    assert [m["step"] for m in rows if "val_loss" in m] == [10, 20]
    assert rows[-1]["val_loss"] == r.final_val_loss
    ck = load_checkpoint(r.checkpoint)
    assert ck.step == 20 and ck.state["optimizer_kind"] == kind and ck.state["config_digest"] == cfg.digest()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(rng.choice(words, int(rng.integers(5, 30)))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n%\n".join(docs))
    tokenize_corpus(corpus=[root / "corpus.txt"], vocab_size=280, out_dir=root / "tok", progress=False)
    return root / "tok"


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, small_data):
    cfg = tiny_config(vocab_size=280, steps=6, seq_len=16, batch=4)
    whole = train(cfg, out_dir=tmp_path / "a", data_location=small_data, progress=False)
    part = train(cfg, out_dir=tmp_path / "b", data_location=small_data, stop_at=3, progress=False)
    assert part.steps == 3 and load_checkpoint(part.checkpoint).step == 3
    rest = train(cfg, out_dir=tmp_path / "b", data_location=small_data, resume=part.checkpoint, progress=False)
    assert rest.steps == 6
    a, b = load_checkpoint(whole.checkpoint).model, load_checkpoint(rest.checkpoint).model
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), name
    la, lb = read_metrics(whole.metrics_path), read_metrics(rest.metrics_path)
    assert [m["step"] for m in lb] == list(range(1, 7))
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]


def test_data_with_a_larger_vocabulary_than_the_model_is_refused(tmp_path, small_data):
    from psyche.data import DataError

    cfg = tiny_config(vocab_size=100, steps=4, seq_len=16, batch=2)
    with pytest.raises(DataError, match=r"vocabulary \(280\) exceeds model.vocab_size \(100\)"):
        train(cfg, out_dir=tmp_path, data_location=small_data, progress=False)
