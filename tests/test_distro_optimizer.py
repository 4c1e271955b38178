"""DisTrO optimizer: error feedback, sign step, determinism, checkpoints, payloads."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psyche.distro import DCTCodec, DisTrO, Overlap, ResultLayout, SparseResult, decode_payload, encode_payload
from psyche.distro.payload import layout_tag
from psyche.distro.optimizer import (
    momentum_warmup_factor,
    orthogonalize,
    param_groups,
    param_kind,
    row_normalize,
    warmup_decay,
)

# Tiny tensors: intra-op threads only add barrier waits on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_error_feedback_keeps_everything_not_sent():
    """With β = 1, what was sent plus what is left equals the sum of lr·g exactly (float tolerance)."""
    model = make_model()
    opt = DisTrO(model.parameters(), lr=0.1, compression_decay=1.0, chunk=16, topk=3, one_bit=False)
    codec = DCTCodec(16)
    sent = [torch.zeros_like(p) for p in model.parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(5):
        set_grads(model, step)
        for t, p in zip(total, model.parameters()):
            t += 0.1 * p.grad
        for s, r, p in zip(sent, opt.generate(), model.parameters()):
            s += codec.decode([r], p.shape)
    for s, t, p in zip(sent, total, model.parameters()):
        torch.testing.assert_close(s + opt.state[p]["delta"], t, atol=1e-5, rtol=1e-5)


def test_one_bit_subtracts_exact_values_not_signs():
    model = make_model()
    full = DisTrO(model.parameters(), lr=1.0, compression_decay=0.9, chunk=8, topk=2, one_bit=False)
    model_b = copy.deepcopy(model)
    one = DisTrO(model_b.parameters(), lr=1.0, compression_decay=0.9, chunk=8, topk=2, one_bit=True)
    set_grads(model, 3)
    set_grads(model_b, 3)
    ra, rb = full.generate(), one.generate()
    for pa, pb, a, b in zip(model.parameters(), model_b.parameters(), ra, rb):
        assert torch.equal(full.state[pa]["delta"], one.state[pb]["delta"])
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(b.values, torch.where(a.values < 0, -1.0, 1.0))


def test_apply_moves_every_weight_by_lr_sign():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = DisTrO(model.parameters(), lr=0.01, chunk=8, topk=2, matrix_update="sign")
    set_grads(model, 0)
    opt.apply([opt.generate()])
    for b, p in zip(before, model.parameters()):
        step = (p.detach() - b).abs()
        assert torch.all((step - 0.01).abs() < 1e-6) or torch.all(step <= 0.01 + 1e-6)
        assert step.max() > 0.0099


def test_weight_decay_is_decoupled_and_scaled_by_lr():
    p = torch.nn.Parameter(torch.full((4, 4), 2.0))
    opt = DisTrO([p], lr=0.1, weight_decay=0.5, chunk=4, topk=16, one_bit=False, matrix_update="sign")
    p.grad = torch.zeros(4, 4)
    p.grad[0, 0] = 1.0
    before = p.detach().clone()
    opt.apply([opt.generate()])
    # The update is lr·sign(delta) on top of θ·(1 − lr·wd): exactly one coordinate has a non-zero sign.
    decayed = before * (1 - 0.1 * 0.5)
    moved = (decayed - p.detach()).abs()
    assert (moved <= 0.1 + 1e-6).all() and torch.isclose(moved, torch.tensor(0.1)).any()


def test_lr_scale_sets_each_groups_step_size():
    """A group's sign step is lr·lr_scale; a scale of 1 is the plain optimizer, bit for bit."""
    model, plain_model = make_model(), make_model()
    w1, b1, w2, b2 = model.parameters()
    opt = DisTrO([{"params": [w1, w2], "lr_scale": 2.5}, {"params": [b1, b2], "lr_scale": 1.0}],
                 lr=0.01, chunk=8, topk=2, matrix_update="sign")
    plain = DisTrO(plain_model.parameters(), lr=0.01, chunk=8, topk=2, matrix_update="sign")
    before = [p.detach().clone() for p in model.parameters()]
    set_grads(model, 0)
    set_grads(plain_model, 0)
    opt.apply([opt.generate()])
    plain.apply([plain.generate()])
    for b, p, q, scale in zip(before, model.parameters(), plain_model.parameters(), (2.5, 1.0, 2.5, 1.0)):
        step = (p.detach() - b).abs()
        assert step.max() == pytest.approx(0.01 * scale, rel=1e-4)
        assert (step <= 0.01 * scale * (1 + 1e-4)).all()
        if scale == 1.0:
            assert torch.equal(p, q)


