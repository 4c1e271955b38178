"""A DisTrO network in one process, against AdamW on the same tokens.

``W`` simulated peers each hold their own copy of a small LLaMA and their own
DisTrO momentum. Every step each peer trains on its own batch, ships its results
as bytes (:func:`psyche.distro.encode_payload`), and every peer decodes and
applies all peers' payloads, in the same order, so all copies stay bit-identical.
In overlapped mode the payloads applied at step ``t`` are those of step ``t − 1`` (at step
``t − 1``'s LR, as a client applies them; the last step's are applied at the end), and
each peer takes step ``t``'s gradient with its own step ``t − 1`` results applied
(:meth:`DisTrO.lookahead`; ``lookahead=False`` turns that off).

The baseline is the same model trained with ``torch.optim.AdamW`` on exactly the
same tokens (at step ``s`` it sees the union of the peers' batches), with the
same LR schedule shape and its learning rate swept over ``adamw_lrs``; the best
final validation loss is the one compared.

Peer ``w`` at step ``s`` trains sample indices ``(s·W + w)·B … (s·W + w + 1)·B − 1``.
With unequal ``shares`` (``n₀, n₁, …`` sequences, ``G = Σ nᵢ`` a step) it trains
``s·G + n₀ + … + n_{w−1}`` onwards, ``n_w`` of them: every split of the same ``G``
trains the same samples each step, only divided differently, and ``combine`` says
whether every peer's results then get an equal vote or one in proportion to its
tokens (:meth:`DisTrO.apply`'s ``weights``).
Steps are 0-based here: step ``s`` is the run's step ``s + 1``.

A harness (``psyche bench distro``, ``bench/convergence*.py``, the tests), not product
code: the DisTrO it drives is built by :meth:`DisTrO.from_config`, as a client's is.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from psyche.distro import DisTrO, Overlap, SparseResult, decode_payload, encode_payload
from psyche.distro.optimizer import param_groups

OnEval = Callable[[str, int, float], None]

COMBINE_RULES = ("equal", "tokens")
"""Values of :attr:`SimConfig.combine`."""

QUICK_STEPS = 150
"""Steps of the CI-sized comparison (``--quick``)."""
FULL_STEPS = 600
"""Steps of the full comparison."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One simulated comparison. Sizes are for a CPU; LRs are peak values of the schedule."""

    peers: int = 4
    """Simulated DisTrO peers (W)."""
    steps: int = 300
    """Optimizer steps for DisTrO and for every AdamW run."""
    batch_per_peer: int = 4
    """Sequences each peer trains per step when ``shares`` is None; AdamW's batch is ``peers × batch_per_peer``."""
    shares: tuple[int, ...] | None = None
    """Sequences each peer trains per step, one per peer (each >= 1), as a coordinator splitting the
    global batch by speed would; the global batch is then their sum (:attr:`global_batch`) and
    ``batch_per_peer`` is unused. None: every peer trains ``batch_per_peer``."""
    combine: str = "equal"
    """How every peer combines the peers' results: ``"equal"`` (one vote each) or ``"tokens"`` (votes in
    proportion to the tokens each trained). With equal shares both give bit-identical runs."""
    seq_len: int = 64
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 2
    heads: int = 4
    tie_embeddings: bool = True
    # DisTrO: built by DisTrO.from_config, as every client builds it
    distro_lr: float | None = None
    """Peak LR of DisTrO (the step of a tensor with LR scale 1); None: ``DisTrO.DEFAULT_LR``."""
    distro_options: tuple[tuple[str, Any], ...] = ()
    """Fields of the run's ``[optimizer]`` section (:class:`psyche.config.OptimizerConfig`, checked
    by its rules) set over DisTrO's defaults, as ``(name, value)`` pairs (``config_from`` routes
    ``topk=...``, ``compression_decay=...`` and the like here)."""
    overlapped: bool = False
    lookahead: bool = True
    """Overlapped only: each peer takes its gradient with its own in-flight results applied
    (:meth:`DisTrO.lookahead`), as a client does unless its config turns ``lookahead`` off."""
    momentum_warmup: bool = True
    """Shorten DisTrO's momentum memory during the LR warmup (:func:`psyche.distro.optimizer.momentum_warmup_factor`)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, for DisTrO and AdamW alike."""
    # schedule, shared by both optimizers
    schedule: str = "cosine"
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    adamw_lrs: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 5e-3, 1e-2)
    """AdamW peak LRs swept; the best final validation loss is the baseline. The best was 3e-3
    at 150 steps and 2e-3 at 600, inside the sweep both times."""
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_grouped: bool = False
    """Also sweep AdamW with a per-kind LR split (``adamw_kind_scales``), reported as ``adamw_grouped_*``."""
    adamw_kind_scales: tuple[float, float, float] = (2.0, 0.25, 1.0)
    """AdamW LR multipliers of embeddings, matrices and vectors in the per-kind sweep."""
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 4
    eval_batch_size: int = 16
    seed: int = 0
    data_dir: str = "data/fortunes"

    def __post_init__(self) -> None:
        if self.shares is not None:
            if len(self.shares) != self.peers:
                raise ValueError(f"shares: need one per peer ({self.peers}), got {len(self.shares)}")
            if any(n < 1 for n in self.shares):
                raise ValueError(f"shares: every peer trains >= 1 sequence a step, got {self.shares}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine: must be one of {', '.join(map(repr, COMBINE_RULES))}, got {self.combine!r}")

    @property
    def peer_batches(self) -> tuple[int, ...]:
        """Sequences each peer trains per step: ``shares``, or ``batch_per_peer`` for every peer."""
        return self.shares if self.shares is not None else (self.batch_per_peer,) * self.peers

    @property
    def global_batch(self) -> int:
        """Sequences trained per step by all peers together (AdamW's batch)."""
        return sum(self.peer_batches)

    def apply_weights(self) -> list[int] | None:
        """The ``weights`` every peer passes to :meth:`DisTrO.apply`: None for ``"equal"``,
        each peer's tokens a step for ``"tokens"``."""
        return None if self.combine == "equal" else [n * self.seq_len for n in self.peer_batches]

    @property
    def lr_of_distro(self) -> float:
        """DisTrO's peak LR: ``distro_lr``, or DisTrO's default."""
        return DisTrO.DEFAULT_LR if self.distro_lr is None else self.distro_lr

    def distro_config(self) -> dict:
        """DisTrO's hyperparameters (the defaults and what this run overrides), as reported next to the results."""
        keys = ("overlapped", "lookahead", "momentum_warmup", "weight_decay", "schedule", "warmup_steps", "final_lr_fraction",
                "batch_per_peer", "grad_clip")
        # An unequal split is reported only when set, so equal-split reports keep their keys.
        split = {} if self.shares is None else {"shares": list(self.shares), "combine": self.combine}
        return {"distro_lr": self.lr_of_distro, **DISTRO_DEFAULTS, **dict(self.distro_options),
                **{k: getattr(self, k) for k in keys}, **split}


