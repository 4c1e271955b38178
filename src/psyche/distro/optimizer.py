"""The DisTrO optimizer (DeMo-style decoupled momentum), split in the network's two halves.

Each peer, each step::

    grads  = backward(its own batches)
    mine   = opt.generate()            # compress its momentum; returns list[SparseResult]
    ... ship encode_payload(mine), receive every peer's payload ...
    opt.apply([peer_0, peer_1, ...])   # same call, same bytes, on every peer

``generate`` (per parameter, touches only this peer's momentum ``δ``)::

    δ ← β·δ + lr·g                      # β = compression_decay
    r = top-k of the chunked DCT of δ   # DCTCodec.encode
    δ ← δ − idct(r)                     # error feedback: what was sent leaves δ
    r ← sign(r) if one_bit              # quantise only after subtracting the exact values

The subtraction uses the exact top-k values, not their signs, as DeMo and Psyche
do: the components that were chosen leave the momentum entirely (the sign is only
how they travel), and everything not chosen stays in δ to be sent later.

``apply`` (per parameter, touches only the weights; every peer runs it on the same
inputs, so every peer's weights stay bit-identical)::

    u = idct(mean over peers of each chosen coefficient)   # DCTCodec.decode
                                                            # (weighted if apply gets weights)
    θ ← θ·(1 − lr·weight_decay)                             # decoupled weight decay
    θ ← θ − lr·orth(u)   for a weight matrix (matrix_update="orthogonal", the default)
    θ ← θ − lr·sign(u)   for everything else (embeddings, norms, biases)

``orth(u)`` (:func:`orthogonalize`) is the semi-orthogonal matrix nearest to ``u``
(its singular values set to one, by Newton-Schulz iterations as in Muon), scaled to
RMS 1 so that ``lr`` means the same step size as a sign update. A sign step moves
every element by exactly ``lr`` whatever the aggregate says about it; the
orthogonal step keeps the aggregate's directions in the matrix's row and column
spaces and only equalizes their scales. On ``bench/convergence_matrix.py``'s
small-model cells it cut DisTrO's loss gap to the best AdamW by 30-45 %
(``matrix_update="sign"`` gives the DeMo step back).

``embedding_update="row_rms"`` steps an embedding or output head by ``rows(u)``
(:func:`row_normalize`) instead: each row of ``u`` (one token's vector) at RMS 1, so
every token moves by ``lr`` as under a sign step, but along the aggregate's direction
within its row (the row-normalized step Scion takes for embedding layers). It beat
the sign step on all three tuning cells and on four of the six held-out cells of the
two BPE corpora (level on the other two), but lost on two of the three held-out cells
of the byte-level one, the worst cell included, so it is an option, not the default
(see the README).

What ``lr`` means at each stage (an LR schedule sets ``param_group['lr']`` before
each step):

- in ``generate`` it weighs this step's gradient inside the momentum; because the
  update is normalized (a sign, or an orthogonal factor at RMS 1), only its *ratio*
  across steps matters (a decaying LR makes older
  gradients weigh relatively more, as in DeMo);
- in ``apply`` it is the step size: the exact distance every parameter of a sign
  update moves (``±lr`` or 0), the RMS of an orthogonal update; plus the weight
  decay ``lr·weight_decay·θ``.

Weight decay is applied in ``apply`` rather than in ``generate`` (where Psyche
puts it) so that the weights change only in ``apply``: a peer that trained no
batch this step, or joined late, still ends bit-identical to the others.

Overlapped mode (:class:`Overlap`): the results applied at step ``t`` are the ones
generated at step ``t − 1``, so they can travel while step ``t`` trains (a client
applies them at step ``t − 1``'s LR). Step ``t``'s gradient is then taken on
weights one update behind the ones its results will be applied to, and with steps
normalized to a fixed size that staleness costs a lot. :meth:`DisTrO.lookahead`
takes the gradient instead on the weights with this peer's own step ``t − 1`` results
applied: the part of the update in flight that the peer already knows (its own
results share most of their coefficients' directions with the aggregate). Only
gradients move, so the weights stay bit-identical across peers.

Two knobs beyond the DeMo core:

- ``lr_scale`` (a param-group key): the group's effective LR is ``lr · lr_scale``,
  so one schedule drives every group while the embeddings move faster than the
  matrices. Built from named parameters (:meth:`DisTrO.for_model`), the groups get
  :attr:`DisTrO.DEFAULT_KIND_SCALES`; plain tensors get 1.
- the momentum warmup: while a fraction ``f < 1`` of the LR warmup is done, the
  momentum decay is ``β·(0.9 + 0.1·f^0.1)``, as Psyche does, so the momentum
  forgets the large, fast-changing gradients of the first steps sooner. ``f`` is
  :func:`momentum_warmup_factor` of the steps done before this one (a network's
  trainer passes them as ``generate(steps_done=k - 1)`` for its step ``k``; alone,
  the optimizer counts its own ``generate`` calls) over ``warmup_steps``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import torch

from psyche.distro.codec import DCTCodec, ResultLayout, SparseResult, vote_weights

if TYPE_CHECKING:
    from psyche.config import LRScheduleConfig, OptimizerConfig

T = TypeVar("T")

MatrixUpdate = Literal["orthogonal", "sign"]
"""How ``apply`` turns a weight matrix's aggregate into a step (see the module docstring)."""
EmbeddingUpdate = Literal["row_rms", "sign"]
"""How ``apply`` turns an embedding's (or output head's) aggregate into a step (see the module docstring)."""
KIND_OPTIONS = ("compression_decay", "chunk", "topk", "one_bit")
"""The options :class:`DisTrO`'s ``kinds`` may set for one kind of tensor."""