def test_param_groups_split_embeddings_matrices_vectors():
    emb = torch.nn.Parameter(torch.zeros(10, 4))
    w = torch.nn.Parameter(torch.zeros(4, 4))
    norm = torch.nn.Parameter(torch.ones(4))
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    named = [("model.embed_tokens.weight", emb), ("layers.0.q.weight", w), ("norm.weight", norm),
             ("frozen", frozen), ("lm_head.weight", emb)]  # tied head: the same tensor again
    groups = param_groups(named, embedding_lr_scale=2.0, matrix_lr_scale=0.5)
    assert [(g["kind"], g["lr_scale"], len(g["params"])) for g in groups] == [
        ("embedding", 2.0, 1), ("matrix", 0.5, 1), ("vector", 1.0, 1)]
    assert groups[0]["params"][0] is emb and groups[2]["params"][0] is norm
    assert param_kind("lm_head.weight", w) == "embedding" and param_kind("x.bias", norm) == "vector"
    with pytest.raises(ValueError, match="lr_scale"):
        DisTrO([{"params": [w], "lr_scale": -1.0}], lr=0.1)


@given(decay=st.floats(0.0, 1.0), f=st.floats(0.0, 1.0))
def test_warmup_decay_rises_to_the_configured_decay(decay, f):
    d = warmup_decay(decay, f)
    assert 0.9 * decay - 1e-12 <= d <= decay + 1e-12
    assert warmup_decay(decay, 1.0) == decay
    assert warmup_decay(decay, min(1.0, f + 0.1)) >= d - 1e-12


