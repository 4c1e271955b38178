"""Model building and the gradient half of a training step."""

import hashlib
import subprocess
import sys

import pytest
import torch

from psyche.config import ModelConfig
from psyche.data import open_provider
from psyche.train import build_model, compute_gradients, count_parameters, evaluate

TINY = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, seq_len=16, init_seed=7)


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_bit_identical_weights_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model(TINY), build_model(TINY)
    assert torch.equal(torch.get_rng_state(), before)
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(build_model(TINY, seed=8)) != weights_digest(a)
    assert a.config.num_key_value_heads == 2 and a.config.eos_token_id == 0
    assert 0 < count_parameters(a) < 100_000


def test_init_is_identical_in_another_process():
    code = (
        "import hashlib, torch; from psyche.config import ModelConfig; from psyche.train import build_model\n"
        f"m = build_model(ModelConfig(**{TINY.model_dump()!r}))\n"
        "h = hashlib.sha256()\n"
        "for n, t in sorted(m.state_dict().items()): h.update(n.encode()); h.update(t.detach().contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == weights_digest(build_model(TINY))


@pytest.mark.parametrize("delay", [0.05, 0.2])
def test_building_a_model_while_the_client_imports_the_model_code_in_the_background(delay):
    """A client imports Transformers' model code in a thread at start; building the model
    meanwhile must wait for it, not fail with "cannot import name 'LlamaForCausalLM'"
    (Transformers' lazy imports race between threads; seen in test_e2e_network)."""
    code = (
        "import threading, time\n"
        "from psyche.config import ModelConfig\n"
        "from psyche.train.model import build_model, import_model_code\n"
        "threading.Thread(target=import_model_code, daemon=True).start()\n"
        f"time.sleep({delay})\n"
        f"build_model(ModelConfig(**{TINY.model_dump()!r}))\n"
        "print('built')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "built", out.stderr[-2000:]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batching_gives_the_full_batch_gradient():
    model = build_model(TINY)
    batch = torch.randint(0, TINY.vocab_size, (8, TINY.seq_len + 1), generator=torch.Generator().manual_seed(0))
    full = compute_gradients(model, batch, micro_batch_size=8, grad_clip=0.0)
    g_full = grads(model)
    for mb in (1, 3, 5):
        stats = compute_gradients(model, batch, micro_batch_size=mb, grad_clip=0.0)
        assert stats.tokens == full.tokens == 8 * TINY.seq_len
        assert stats.loss == pytest.approx(full.loss, rel=1e-5)
        assert stats.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
        for name, g in grads(model).items():
            torch.testing.assert_close(g, g_full[name], rtol=1e-4, atol=1e-6, msg=name)
    # an untrained model predicts roughly uniformly: loss near ln(vocab)
    assert full.loss == pytest.approx(torch.log(torch.tensor(300.0)).item(), abs=0.3)


def test_clipping_caps_the_global_norm():
    model = build_model(TINY)
    batch = torch.randint(0, TINY.vocab_size, (4, TINY.seq_len + 1), generator=torch.Generator().manual_seed(1))
    stats = compute_gradients(model, batch, micro_batch_size=4, grad_clip=0.01)
    assert stats.grad_norm > 0.01  # reported before clipping
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert after.item() == pytest.approx(0.01, rel=1e-3)


def test_non_finite_step_is_flagged():
    model = build_model(TINY)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    batch = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len + 1))
    stats = compute_gradients(model, batch, micro_batch_size=2, grad_clip=1.0)
    assert not stats.finite


def test_bad_batch_shape_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        compute_gradients(build_model(TINY), torch.zeros(4, dtype=torch.long), micro_batch_size=2, grad_clip=1.0)


def test_evaluate_is_deterministic_and_keeps_mode(tmp_path):
    import numpy as np

    (tmp_path / "val.bin").write_bytes(np.arange(2000, dtype="<u2").__mod__(300).astype("<u2").tobytes())
    (tmp_path / "train.bin").write_bytes((tmp_path / "val.bin").read_bytes())
    (tmp_path / "meta.json").write_text('{"format": "psyche-tokens", "dtype": "uint16", "splits": '
                                        '{"train": {"file": "train.bin"}, "val": {"file": "val.bin"}}}')
    val = open_provider(tmp_path, split="val", seq_len=TINY.seq_len)
    model = build_model(TINY)
    model.train()
    a = evaluate(model, val, batches=3, batch_size=4)
    b = evaluate(model, val, batches=3, batch_size=4)
    assert a == b and model.training
    assert a == pytest.approx(torch.log(torch.tensor(300.0)).item(), abs=0.3)