@dataclass
class Curve:
    """Validation loss along a run."""

    name: str
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        """The last validation loss measured."""
        return self.val_loss[-1]


@dataclass
class DistroRun:
    """What the DisTrO simulation produced."""

    curve: Curve
    payload_bytes_per_peer_step: float
    params: int
    peers_bit_identical: bool
    train_loss_first: float
    train_loss_last: float
    models: list[torch.nn.Module]
    optimizers: list[DisTrO]


def _model_cfg(cfg: SimConfig, vocab_size: int):
    from psyche.config import ModelConfig

    # The model's vocabulary is the data's rounded up to a multiple of 64, as nanoGPT
    # does for speed; for DisTrO it also keeps the embedding's DCT tiles square (a prime
    # vocabulary such as 257 bytes would cut them 1 row high, sending 8x the bytes).
    vocab_size = -(-vocab_size // 64) * 64
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        tie_word_embeddings=cfg.tie_embeddings, seq_len=cfg.seq_len, init_seed=cfg.seed,
    )


def _lr_cfg(cfg: SimConfig, peak: float):
    from psyche.config import LRScheduleConfig

    return LRScheduleConfig(kind=cfg.schedule, peak_lr=peak, warmup_steps=cfg.warmup_steps,
                            final_lr=peak * cfg.final_lr_fraction)