def test_generate_during_warmup_forgets_faster():
    """During warmup the momentum keeps less of the past: δ = β·(0.9 + 0.1·f^0.1)·δ + lr·g."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = DisTrO([p], lr=1.0, compression_decay=1.0, chunk=8, topk=8, one_bit=False, warmup_steps=4)
    p.grad = torch.ones(8)
    opt.generate()  # topk = the whole tile: everything is sent, δ = 0 again
    p.grad = torch.zeros(8)
    for steps_done, kept in [(0, 0.9), (4, 1.0), (1, 0.9 + 0.1 * 0.25 ** 0.1)]:
        opt.state[p]["delta"].fill_(1.0)
        sent = opt.generate(steps_done=steps_done)
        torch.testing.assert_close(DCTCodec(8).decode(sent, (8,)), torch.full((8,), kept))
    with pytest.raises(ValueError, match="steps_done"):
        opt.generate(steps_done=-1)


def test_momentum_warmup_curve():
    """The one momentum-warmup rule, pinned: step k (from 1) generates after k - 1 steps, so the
    factor is (k-1)/w, 0 at step 1 and 1 from step w+1, the first step at the peak LR."""
    assert [momentum_warmup_factor(k - 1, 4) for k in range(1, 8)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [momentum_warmup_factor(k - 1, 0) for k in range(1, 3)] == [1.0, 1.0]  # no warmup: β throughout
    from psyche.config import LRScheduleConfig
    from psyche.train.schedule import lr_at

    lr_cfg = LRScheduleConfig(kind="constant", peak_lr=1.0, warmup_steps=4)
    first_at_peak = next(k for k in range(1, 10) if lr_at(k - 1, lr_cfg, 10) == lr_cfg.peak_lr)
    first_at_beta = next(k for k in range(1, 10) if momentum_warmup_factor(k - 1, lr_cfg.warmup_steps) == 1.0)
    assert first_at_peak == first_at_beta == 5, "the momentum warmup ends where the LR warmup does"


def test_overlap_applies_previous_step():
    ov = Overlap()
    assert ov.exchange(["a"]) is None
    assert ov.exchange(["b"]) == ["a"]
    assert ov.flush() == ["b"] and ov.flush() is None


@settings(max_examples=15, deadline=None)
@given(peers=st.integers(1, 4), one_bit=st.booleans(), topk=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_two_optimizers_with_same_state_end_bit_identical(peers, one_bit, topk, seed):
    """Peers applying the same results (from bytes) from the same state hold identical weights."""
    base = make_model(seed)
    nodes = [copy.deepcopy(base) for _ in range(peers)]
    opts = [DisTrO(m.parameters(), lr=0.02, chunk=16, topk=topk, one_bit=one_bit, weight_decay=0.1) for m in nodes]
    for step in range(3):
        blobs = []
        for i, (m, o) in enumerate(zip(nodes, opts)):
            set_grads(m, seed * 100 + step * 10 + i)  # each peer its own gradient
            blobs.append(encode_payload(o.generate()))
        for o in opts:
            o.apply([decode_payload(b, o.result_layouts()) for b in blobs])
    for m in nodes[1:]:
        for a, b in zip(nodes[0].parameters(), m.parameters()):
            assert torch.equal(a, b)


def test_state_dict_round_trip_keeps_momentum():
    model = make_model()
    opt = DisTrO(model.parameters(), lr=0.05, chunk=16, topk=4)
    for step in range(3):
        set_grads(model, step)
        opt.apply([opt.generate()])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    model2 = make_model(seed=99)
    model2.load_state_dict(saved_model)
    opt2 = DisTrO(model2.parameters(), lr=0.05, chunk=16, topk=4)
    opt2.load_state_dict(saved_opt)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["delta"], opt2.state[q]["delta"])

    set_grads(model, 7)
    set_grads(model2, 7)
    ra, rb = opt.generate(), opt2.generate()
    assert encode_payload(ra) == encode_payload(rb)
    opt.apply([ra])
    opt2.apply([rb])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_apply_rejects_a_peer_with_the_wrong_number_of_results():
    model = make_model()
    opt = DisTrO(model.parameters(), lr=0.1)
    set_grads(model, 0)
    results = opt.generate()
    with pytest.raises(ValueError, match="peer 1 sent 3 results"):
        opt.apply([results, results[:3]])


def two_peers_results(seed=0, **options):
    """A model and two peers' results for it from different gradients (the model is untouched)."""
    model = make_model(seed)
    peers = []
    for i in range(2):
        copy_ = copy.deepcopy(model)
        set_grads(copy_, seed * 10 + i)
        peers.append(DisTrO(copy_.parameters(), lr=0.05, chunk=16, topk=4, **options).generate())
    return model, peers


def applied(model, results, weights=None, **options):
    """The parameters after ``apply(results, weights)`` on a copy of ``model`` (``model`` is unchanged)."""
    m = copy.deepcopy(model)
    DisTrO(m.parameters(), lr=0.05, chunk=16, topk=4, **options).apply(results, weights)
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("one_bit", [True, False], ids=["one_bit", "full"])
@pytest.mark.parametrize("matrix_update", ["orthogonal", "sign"])
def test_apply_with_equal_weights_is_bit_identical_to_equal_votes(one_bit, matrix_update):
    """None and any equal weights give the same parameters bit for bit (not just within tolerance)."""
    options = dict(one_bit=one_bit, matrix_update=matrix_update)
    model, peers = two_peers_results(**options)
    want = applied(model, peers, **options)
    for weights in (None, [1, 1], [4, 4], [0.1, 0.1]):
        assert all(torch.equal(a, b) for a, b in zip(applied(model, peers, weights, **options), want))