def _check_codec_options(where: str, **options: Any) -> None:
    """``ValueError`` naming the first of ``options`` (``compression_decay``, ``chunk``, ``topk``,
    ``one_bit``) that breaks its rule; ``where`` prefixes the name."""
    for name, value in options.items():
        if name == "compression_decay" and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{where}compression_decay must be in [0, 1], got {value!r}")
        if name in ("chunk", "topk") and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{where}{name} must be an integer >= 1, got {value!r}")
        if name == "one_bit" and not isinstance(value, bool):
            raise ValueError(f"{where}one_bit must be true or false, got {value!r}")


class DisTrO(torch.optim.Optimizer):
    """DeMo/DisTrO optimizer: ``generate()`` this peer's compressed momentum, ``apply()`` everyone's.

    The way to build one is from the model's named parameters, which gives every kind
    of tensor its own LR scale (:func:`param_kind`; the defaults below were chosen on
    ``bench/convergence_matrix.py``'s tuning cells and judged on its held-out ones)::

        opt = DisTrO.for_model(model)                  # every default
        opt = DisTrO(model.named_parameters(), lr=1e-2, warmup_steps=20)

    Plain tensors or param-group dicts are accepted too (then every tensor has
    ``lr_scale`` 1 unless its group says otherwise).

    ``step()`` is ``apply([generate()])``: a single peer training alone.
    State per parameter: ``delta`` (float32 momentum); it survives ``state_dict()``.
    Param groups may set ``lr_scale`` (default 1.0, see the module docstring) and
    override any constructor option (``compression_decay``, ``chunk``, ``topk``,
    ``one_bit``, ``weight_decay``, ``matrix_update``, ``embedding_update``). A 2-D tensor
    outside the ``embedding`` kind counts as a weight matrix for ``matrix_update``;
    ``embedding_update`` applies to 2-D tensors of the ``embedding`` kind (groups built
    from named parameters), whose rows are tokens.

    ``kinds`` sets codec options (:data:`KIND_OPTIONS`) for one kind of tensor only, over the
    constructor's, e.g. ``kinds={"matrix": {"topk": 1024}}`` sends every DCT coefficient of
    the weight matrices and top-2 of everything else (how the README splits compression's
    cost by kind of tensor). Like the LR scales, it needs named parameters.
    """

    DEFAULT_LR = 1e-2
    """Peak LR that :meth:`for_model` uses: the step of a tensor with ``lr_scale`` 1 (its sign
    step, or the RMS of its orthogonal step)."""
    DEFAULT_KIND_SCALES = {"embedding": 2.0, "matrix": 0.3, "vector": 1.0}
    """LR multiplier per kind of tensor (:func:`param_kind`) when built from named parameters."""
    DEFAULT_COMPRESSION_DECAY = 0.97
    """Momentum decay β: what is not sent fades with a time constant of about 33 steps."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | Iterable[tuple[str, torch.Tensor]],
        lr: float = DEFAULT_LR,
        compression_decay: float = DEFAULT_COMPRESSION_DECAY,
        chunk: int = 32,
        topk: int = 2,
        one_bit: bool = True,
        weight_decay: float = 0.0,
        *,
        embedding_lr_scale: float | None = None,
        matrix_lr_scale: float | None = None,
        vector_lr_scale: float | None = None,
        warmup_steps: int = 0,
        matrix_update: MatrixUpdate = "orthogonal",
        embedding_update: EmbeddingUpdate = "sign",
        kinds: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        _check_codec_options("", compression_decay=compression_decay, chunk=chunk, topk=topk)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if matrix_update not in ("orthogonal", "sign"):
            raise ValueError(f"matrix_update must be 'orthogonal' or 'sign', got {matrix_update!r}")
        if embedding_update not in ("row_rms", "sign"):
            raise ValueError(f"embedding_update must be 'row_rms' or 'sign', got {embedding_update!r}")
        items: list[Any] = list(params)  # read once: params may be a generator
        named = bool(items) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items)
        scales = {"embedding": embedding_lr_scale, "matrix": matrix_lr_scale, "vector": vector_lr_scale}
        if named:
            kind_scales = {k: (self.DEFAULT_KIND_SCALES[k] if v is None else v) for k, v in scales.items()}
            items = param_groups(items, **{f"{k}_lr_scale": v for k, v in kind_scales.items()})
        elif any(v is not None for v in scales.values()) or kinds:
            raise ValueError("embedding/matrix/vector_lr_scale and kinds need named parameters "
                             "(pass model.named_parameters(), or use DisTrO.for_model)")
        for kind, options in (kinds or {}).items():
            if kind not in scales:
                raise ValueError(f"kinds: unknown kind {kind!r} (known: {', '.join(scales)})")
            unknown = set(options) - set(KIND_OPTIONS)
            if unknown:
                raise ValueError(f"kinds.{kind}: unknown option(s) {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(KIND_OPTIONS)})")
            _check_codec_options(f"kinds.{kind}.", **options)
        if kinds:  # so the groups are named ones (refused above otherwise)
            for group in items:
                group.update(kinds.get(group["kind"], {}))
        defaults = dict(
            lr=lr, compression_decay=compression_decay, chunk=chunk, topk=topk,
            one_bit=one_bit, weight_decay=weight_decay, lr_scale=1.0, matrix_update=matrix_update,
            embedding_update=embedding_update,
        )
        super().__init__(items, defaults)
        for i, group in enumerate(self.param_groups):
            if not group["lr_scale"] >= 0:
                raise ValueError(f"param group {i}: lr_scale must be >= 0, got {group['lr_scale']}")
        self.warmup_steps = warmup_steps
        self._codecs: dict[int, DCTCodec] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, lr: float | None = None, **options) -> "DisTrO":
        """DisTrO for ``model`` with the defaults that carry across data and model shapes.

        ``lr`` defaults to :attr:`DEFAULT_LR`; ``options`` override any constructor
        option (``compression_decay``, ``topk``, ``embedding_lr_scale``, ``warmup_steps``, ...).
        Every peer of a run must build its optimizer the same way: results are matched
        to parameters by position.
        """
        return cls(model.named_parameters(), cls.DEFAULT_LR if lr is None else lr, **options)

    @classmethod
    def from_config(cls, model: torch.nn.Module, opt_cfg: "OptimizerConfig", lr_cfg: "LRScheduleConfig") -> "DisTrO":
        """The DisTrO a run's config describes: the one builder the client, ``psyche train``
        and the simulated network share, so every peer groups and tunes identically.

        :meth:`for_model` with the options ``opt_cfg`` sets (unset ones keep the defaults),
        LR ``lr_cfg.peak_lr`` (the caller sets each step's LR in ``param_groups``), and the
        momentum warmup over the LR's ``warmup_steps`` unless ``opt_cfg.momentum_warmup`` is off.
        """
        warmup_steps = lr_cfg.warmup_steps if opt_cfg.momentum_warmup else 0
        return cls.for_model(model, lr_cfg.peak_lr, warmup_steps=warmup_steps, **opt_cfg.distro_options())

    def _codec(self, chunk: int) -> DCTCodec:
        if chunk not in self._codecs:
            self._codecs[chunk] = DCTCodec(chunk)
        return self._codecs[chunk]

    def _params(self) -> list[tuple[dict, torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"]]

    def result_layouts(self) -> list[ResultLayout]:
        """The layout of every parameter's result, in the order results are produced and expected: what
        :func:`~psyche.distro.payload.decode_payload` reads a peer's payload with (results
        are float32, whatever the parameters' dtype)."""
        return [ResultLayout(tuple(p.shape), torch.float32, g["chunk"], g["topk"], g["one_bit"]) for g, p in self._params()]

    @torch.no_grad()
    def generate(self, *, steps_done: int | None = None) -> list[SparseResult]:
        """This peer's results for all parameters, in parameter order; updates the momentum.

        A parameter without a gradient counts as a zero gradient (its momentum
        still decays and is still sent), so every peer returns the same number
        of results. The weights are not touched. ``steps_done``: the optimizer steps
        of the run completed before this one (``k - 1`` for the run's step ``k``);
        while they are fewer than ``warmup_steps`` the momentum keeps less of its past
        (:func:`momentum_warmup_factor`, :func:`warmup_decay`). When it is not given,
        it is this optimizer's own count of ``generate`` calls: a network's trainer
        passes the run's step instead, since a peer may join late or skip a step.
        """
        generated = self.param_groups[0].get("generated", 0) if self.param_groups else 0
        steps_done = generated if steps_done is None else steps_done
        if steps_done < 0:
            raise ValueError(f"steps_done must be >= 0, got {steps_done}")
        for group in self.param_groups:
            group["generated"] = generated + 1
        warmup_factor = momentum_warmup_factor(steps_done, self.warmup_steps)
        out: list[SparseResult] = []
        for group, p in self._params():
            state = self.state[p]
            delta = state.get("delta")
            if delta is None or delta.dtype != torch.float32:
                # load_state_dict casts state to the parameter's dtype; keep float32.
                delta = torch.zeros_like(p, dtype=torch.float32) if delta is None else delta.float()
                state["delta"] = delta
            delta.mul_(warmup_decay(group["compression_decay"], warmup_factor))
            if p.grad is not None:
                delta.add_(p.grad.to(torch.float32), alpha=group["lr"] * group.get("lr_scale", 1.0))
            codec = self._codec(group["chunk"])
            sent = codec.encode(delta, group["topk"])
            delta.sub_(codec.decode([sent], delta.shape))
            out.append(sent.to_one_bit() if group["one_bit"] else sent)
        return out

    @torch.no_grad()
    def apply(
        self,
        results_from_all_peers: Sequence[Sequence[SparseResult]],
        weights: Sequence[float] | None = None,
    ) -> None:
        """Step the weights with every peer's results (outer list: peers, inner: parameters).

        ``weights``: one per peer (e.g. the tokens it trained), finite and > 0, only their
        ratios mattering; each coefficient is then the weighted mean over the peers that
        chose it (:meth:`DCTCodec.decode`). ``None`` (and equal weights, bit for bit) gives
        every peer an equal vote. Deterministic: the same results and weights in the same
        order give bit-identical parameters, whatever torch's thread count (on CPU it runs on one). An empty outer list is a no-op. ``ValueError`` if
        ``weights`` breaks a rule of :func:`~psyche.distro.codec.vote_weights` or a peer's
        list has the wrong length (both checked before anything changes), or a result's
        shape does not match its parameter.
        """
        votes = vote_weights(weights, len(results_from_all_peers))
        if not results_from_all_peers:
            return
        params = self._checked_params(results_from_all_peers)
        # On CPU a matmul or a sum cuts its work by the number of intra-op threads, and so
        # rounds differently on a machine (or a node rank) with another count: every node
        # applies with one thread, so all hold the same weights whatever their cores.
        with _one_cpu_thread(any(p.device.type == "cpu" for _, p in params)):
            self._step_weights(results_from_all_peers, votes)

    def _checked_params(self, results_from_all_peers: Sequence[Sequence[SparseResult]]) -> list[tuple[dict, torch.Tensor]]:
        """The parameters (with their groups); ``ValueError`` if a peer's list has the wrong length."""
        params = self._params()
        for peer, results in enumerate(results_from_all_peers):
            if len(results) != len(params):
                raise ValueError(f"peer {peer} sent {len(results)} results for {len(params)} parameters")
        return params

    def _step_weights(self, results_from_all_peers: Sequence[Sequence[SparseResult]], votes: list[float]) -> None:
        """:meth:`apply`'s update of every parameter, on torch's current threads, unchecked."""
        with torch.no_grad():
            for i, (group, p) in enumerate(self._params()):
                codec = self._codec(group["chunk"])
                update = codec.decode([peer[i] for peer in results_from_all_peers], p.shape, weights=votes)
                lr, wd = group["lr"] * group.get("lr_scale", 1.0), group["weight_decay"]
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                embedding = group.get("kind") == "embedding"
                if update.dim() == 2 and not embedding and group["matrix_update"] == "orthogonal":
                    update = orthogonalize(update)
                elif update.dim() == 2 and embedding and group["embedding_update"] == "row_rms":
                    update = row_normalize(update)
                else:
                    update = update.sign_()
                p.add_(update.to(p.dtype), alpha=-lr)

    @contextlib.contextmanager
    def lookahead(self, own: Sequence[SparseResult] | None) -> Iterator[bool]:
        """Inside the block, the weights are as if ``own`` (this peer's results still in flight)
        had been applied alone (:meth:`apply` ``([own])`` at the groups' current LR); on leaving it,
        however it is left, they are restored bit for bit. Yields whether anything was applied
        (``own`` None or empty: nothing, and nothing is copied).

        This is how an overlapped peer trains step ``t`` near the weights step ``t``'s results
        will really be applied to, rather than one step behind them: the gradients computed
        inside the block stay in ``.grad``, and only this peer's gradient depends on it, so the
        weights every peer holds stay bit-identical. The momentum is not touched. Nothing needs
        to agree with other peers here, so it runs on all of torch's threads (:meth:`apply` runs
        on one). ``ValueError`` (before anything changes) if ``own`` has the wrong length.
        """
        if not own:
            yield False
            return
        params = [p for _, p in self._checked_params([own])]
        saved = [p.detach().clone() for p in params]
        try:
            self._step_weights([own], [1.0])
            yield True
        finally:
            with torch.no_grad():
                for p, before in zip(params, saved):
                    p.copy_(before)

    @torch.no_grad()
    def step(self, closure=None):
        """One peer alone: ``apply([generate()])``. Returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply([self.generate()])
        return loss


@contextlib.contextmanager
def _one_cpu_thread(cpu: bool) -> Iterator[None]:
    """Torch's intra-op threads set to one inside the block when ``cpu`` (restored after)."""
    before = torch.get_num_threads()
    if cpu and before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def orthogonalize(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``m``'s orthogonal factor, approximately, scaled to RMS 1 (a zero matrix stays zero).

    Five Newton-Schulz iterations of the quintic Muon uses, whose coefficients
    push every singular value of the normalized ``m`` into roughly [0.7, 1.2]
    rather than exactly to 1: that is cheaper and trains as well. Deterministic
    for the same input on the same device.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.float() / (m.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        g = x @ x.T  # (r, r) with r = the shorter side
        x = a * x + (b * g + c * g @ g) @ x
    if tall:
        x = x.T
    return x / x.pow(2).mean().sqrt().clamp_min(1e-12)


def row_normalize(m: torch.Tensor) -> torch.Tensor:
    """``m`` with each row scaled to RMS 1 (a zero row stays zero).

    >>> row_normalize(torch.tensor([[2.0, -2.0], [0.0, 0.0], [0.5, 0.5]])).tolist()
    [[1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    return m / m.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)


def momentum_warmup_factor(steps_done: int, warmup_steps: int) -> float:
    """The fraction of the LR warmup done when ``steps_done`` optimizer steps are complete:
    ``steps_done / warmup_steps``, capped at 1 (1 when ``warmup_steps`` is 0).

    This is the one momentum-warmup rule: :meth:`DisTrO.generate` applies it for the
    client, ``psyche train`` and the simulated network alike. Steps are numbered from 1
    and the LR of step ``k`` is ``lr_at(k - 1)`` (:mod:`psyche.train.schedule`), whose
    linear warmup covers steps ``1 … warmup_steps``; step ``k`` generates with
    ``steps_done = k - 1``, i.e. after ``k - 1`` of those ``warmup_steps`` steps. So
    the factor is 0 at step 1, rises by ``1/warmup_steps`` a step, and reaches 1 at
    step ``warmup_steps + 1``, the first step at the peak LR, where the LR ramp ends
    too. (It is not the LR's own ramp position ``k / (warmup_steps + 1)``: that counts
    the step being trained as done.)

    >>> [momentum_warmup_factor(s, 4) for s in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    >>> momentum_warmup_factor(0, 0)
    1.0
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, steps_done / warmup_steps)


def warmup_decay(decay: float, warmup_factor: float) -> float:
    """The momentum decay to use when a fraction ``warmup_factor`` of the LR warmup is done.

    ``decay`` itself once warmup is over (``warmup_factor >= 1``); before that
    ``decay · (0.9 + 0.1 · warmup_factor^0.1)``, which rises from ``0.9·decay`` to
    ``decay``: early gradients change fast, so the momentum should forget them sooner.

    >>> warmup_decay(0.9, 1.0), round(warmup_decay(0.9, 0.0), 3)
    (0.9, 0.81)
    """
    if warmup_factor >= 1.0:
        return decay
    return decay * (0.9 + 0.1 * warmup_factor ** 0.1)


ParamKind = Literal["embedding", "matrix", "vector"]


def param_kind(name: str, p: torch.Tensor) -> ParamKind:
    """How :func:`param_groups` classes a named parameter.

    ``embedding``: token embeddings and the output head (names containing
    ``embed`` or ``lm_head``); ``vector``: other 1-D tensors (norm weights, biases);
    ``matrix``: everything else.
    """
    if "embed" in name or "lm_head" in name:
        return "embedding"
    return "vector" if p.dim() <= 1 else "matrix"


def param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    embedding_lr_scale: float = 1.0,
    matrix_lr_scale: float = 1.0,
    vector_lr_scale: float = 1.0,
) -> list[dict]:
    """Param groups for :class:`DisTrO` with one ``lr_scale`` per kind (see :func:`param_kind`).

    Groups come in the order embedding, matrix, vector, each keeping the
    parameters' own order; empty groups are left out. Parameters that do not
    require a gradient are skipped; a tied parameter seen twice counts once.
    Every peer of a run must build its groups the same way, since results are
    matched to parameters by position.
    """
    scales = {"embedding": embedding_lr_scale, "matrix": matrix_lr_scale, "vector": vector_lr_scale}
    members: dict[str, list[torch.Tensor]] = {k: [] for k in scales}
    seen: set[int] = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        members[param_kind(name, p)].append(p)
    return [{"params": ps, "lr_scale": scales[k], "kind": k} for k, ps in members.items() if ps]


class Overlap(Generic[T]):
    """Holds each step's results back one step: what is applied at ``t`` was generated at ``t−1``.

    >>> overlap = Overlap()
    >>> overlap.exchange(["r0"]) is None   # step 0: nothing to apply yet
    True
    >>> overlap.exchange(["r1"])           # step 1 applies step 0's results
    ['r0']
    """

    def __init__(self) -> None:
        self._pending: T | None = None

    def exchange(self, current: T) -> T | None:
        """Store ``current`` (all peers' results of this step); return the previous step's, or None."""
        previous, self._pending = self._pending, current
        return previous

    def flush(self) -> T | None:
        """The results still held back (e.g. at the end of a run), clearing them."""
        previous, self._pending = self._pending, None
        return previous