def _data(cfg: SimConfig):
    from psyche.data import builds_on_first_use, ensure_default_dataset, open_provider, read_meta

    folder = ensure_default_dataset(cfg.data_dir) if builds_on_first_use(cfg.data_dir) else Path(cfg.data_dir)
    vocab = int(read_meta(folder)["vocab_size"])
    train = open_provider(folder, split="train", seq_len=cfg.seq_len, shuffle_seed=cfg.seed, repeat=True, vocab_size=vocab)
    val = open_provider(folder, split="val", seq_len=cfg.seq_len, shuffle_seed=cfg.seed, vocab_size=vocab)
    return train, val, vocab


def _indices(cfg: SimConfig, step: int, peer: int) -> range:
    batches = cfg.peer_batches
    start = step * cfg.global_batch + sum(batches[:peer])
    return range(start, start + batches[peer])


def _adamw_groups(cfg: SimConfig, model: torch.nn.Module) -> list[dict]:
    emb, mat, vec = cfg.adamw_kind_scales
    return param_groups(model.named_parameters(), embedding_lr_scale=emb, matrix_lr_scale=mat, vector_lr_scale=vec)


def _optimizer_cfg(cfg: SimConfig):
    from psyche.config import OptimizerConfig

    return OptimizerConfig(kind="distro", weight_decay=cfg.weight_decay, momentum_warmup=cfg.momentum_warmup,
                           **dict(cfg.distro_options))


def build_distro(cfg: SimConfig, model: torch.nn.Module) -> DisTrO:
    """The DisTrO of one simulated peer, built as a client builds its own
    (:meth:`DisTrO.from_config`) from the optimizer and LR sections this simulation stands for."""
    return DisTrO.from_config(model, _optimizer_cfg(cfg), _lr_cfg(cfg, cfg.lr_of_distro))