@pytest.mark.parametrize("one_bit", [True, False], ids=["one_bit", "full"])
@pytest.mark.parametrize("matrix_update", ["orthogonal", "sign"])
def test_apply_weights_side_with_the_heavier_peer(one_bit, matrix_update):
    """Two peers choosing the same coefficients with opposite values: equal votes cancel to no
    step; weights 3:1 give the heavier peer's own step (the aggregate is half of its values, and
    both updates ignore scale: exactly for sign, up to orthogonalize's 1e-7 for matrices)."""
    options = dict(one_bit=one_bit, matrix_update=matrix_update)
    model, (a, _) = two_peers_results(**options)
    b = [SparseResult(r.shape, r.dtype, r.chunk, r.topk, r.one_bit, r.indices, -r.values) for r in a]
    assert all(torch.equal(x, y) for x, y in zip(applied(model, [a, b], **options), model.parameters()))
    for weights, heavier in (([3, 1], a), ([1, 3], b)):
        for x, y in zip(applied(model, [a, b], weights, **options), applied(model, [heavier], **options)):
            if matrix_update == "sign":
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y)


def test_apply_rejects_bad_weights_before_changing_anything():
    model, peers = two_peers_results()
    opt = DisTrO(model.parameters(), lr=0.05, chunk=16, topk=4)
    before = [p.detach().clone() for p in model.parameters()]
    for weights, message in (([1.0], r"need one per result \(2\), got 1"), ([1.0, 0.0], r"weights\[1\] is 0.0"),
                             ([1.0, -2.0], r"finite and > 0"), ([float("nan"), 1.0], r"weights\[0\] is nan")):
        with pytest.raises(ValueError, match=message):
            opt.apply(peers, weights)
    with pytest.raises(ValueError, match=r"need one per result \(0\), got 1"):
        opt.apply([], [1.0])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_apply_weights_are_deterministic():
    model, peers = two_peers_results(seed=5)
    first = applied(model, peers, [5, 2])
    assert all(torch.equal(a, b) for a, b in zip(applied(model, peers, (5.0, 2.0)), first))
    assert not all(torch.equal(a, b) for a, b in zip(applied(model, peers), first))  # the weights mattered


def test_payload_rejects_mismatches():
    model = make_model()
    opt = DisTrO(model.parameters(), lr=0.1)
    set_grads(model, 0)
    blob = encode_payload(opt.generate())
    layouts = opt.result_layouts()
    assert len(decode_payload(blob, layouts)) == len(layouts)
    with pytest.raises(ValueError, match="other parameters or codec settings than these 3"):
        decode_payload(blob, layouts[:3])
    with pytest.raises(ValueError, match="other parameters"):
        decode_payload(blob, [dataclasses.replace(layouts[0], shape=(1, 2))] + layouts[1:])
    with pytest.raises(ValueError, match="other parameters"):
        decode_payload(blob, [dataclasses.replace(layouts[0], topk=9)] + layouts[1:])
    with pytest.raises(ValueError, match="magic"):
        decode_payload(b"XXXX" + blob[4:], layouts)
    with pytest.raises(ValueError, match="runs past the end"):
        decode_payload(blob[:-1], layouts)
    with pytest.raises(ValueError, match="trailing"):
        decode_payload(blob + b"\0", layouts)


def test_a_payload_carries_no_headers():
    # Every byte beyond the 8 of magic, version and layout tag is coefficients.
    model = make_model()
    opt = DisTrO(model.parameters(), lr=0.1)
    set_grads(model, 0)
    results = opt.generate()
    assert len(encode_payload(results)) == 8 + sum(r.layout.body_size for r in results)
    assert [r.layout for r in results] == opt.result_layouts()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_fuzzed_payloads_only_raise_value_error(blob):
    layouts = [ResultLayout((24, 64), torch.float32, 64, 8, True), ResultLayout((64,), torch.float32, 64, 8, True)]
    for head in (b"PDP\x02", b"PDP\x02" + layout_tag(tuple(layouts))):
        try:
            decode_payload(head + blob, layouts)
        except ValueError as exc:
            assert str(exc)


def test_single_peer_training_reduces_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = DisTrO(model.parameters(), lr=3e-3, chunk=16, topk=4)
    x = torch.randn(256, 16)
    y = x[:, :2].sum(1, keepdim=True)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_orthogonal_update_steps_matrices_by_rms_lr_and_the_rest_by_sign():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = DisTrO(model.parameters(), lr=0.01, chunk=8, topk=2)  # matrix_update="orthogonal" by default
    set_grads(model, 0)
    opt.apply([opt.generate()])
    for b, p in zip(before, model.parameters()):
        step = (p.detach() - b)
        if p.dim() == 2:
            assert step.pow(2).mean().sqrt().item() == pytest.approx(0.01, rel=1e-3)
            assert step.abs().max() > 0.0101  # not a sign step: sizes vary
        else:
            assert torch.allclose(step.abs(), torch.full_like(step, 0.01), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 48), cols=st.integers(1, 48), seed=st.integers(0, 1000))
def test_orthogonalize_equalizes_singular_values_at_rms_one(rows, cols, seed):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x = orthogonalize(m)
    assert x.shape == m.shape
    assert x.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor
    polar = polar / polar.pow(2).mean().sqrt()
    # Five iterations leave the tiniest singular directions short, but the bulk lands near the exact factor.
    assert torch.nn.functional.cosine_similarity(x.flatten(), polar.flatten(), dim=0) > 0.9
    s = torch.linalg.svdvals(x)
    assert (s.max() / s.median()).item() < 1.8
    assert torch.equal(orthogonalize(m), x)  # deterministic
    assert torch.equal(orthogonalize(torch.zeros(rows, cols)), torch.zeros(rows, cols))


def _llama_like():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(40, 16)
            self.q_proj = torch.nn.Linear(16, 16, bias=False)
            self.norm = torch.nn.LayerNorm(16)
            self.lm_head = torch.nn.Linear(16, 40, bias=False)

    torch.manual_seed(0)
    return Tiny()


def test_named_parameters_get_the_per_kind_defaults():
    model = _llama_like()
    opt = DisTrO.for_model(model)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert set(kinds) == {"embedding", "matrix", "vector"}
    for kind, scale in DisTrO.DEFAULT_KIND_SCALES.items():
        assert kinds[kind]["lr_scale"] == scale
    assert opt.defaults["lr"] == DisTrO.DEFAULT_LR
    assert opt.defaults["compression_decay"] == DisTrO.DEFAULT_COMPRESSION_DECAY
    # The same thing spelled out, and an override of one kind.
    same = DisTrO(model.named_parameters(), DisTrO.DEFAULT_LR)
    assert [(g["kind"], g["lr_scale"]) for g in same.param_groups] == [(g["kind"], g["lr_scale"]) for g in opt.param_groups]
    custom = DisTrO.for_model(model, 0.5, matrix_lr_scale=1.0)
    assert {g["kind"]: g["lr_scale"] for g in custom.param_groups}["matrix"] == 1.0
    assert custom.defaults["lr"] == 0.5
    with pytest.raises(ValueError, match="named parameters"):
        DisTrO(model.parameters(), 0.1, matrix_lr_scale=0.5)
    with pytest.raises(ValueError, match="matrix_update"):
        DisTrO.for_model(model, matrix_update="adam")