def _should_eval(cfg: SimConfig, step: int) -> bool:
    return step == 0 or (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps


def run_distro(cfg: SimConfig, *, on_eval: OnEval | None = None) -> DistroRun:
    """Train ``cfg.peers`` model copies with DisTrO, exchanging bytes; evaluate peer 0.

    Promises: every peer applies the same payloads in the same order, and
    ``peers_bit_identical`` reports whether all copies ended with equal weights.
    """
    from psyche.train import build_model
    from psyche.train.schedule import lr_at
    from psyche.train.step import compute_gradients, evaluate

    train, val, vocab = _data(cfg)
    mcfg = _model_cfg(cfg, vocab)
    models: list[torch.nn.Module] = [build_model(mcfg) for _ in range(cfg.peers)]  # same seed: identical copies
    opts = [build_distro(cfg, m) for m in models]
    layouts = opts[0].result_layouts()
    lr_cfg = _lr_cfg(cfg, cfg.lr_of_distro)
    Due = tuple[float, list[list[SparseResult]]]  # a step's LR and all peers' parsed results
    overlap: Overlap[Due] | None = Overlap() if cfg.overlapped else None
    curve = Curve("distro")
    weights = cfg.apply_weights()
    sent = 0
    losses: list[float] = []
    # Overlapped: each step's parsed results and LR, applied a step later (a client applies a
    # step's results at that step's LR); in_flight[peer] is that peer's own share of them.
    in_flight: list[list[SparseResult] | None] = [None] * cfg.peers
    in_flight_lr = 0.0
    for step in range(cfg.steps):
        lr = lr_at(step, lr_cfg, cfg.steps)
        blobs = []
        step_loss = 0.0
        for peer, (model, opt) in enumerate(zip(models, opts)):
            _set_lr(opt, in_flight_lr)
            with opt.lookahead(in_flight[peer] if cfg.lookahead else None):
                stats = compute_gradients(model, train.batch(_indices(cfg, step, peer)),
                                          micro_batch_size=cfg.peer_batches[peer], grad_clip=cfg.grad_clip)
            step_loss += stats.loss / cfg.peers
            _set_lr(opt, lr)
            blobs.append(encode_payload(opt.generate(steps_done=step)))  # step is 0-based here
        sent += sum(len(b) for b in blobs)
        losses.append(step_loss)
        # Parsing is a pure function of the bytes, so it is done once per payload here;
        # every peer then applies the same parsed results in the same order.
        received = [decode_payload(b, layouts) for b in blobs]
        due: list[Due] = [(lr, received)]
        if overlap is not None:
            # The run's end applies the last step too.
            held = [overlap.exchange((lr, received)), overlap.flush() if step == cfg.steps - 1 else None]
            due = [d for d in held if d is not None]
            in_flight, in_flight_lr = list(received), lr
        for step_lr, results in due:
            for opt in opts:
                _set_lr(opt, step_lr)
                opt.apply(results, weights)
        if _should_eval(cfg, step):
            loss = evaluate(models[0], val, batches=cfg.eval_batches, batch_size=cfg.eval_batch_size)
            _record(curve, cfg, step, loss, on_eval)
    identical = all(
        torch.equal(a, b) for m in models[1:] for a, b in zip(models[0].parameters(), m.parameters())
    )
    params = sum(p.numel() for p in models[0].parameters())
    return DistroRun(
        curve=curve, payload_bytes_per_peer_step=sent / (cfg.steps * cfg.peers), params=params,
        peers_bit_identical=identical, train_loss_first=losses[0], train_loss_last=losses[-1], models=models,
        optimizers=opts,
    )


def _set_lr(opt: DisTrO, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def run_adamw(cfg: SimConfig, lr: float, *, grouped: bool = False, on_eval: OnEval | None = None) -> Curve:
    """Train one copy with AdamW on the union of the peers' batches each step, at peak ``lr``.

    ``grouped``: each parameter kind's LR is ``lr`` times its ``cfg.adamw_kind_scales``
    entry, the same schedule shape driving all of them.
    """
    from psyche.train import build_model
    from psyche.train.schedule import lr_at
    from psyche.train.step import compute_gradients, evaluate

    train, val, vocab = _data(cfg)
    model = build_model(_model_cfg(cfg, vocab))
    groups = _adamw_groups(cfg, model) if grouped else [{"params": list(model.parameters()), "lr_scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.adamw_betas, weight_decay=cfg.weight_decay)
    lr_cfg = _lr_cfg(cfg, lr)
    curve = Curve(f"adamw{' grouped' if grouped else ''} lr={lr:g}")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr_cfg, cfg.steps) * group["lr_scale"]
        start = step * cfg.global_batch
        batch = train.batch(range(start, start + cfg.global_batch))
        # Micro-batches only bound memory (the gradient is the whole batch's): a peer's largest share.
        stats = compute_gradients(model, batch, micro_batch_size=max(cfg.peer_batches), grad_clip=cfg.grad_clip)
        if stats.finite:
            opt.step()
        if _should_eval(cfg, step):
            _record(curve, cfg, step, evaluate(model, val, batches=cfg.eval_batches, batch_size=cfg.eval_batch_size), on_eval)
    return curve


def _record(curve: Curve, cfg: SimConfig, step: int, loss: float, on_eval: OnEval | None) -> None:
    curve.steps.append(step + 1)
    curve.tokens.append((step + 1) * cfg.global_batch * cfg.seq_len)
    curve.val_loss.append(loss)
    if on_eval is not None:
        on_eval(curve.name, step + 1, loss)


def compare(cfg: SimConfig, *, on_eval: OnEval | None = None) -> tuple[dict, list[Curve]]:
    """Run DisTrO and the AdamW sweep; return the report (JSON-ready) and all curves.

    ``loss_ratio`` is DisTrO's final validation loss over the best AdamW's.
    """
    t0 = time.perf_counter()
    distro = run_distro(cfg, on_eval=on_eval)
    adamw = [run_adamw(cfg, lr, on_eval=on_eval) for lr in cfg.adamw_lrs]
    best = _best(adamw)
    fp32_bytes = 4 * distro.params
    report = {
        "distro_val_loss": round(distro.curve.final, 4),
        "adamw_val_loss": round(adamw[best].final, 4),
        "loss_ratio": round(distro.curve.final / adamw[best].final, 4),
        "tokens": distro.curve.tokens[-1],
        "peers": cfg.peers,
        "steps": cfg.steps,
        "params": distro.params,
        "distro_config": cfg.distro_config(),
        "adamw_lrs": list(cfg.adamw_lrs),
        "adamw_best_lr": cfg.adamw_lrs[best],
        "adamw_val_losses": [round(c.final, 4) for c in adamw],
        "adamw_betas": list(cfg.adamw_betas),
        "payload_bytes_per_peer_step": round(distro.payload_bytes_per_peer_step, 1),
        "bytes_per_param_per_step": round(distro.payload_bytes_per_peer_step / distro.params, 6),
        "fp32_bytes_ratio": round(fp32_bytes / distro.payload_bytes_per_peer_step, 1),
        "peers_bit_identical": distro.peers_bit_identical,
    }
    grouped: list[Curve] = []
    if cfg.adamw_grouped:
        grouped = [run_adamw(cfg, lr, grouped=True, on_eval=on_eval) for lr in cfg.adamw_lrs]
        g = _best(grouped)
        report |= {
            "adamw_grouped_val_loss": round(grouped[g].final, 4),
            "adamw_grouped_best_lr": cfg.adamw_lrs[g],
            "adamw_grouped_val_losses": [round(c.final, 4) for c in grouped],
            "loss_ratio_vs_grouped_adamw": round(distro.curve.final / grouped[g].final, 4),
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report, [distro.curve, *adamw, *grouped]


def _best(curves: list[Curve]) -> int:
    return min(range(len(curves)), key=lambda i: curves[i].final if math.isfinite(curves[i].final) else math.inf)


def plot(curves: list[Curve], path: str | Path, *, title: str) -> Path:
    """Write a PNG of validation loss against tokens for every curve (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        ax.plot(c.tokens, c.val_loss, label=c.name, linewidth=2.2 if c.name == "distro" else 1.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _distro_defaults() -> dict[str, Any]:
    # Read off DisTrO's own signature, so the report can never drift from what it builds.
    out = {name: p.default for name, p in inspect.signature(DisTrO.__init__).parameters.items()
           if p.default is not inspect.Parameter.empty and name not in ("lr", "weight_decay", "warmup_steps")}
    return out | {f"{k}_lr_scale": v for k, v in DisTrO.DEFAULT_KIND_SCALES.items()}


DISTRO_DEFAULTS = _distro_defaults()
"""What :meth:`DisTrO.for_model` uses unless told otherwise (reported with each run)."""


def config_from(**overrides) -> SimConfig:
    """A :class:`SimConfig` with ``overrides`` applied; DisTrO's own options (``topk``,
    ``compression_decay``, ``matrix_lr_scale``, ...) go into ``distro_options``.
    Unknown keys raise ``TypeError``."""
    options = dict(SimConfig().distro_options) | dict(overrides.pop("distro_options", ()))
    for key in list(overrides):
        if key in DISTRO_DEFAULTS:
            options[key] = overrides.pop(key)
    return SimConfig(**{**asdict(SimConfig()), **overrides, "distro_options": tuple(sorted(options.items()))})


def bench(cfg: SimConfig, *, out_dir: str | Path = "bench/out", name: str = "distro_sim",
          on_eval: OnEval | None = None) -> dict:
    """Run :func:`compare`, write ``<out_dir>/<name>.png`` and return the report with its path."""
    report, curves = compare(cfg, on_eval=on_eval)
    d = cfg.distro_config()
    title = (f"{cfg.peers} peers, top-{d['topk']}/{d['chunk']}², {'1-bit' if d['one_bit'] else 'full'}"
             f"{', overlapped' if cfg.overlapped else ''}: DisTrO vs AdamW")
    report["plot"] = str(plot(curves, Path(out_dir) / f"{name}.png", title=title))
    return report