@pytest.mark.parametrize("embedding_update", ["row_rms", "sign"])
def test_embeddings_step_each_token_row_at_rms_lr_or_by_sign(embedding_update):
    """row_rms: every row of an embedding or output head that the aggregate touches moves by
    RMS lr·scale, in the aggregate's direction within the row (sizes vary inside a row); sign
    (the default): every element moves by exactly lr·scale. Other kinds step the same either way."""
    model = _llama_like()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {"embedding_update": "row_rms"} if embedding_update == "row_rms" else {}
    opt = DisTrO.for_model(model, 0.01, chunk=8, topk=2, **options)
    set_grads(model, 0)
    opt.apply([opt.generate()])
    lr = 0.01 * DisTrO.DEFAULT_KIND_SCALES["embedding"]
    for name in ("embed_tokens.weight", "lm_head.weight"):
        step = dict(model.named_parameters())[name].detach() - before[name]
        if embedding_update == "sign":
            # Every element moves by exactly lr·scale, or not at all where the aggregate is exactly 0
            # (one peer's signs: two kept coefficients of equal size can cancel at an element).
            moved = (step.abs() - lr).abs() < 1e-6
            assert torch.all(moved | (step == 0)), step
            assert moved.float().mean() > 0.9, moved.float().mean()
            continue
        rms = step.pow(2).mean(dim=1).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, lr), rtol=1e-4), "each token's row moves by RMS lr"
        assert step.abs().max() > 1.01 * lr, "not a sign step: sizes vary within a row"
    norm = model.norm.weight.detach() - before["norm.weight"]
    assert torch.allclose(norm.abs(), torch.full_like(norm, 0.01 * DisTrO.DEFAULT_KIND_SCALES["vector"]), atol=1e-6)
    with pytest.raises(ValueError, match="embedding_update"):
        DisTrO.for_model(model, embedding_update="rms")


def test_row_normalize_leaves_zero_rows_alone():
    m = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0]])
    out = row_normalize(m)
    assert torch.equal(out[0], torch.zeros(3))
    assert out[1].pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert torch.equal(torch.sign(out[1]), torch.sign(m[1]))


def test_warmup_steps_shorten_the_momentum_by_the_optimizers_own_count():
    """Without steps_done, generate call k (from 0) counts as k steps done; the count survives state_dict."""
    def run(warmup_steps, steps_done=None):
        p = torch.nn.Parameter(torch.zeros(8))
        opt = DisTrO([p], lr=1.0, compression_decay=0.5, chunk=8, topk=1, one_bit=False, warmup_steps=warmup_steps)
        for i in range(4):
            p.grad = torch.arange(8.0) + i
            opt.generate() if steps_done is None else opt.generate(steps_done=steps_done[i])
        return opt, opt.state[p]["delta"].clone()

    counted, delta = run(3)
    _, explicit = run(3, steps_done=[0, 1, 2, 3])
    assert torch.equal(delta, explicit)
    _, late = run(3, steps_done=[3, 4, 5, 6])  # a peer joining after the warmup keeps β
    _, plain = run(0)
    assert torch.equal(late, plain)
    assert not torch.equal(delta, plain)
    p2 = torch.nn.Parameter(torch.zeros(8))
    restored = DisTrO([p2], lr=1.0, compression_decay=0.5, chunk=8, topk=1, one_bit=False, warmup_steps=3)
    restored.load_state_dict(counted.state_dict())
    assert restored.param_groups[0]["generated"] == 4


def test_apply_gives_the_same_weights_whatever_torchs_thread_count():
    """Nodes differ in cores (and a node's ranks each take a part of them): on CPU a matmul or a
    sum splits its work by thread count and rounds accordingly, so apply runs on one thread."""
    torch.manual_seed(3)
    # A shape and values seen to round differently with 2 threads than with 1 (orthogonalize's
    # Newton-Schulz products) before apply took one thread.
    base = torch.nn.Linear(352, 128)
    peers = []
    for seed in (1, 2, 3):
        m = copy.deepcopy(base)
        set_grads(m, seed)
        peers.append(DisTrO(m.parameters(), lr=0.01, chunk=64, topk=8).generate())
    weights = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        m = copy.deepcopy(base)
        DisTrO(m.parameters(), lr=0.01, chunk=64, topk=8).apply(peers)
        assert torch.get_num_threads() == threads, "the caller's thread count is restored"
        weights[threads] = [p.detach().clone() for p in m.parameters()]
    for threads in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(weights[threads], weights[1])), f"{threads} threads differ from 1"


def _peer_with_results(seed):
    """A model, its DisTrO, the results it just generated, and a copy of its weights."""
    model = make_model(seed)
    opt = DisTrO(model.parameters(), lr=0.05, chunk=16, topk=4)
    set_grads(model, 1)
    own = opt.generate()
    return model, opt, own, [p.detach().clone() for p in model.parameters()]


def _same(tensors, others):
    return all(torch.equal(a, b) for a, b in zip(tensors, others, strict=True))


def test_lookahead_trains_on_the_weights_with_own_results_applied_then_restores_them_bit_for_bit():
    model, opt, own, before = _peer_with_results(3)
    momentum = [opt.state[p]["delta"].clone() for p in model.parameters()]
    ahead = copy.deepcopy(model)
    DisTrO(ahead.parameters(), lr=0.05, chunk=16, topk=4).apply([own])
    with opt.lookahead(own) as applied:
        assert applied
        assert _same(model.parameters(), ahead.parameters())
        assert not _same(model.parameters(), before)
        set_grads(model, 2)  # what was computed inside stays
    assert _same(model.parameters(), before)
    assert _same([opt.state[p]["delta"] for p in model.parameters()], momentum)
    g = torch.Generator().manual_seed(2)
    assert _same([p.grad for p in model.parameters()], [torch.randn(p.shape, generator=g) for p in model.parameters()])


def test_lookahead_restores_the_weights_when_the_block_fails_and_does_nothing_without_results():
    model, opt, own, before = _peer_with_results(4)
    with pytest.raises(RuntimeError, match="rank died"), opt.lookahead(own):
        raise RuntimeError("rank died")
    assert _same(model.parameters(), before)
    for nothing in (None, []):
        with opt.lookahead(nothing) as applied:
            assert applied is False
            assert _same(model.parameters(), before)
    with pytest.raises(ValueError, match="results for"), opt.lookahead(own[:-1]):
        pass
    assert _same(model.parameters(), before)


def test_kinds_set_codec_options_for_one_kind_and_name_what_is_wrong():
    """kinds={"matrix": {"topk": ...}}: the matrices' results keep that many per tile, every other
    tensor the constructor's; two peers built alike still end bit-identical; a wrong kind, option or
    value is refused naming it, and so is kinds without named parameters."""
    model = _llama_like()
    opt = DisTrO.for_model(model, 0.01, chunk=8, topk=2, kinds={"matrix": {"topk": 5, "one_bit": False}})
    by_kind = {g["kind"]: (g["topk"], g["one_bit"]) for g in opt.param_groups}
    assert by_kind == {"embedding": (2, True), "matrix": (5, False), "vector": (2, True)}
    layouts = {tuple(p.shape): layout for (_, p), layout in zip(opt._params(), opt.result_layouts())}
    assert (layouts[(16, 16)].kept, layouts[(16, 16)].one_bit) == (5, False)  # q_proj: 8×8 tiles at 5 of 64
    assert (layouts[(40, 16)].kept, layouts[(40, 16)].one_bit) == (2, True)
    other = _llama_like()
    twin = DisTrO.for_model(other, 0.01, chunk=8, topk=2, kinds={"matrix": {"topk": 5, "one_bit": False}})
    set_grads(model, 1)
    set_grads(other, 2)
    mine, theirs = opt.generate(), twin.generate()
    opt.apply([mine, theirs])
    twin.apply([mine, theirs])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    for kinds, message in [({"matrx": {"topk": 4}}, "unknown kind 'matrx'"),
                           ({"matrix": {"lr": 4}}, "kinds.matrix: unknown option"),
                           ({"matrix": {"topk": 0}}, "kinds.matrix.topk must be an integer >= 1"),
                           ({"embedding": {"compression_decay": 1.5}}, "kinds.embedding.compression_decay must be in"),
                           ({"vector": {"one_bit": 1}}, "kinds.vector.one_bit must be true or false")]:
        with pytest.raises(ValueError, match=message):
            DisTrO.for_model(model, kinds=kinds)
    with pytest.raises(ValueError, match="need named parameters"):
        DisTrO(model.parameters(), 0.01, kinds={"matrix": {"topk": 4}})
