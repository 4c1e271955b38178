"""The JSON status of a run: what ``GET /api/runs/{run_id}``, the dashboard and ``psyche demo`` read.

Built from the coordinator state (the truth everyone agrees on) plus what the
server alone knows: when each step started, and the metrics clients reported.

The documents are plain dicts typed as :class:`RunSummary` and :class:`RunStatus`
(TypedDicts): the server declares them as its response models, so ``/docs`` and
``/openapi.json`` describe every field, and the dashboard builds on the same dicts
in-process. A number that comes from a client's report keeps the type the client
sent (:data:`Number`); what the server computes is typed exactly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic reads field types from it on Python < 3.12

from psyche.coordinator import access
from psyche.coordinator import queries as q
from psyche.coordinator.state import ClientState, CoordinatorState, Grant, Round, RunState
from psyche.coordinator.verification import CONDEMN_AT

if TYPE_CHECKING:
    from psyche.config import RunConfig
    from psyche.coordinator import Coordinator
    from psyche.ledger.host import RunHost
    from psyche.ledger.store import Store

Number = int | float
"""A metric as a client reported it (an int stays an int in the JSON)."""

_documented = with_config(ConfigDict(use_attribute_docstrings=True))


@_documented
class RunSummary(TypedDict):
    """One run of ``GET /api/runs``."""

    run_id: str
    name: str
    description: str
    state: str
    """The run state: Uninitialized, WaitingForMembers, Warmup, RoundTrain, RoundWitness, Cooldown, Finished or Paused."""
    epoch: int
    step: int
    """The coordinator's step: that of the current or next round (total_steps once Finished)."""
    steps_completed: int
    """Optimizer steps done: what the dashboard shows."""
    total_steps: int
    clients: int
    """Members of the current epoch still Healthy: the nodes training."""
    waiting: int
    """Clients that joined and wait for the next epoch to start (their ids: the full status's ``pending``)."""
    init_min_clients: int
    """Members needed to start the first epoch."""
    access: Literal["open", "gated"]
    """Who may join: any key, or only keys granted a join right (the config's ``coordinator.access``)."""
    tokens_trained: int
    tokens_per_sec: float | None
    """Of the last finished round, as its witnesses reported it."""


@_documented
class HistoryRow(TypedDict):
    """One finished step: what its trainers reported, summed or averaged."""

    step: int
    loss: float | None
    """Training loss, weighted by each trainer's tokens."""
    val_loss: float | None
    tokens: Number
    tokens_per_sec: Number | None
    """The whole network's: the step's tokens over its round's wall time (training, exchange, witnessing)."""
    bytes_per_step: Number
    """Compressed results published for the step."""
    bytes_sent: Number
    """P2P traffic of the step."""
    clients: int
    """Trainers that reported the step."""
    compression_ratio: float | None
    """Bytes an fp32 all-reduce would send over the results' bytes."""


@_documented
class ClientRow(TypedDict):
    """A member of the current epoch."""

    id: str
    """Its ed25519 public key, hex."""
    state: str
    """Healthy, Dropped, Withdrawn or Ejected."""
    points: int
    role: Literal["witness", "trainer"] | None
    """Its role in the current round."""
    bytes_sent: Number | None
    """P2P total, from its last report."""
    bytes_received: Number | None
    upload_limit: Number | None
    """The node's upload cap in bytes/s (null if none)."""
    download_limit: Number | None
    ranks: Number | None
    """Processes (one per device) training each step of the node (``psyche client --nproc-per-node``), from its last report."""
    last_seen: float | None
    """Server time of its last report."""
    utilization: float | None
    """The share of its last finished round spent in forward/backward."""
    share: int | None
    """Samples of the current round's batch it trains (0 if left out of the cut; null when
    there is no current round or it is not one of the round's members)."""
    share_fraction: float | None
    """``share`` as a fraction of the round's batch (null with ``share``)."""
    throughput: int | None
    """The coordinator's estimate of its speed in tokens per second of round time, learnt from
    witnessed deliveries; its share follows it (null while never measured)."""
    accepted_tokens: int
    """Tokens it trained this epoch whose results a witness quorum accepted (its points at the
    epoch's end follow them)."""
    suspicion: int
    """Accumulated shortfall of its verification scores (0: none; it is condemned at
    ``-verification_limit``; see ``psyche.coordinator.verification``)."""
    condemned_step: int | None
    """The step whose result verification condemned (its state is then Dropped: nobody applied that
    result, and it earns nothing this epoch); null if none."""


@_documented
class RoundInfo(TypedDict):
    """The current round."""

    height: int
    step: int
    data_index: int
    """The first sample index of the round's batch."""
    batch_size: int
    witnesses: int


class AccountRow(TypedDict):
    """A client that ever joined, with its reward points."""

    id: str
    points: int


class WitnessRound(TypedDict):
    """A finished round as its witnesses reported it (the coordinator's round stats)."""

    epoch: int
    step: int
    trainers: int
    witnesses: int
    reports: int
    loss: float | None
    tokens_per_sec: float | None
    bandwidth_bytes: int | None
    condemned: int
    """Results verification condemned in this round (applied by nobody)."""


@_documented
class CheckpointRow(TypedDict):
    """A checkpoint a client published at a cooldown."""

    epoch: int
    step: int
    location: str
    sha256: str
    client: str
    """The id of the client that wrote it."""


@_documented
class RoundOutcome(TypedDict):
    """A stored round of this epoch: who trained, who witnessed, whom a witness quorum saw."""

    epoch: int
    step: int
    height: int
    trainers: list[str]
    witnesses: list[str]
    reports: int
    """Witness reports received."""
    quorum: int
    """Witness reports needed to accept a trainer's result."""
    seen: list[str]
    """Trainers a witness quorum saw so far (final once ``closed``)."""
    closed: bool


@_documented
class GrantRow(TypedDict):
    """A key's join right (or delegation to grant) in a gated run."""

    id: str
    expires_at: int | None
    """Unix second its term ends (null: until revoked)."""


@_documented
class RunStatus(TypedDict):
    """``GET /api/runs/{run_id}``: the fields of :class:`RunSummary` (``clients`` listed
    instead of counted) and the run's members, history, checkpoints and config."""

    run_id: str
    name: str
    description: str
    state: str
    epoch: int
    step: int
    steps_completed: int
    total_steps: int
    clients: list[ClientRow]
    waiting: int
    init_min_clients: int
    access: Literal["open", "gated"]
    tokens_trained: int
    tokens_per_sec: float | None
    grants: list[GrantRow]
    """Gated runs: the keys granted a join right, with their terms (open runs: empty)."""
    authorizers: list[GrantRow]
    """Gated runs: the keys the authority delegated granting to."""
    shares: Literal["speed", "even"]
    """How each round's batch is cut among its trainers: in proportion to each one's ``throughput``,
    or equally (the config's ``coordinator.shares``)."""
    requeued_samples: int
    """Samples of batches whose trainer missed its round, waiting to be trained whole by a later one."""
    verifiers: int
    """Witnesses that check each result against its trainer's data each round (0: no verification;
    the config's ``coordinator.verifiers``)."""
    verification_limit: int
    """The suspicion at which a trainer's result is condemned (its negative)."""
    phase_time_left: int | None
    """Seconds left in the current phase (null where the phase has no deadline)."""
    round: RoundInfo | None
    pending: list[str]
    """Ids of the ``waiting`` clients, in join order."""
    accounts: list[AccountRow]
    witness_rounds: list[WitnessRound]
    checkpoints: list[CheckpointRow]
    history: list[HistoryRow]
    fp32_bytes_per_step: int
    """Bytes one peer would send per step in an fp32 all-reduce of the model's gradients."""
    config: dict[str, Any]
    """The run config (see ``psyche.config.RunConfig``)."""
    seq: int
    """Instructions applied so far."""
    digest: str
    """Hex digest of the coordinator state: equal on every replica."""
    phase_deadline: int | None
    """When the phase ends, on the server clock (unix seconds)."""
    server_time: float
    """The server clock when this was built: a page counts ``phase_deadline`` down on its own."""
    rounds: list[RoundOutcome]
    inference_url: str | None
    """Where the run's model answers: the root of an OpenAI-compatible server (``psyche serve``;
    completions at ``{inference_url}/v1/completions``), as ``psyche server --inference-url`` gave
    it; null if none is configured. The dashboard's "Try it" box streams from it."""


def client_id(raw: bytes) -> str:
    """How a client id is shown: its 32-byte key in hex."""
    return raw.hex()


def fp32_bytes_per_step(cfg: RunConfig) -> int:
    """Bytes one peer would send per step in an fp32 all-reduce of this model's gradients."""
    m = cfg.model
    h, v, i, n = m.hidden_size, m.vocab_size, m.intermediate_size, m.num_hidden_layers
    kv = h // m.num_attention_heads * m.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    params = v * h * (1 if m.tie_word_embeddings else 2) + n * per_layer + h
    return 4 * params


def run_summary(coord: Coordinator, cfg: RunConfig) -> RunSummary:
    """One line of the runs list (its fields: :class:`RunSummary`)."""
    s = coord.state
    healthy = len(q.healthy_clients(s))
    last = s.stats[-1] if s.stats else None
    tokens = s.next_data_index * s.settings.seq_len
    return {
        "run_id": s.run_id,
        "name": cfg.name,
        "description": cfg.description,
        "state": s.run_state.value,
        "epoch": s.epoch,
        "step": min(s.step, s.settings.total_steps) if s.run_state is RunState.Finished else s.step,
        "steps_completed": q.steps_completed(s),
        "total_steps": s.settings.total_steps,
        "clients": healthy,
        "waiting": len(s.pending),
        "init_min_clients": s.settings.init_min_clients,
        "access": "gated" if access.gated(s) else "open",
        "tokens_trained": tokens,
        "tokens_per_sec": last.tokens_per_sec if last else None,
    }


def round_seconds(spans: dict[int, tuple[float, float | None]], step: int) -> float | None:
    """Wall seconds of ``step``'s round from :meth:`Store.step_times` spans (None if unfinished or unknown)."""
    started, ended = spans.get(step, (None, None))
    return ended - started if started is not None and ended is not None and ended > started else None


def history_rows(coord: Coordinator, store: Store | None, cfg: RunConfig, *, since_step: int = 0,
                 steps: Collection[int] | None = None) -> list[HistoryRow]:
    """Per finished step from ``since_step`` on (or of ``steps`` only): loss, val_loss, tokens/s,
    bytes per step, clients.

    A caller that keeps older rows asks only for the ones that changed (:class:`StatusCache`
    does, so a long run's status is not rebuilt from every report each time).
    """
    if store is None:
        return []
    run_id = coord.state.run_id
    spans = store.step_times(run_id, since_step=since_step if not steps else max(since_step, min(steps)))
    by_step: dict[int, list[dict]] = defaultdict(list)
    for _, step, report, _ in store.reports(run_id, since_step=since_step, steps=steps):
        by_step[step].append(report)
    out: list[HistoryRow] = []
    last_step = coord.state.step - 1 if coord.state.run_state is not RunState.Finished else coord.state.settings.total_steps
    for step in sorted(by_step):
        if step > last_step:
            continue
        reports = by_step[step]
        tokens = sum(r.get("tokens", 0) for r in reports)
        losses = [(r["loss"], r.get("tokens", 1)) for r in reports if "loss" in r]
        loss = sum(l * w for l, w in losses) / max(1, sum(w for _, w in losses)) if losses else None
        # Each trainer measures a slice of the validation set (older clients: all of it).
        vals = [(r["val_loss"], r.get("val_tokens", 1)) for r in reports if "val_loss" in r]
        # Tokens/s of the whole network: the step's tokens over the wall time of its round
        # (training, exchange and witnessing included).
        seconds = round_seconds(spans, step)
        tps = tokens / seconds if seconds else None
        if tps is None:
            per_client = [r["tokens_per_sec"] for r in reports if "tokens_per_sec" in r]
            tps = sum(per_client) if per_client else None
        sent = sum(r.get("result_bytes", 0) for r in reports)
        out.append({
            "step": step,
            "loss": loss,
            "val_loss": sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else None,
            "tokens": tokens,
            "tokens_per_sec": tps,
            "bytes_per_step": sent,
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in reports),
            "clients": len(reports),
            "compression_ratio": (fp32_bytes_per_step(cfg) * len(reports) / sent) if sent else None,
        })
    return out


MAX_STALE_STEPS = 512
"""Past this many changed steps, :class:`StatusCache` reads the whole history again (one query)."""


class StatusCache:
    """What building a run's status computes that does not change with every build.

    Each member's latest report, the history rows by step, and each stored round's witness
    outcome. The host tells it of every report it stores (:meth:`added`); a build then
    re-reads from the store only the steps that got reports or whose round span changed
    since the last build, and tests Bloom filters only for rounds that got reports since. So
    a status of 256 members costs the same at step 10 and at step 10,000 (it used to decode
    every stored report, and test every trainer against every witness's filter, each time).
    """

    def __init__(self) -> None:
        self._latest: dict[bytes, tuple[int, dict, float]] | None = None
        self._rows: dict[int, HistoryRow] | None = None
        self._spans: dict[int, tuple[float, float | None]] = {}
        self._touched: set[int] = set()
        self._last_step = 0
        self._outcomes: dict[tuple[int, int, int, bool], RoundOutcome] = {}

    def added(self, signer: bytes, step: int, report: dict, received: float) -> None:
        """A report the store just took (it replaces the signer's report of that step, if any)."""
        if self._latest is not None:
            seen = self._latest.get(signer)
            if seen is None or step >= seen[0]:
                self._latest[signer] = (step, report, received)
        self._touched.add(step)

    def latest(self, store: Store, run_id: str) -> dict[bytes, tuple[int, dict, float]]:
        """Each signer's report of its highest step: (step, report, received)."""
        if self._latest is None:
            self._latest = {}
            for signer, step, report, received in store.reports(run_id):  # by step: the highest wins
                self._latest[signer] = (step, report, received)
        return self._latest

    def history(self, coord: Coordinator, store: Store, cfg: RunConfig) -> list[HistoryRow]:
        """:func:`history_rows` of the whole run, rebuilding only the rows that changed."""
        s = coord.state
        # A step's span is final once it ended, and every step up to the last build's had: only
        # the later ones are read again (a long run's status need not read all its steps).
        spans = store.step_times(s.run_id, since_step=self._last_step)
        last_step = s.step - 1 if s.run_state is not RunState.Finished else s.settings.total_steps
        stale = self._touched | {k for k, span in spans.items() if self._spans.get(k) != span}
        stale |= set(range(self._last_step + 1, last_step + 1))  # steps finished since: rows now due
        if self._rows is None or last_step < self._last_step or len(stale) > MAX_STALE_STEPS:
            self._rows = {r["step"]: r for r in history_rows(coord, store, cfg)}
        else:
            if stale:
                for k in stale:
                    self._rows.pop(k, None)
                self._rows.update((r["step"], r) for r in history_rows(coord, store, cfg, steps=stale))
        self._spans, self._touched, self._last_step = spans, set(), last_step
        return [self._rows[k] for k in sorted(self._rows)]

    def outcomes(self, s: CoordinatorState) -> list[RoundOutcome]:
        """:func:`round_outcomes`, each round's computed again only once it got another report or closed."""
        out: list[RoundOutcome] = []
        keys = []
        for r in s.rounds:
            key = (s.epoch, r.step, len(r.reports), q.round_closed(s, r.step))
            if key not in self._outcomes:
                self._outcomes[key] = round_outcome(s, r)
            keys.append(key)
            out.append(self._outcomes[key])
        self._outcomes = {k: self._outcomes[k] for k in keys}
        return out


def run_status(host: RunHost, cfg: RunConfig, store: Store | None, *, now: float | None = None,
               cache: StatusCache | None = None, inference_url: str | None = None) -> RunStatus:
    """The full status of a run (its fields: :class:`RunStatus`).

    ``cache``, if given, keeps what does not change between builds (the server keeps one per
    run); without it everything is read and computed again. ``inference_url``: where the run's
    model answers completions, if anywhere (the server's ``--inference-url``)."""
    coord = host.coordinator
    s = coord.state
    now_i = int(now if now is not None else time.time())
    pts = q.points(s)
    cur = q.current_round(s)
    trainers = set(q.round_trainers(s)) if cur else set()
    witnesses = set(q.round_witnesses(s)) if cur else set()
    last_reports: dict[bytes, dict] = {}
    busy: dict[bytes, float] = {}
    history: list[HistoryRow] = []
    if store is not None:
        if cache is not None:
            latest: Mapping[bytes, tuple[int, dict, float]] = cache.latest(store, s.run_id)
            history = cache.history(coord, store, cfg)
        else:
            latest = {signer: (step, report, received)
                      for signer, step, report, received in store.reports(s.run_id, since_step=max(0, s.step - 3))}
            history = history_rows(coord, store, cfg)
        members = {c.id for c in s.clients}
        mine = {signer: seen for signer, seen in latest.items() if signer in members}
        spans = store.step_times(s.run_id, since_step=min((step for step, _, _ in mine.values()), default=0))
        for signer, (step, report, received) in mine.items():
            last_reports[signer] = dict(report, received=received)
            seconds = round_seconds(spans, step)
            if "forward_backward_seconds" in report and seconds:
                # The share of the client's last finished round it spent in forward/backward.
                busy[signer] = report["forward_backward_seconds"] / seconds
    shares = {sh.client: sh for sh in q.round_shares(s)} if cur else {}
    clients: list[ClientRow] = []
    for c in s.clients:
        rep = last_reports.get(c.id, {})
        share = shares.get(c.id)
        clients.append({
            "id": client_id(c.id),
            "state": c.state.value,
            "points": pts.get(c.id, 0),
            "role": "witness" if c.id in witnesses else ("trainer" if c.id in trainers else None),
            "bytes_sent": rep.get("bytes_sent_total"),
            "bytes_received": rep.get("bytes_received_total"),
            "upload_limit": rep.get("upload_limit"),
            "download_limit": rep.get("download_limit"),
            "ranks": rep.get("ranks"),
            "last_seen": rep.get("received"),
            "utilization": busy.get(c.id),
            "share": share.samples if share is not None else None,
            "share_fraction": share.fraction if share is not None else None,
            "throughput": c.throughput or None,
            "accepted_tokens": c.tokens,
            "suspicion": c.suspicion,
            "condemned_step": c.condemned_step or None,
        })
    return {
        **run_summary(coord, cfg),
        "clients": clients,  # listed here, counted in the summary (the key keeps the summary's place)
        "shares": cfg.coordinator.shares,
        "requeued_samples": sum(p.size for p in s.requeued),
        "verifiers": cfg.coordinator.verifiers,
        "verification_limit": CONDEMN_AT,
        "phase_time_left": q.time_left(s, now_i),
        "round": {"height": cur.height, "step": cur.step, "data_index": cur.data_index,
                  "batch_size": cur.batch_size, "witnesses": cur.witnesses} if cur else None,
        "pending": [client_id(p) for p in s.pending],
        "grants": [{"id": client_id(g.key), "expires_at": g.expires_at or None} for g in s.grants],
        "authorizers": [{"id": client_id(g.key), "expires_at": g.expires_at or None} for g in s.authorizers],
        "accounts": [{"id": client_id(a.id), "points": a.points} for a in s.accounts],
        "witness_rounds": [
            {"epoch": r.epoch, "step": r.step, "trainers": r.trainers, "witnesses": r.witnesses,
             "reports": r.reports, "loss": r.loss, "tokens_per_sec": r.tokens_per_sec,
             "bandwidth_bytes": r.bandwidth_bytes, "condemned": r.condemned}
            for r in q.round_stats(s)
        ],
        "checkpoints": [{"epoch": c.epoch, "step": c.step, "location": c.location,
                         "sha256": c.sha256.hex(), "client": client_id(c.client)} for c in s.checkpoints],
        "history": history,
        "fp32_bytes_per_step": fp32_bytes_per_step(cfg),
        "config": cfg.model_dump(mode="json"),
        "seq": host.seq,
        "digest": coord.digest(),
        # For live views: the phase's end on the server clock and that clock, so a page
        # counts the time left down on its own between pushes.
        "phase_deadline": q.phase_deadline(s),
        "server_time": now if now is not None else time.time(),
        "rounds": cache.outcomes(s) if cache is not None else round_outcomes(s),
        "inference_url": inference_url,
    }


def round_outcomes(s: CoordinatorState) -> list[RoundOutcome]:
    """Per stored round of this epoch (oldest first): its trainers and witnesses, and which
    trainers a witness quorum saw so far (final once ``closed``)."""
    return [round_outcome(s, r) for r in s.rounds]


def round_outcome(s: CoordinatorState, r: Round) -> RoundOutcome:
    """One stored round's trainers, witnesses, and the trainers a witness quorum saw so far."""
    batches = {b.client for b in q.round_batches(s, r.step)}
    return {
        "epoch": s.epoch,
        "step": r.step,
        "height": r.height,
        "trainers": [client_id(s.clients[i].id) for i in r.trainers if s.clients[i].id in batches],
        "witnesses": [client_id(w) for w in q.round_witnesses(s, r.step)],
        "reports": len(r.reports),
        "quorum": q.quorum(max(1, r.witnesses)),
        "seen": [client_id(c) for c in q.witnessed_trainers(s, r.step)],
        "closed": q.round_closed(s, r.step),
    }


def _short(raw: bytes) -> str:
    return raw.hex()[:8]


def _grant_events(before: list[Grant], after: list[Grant], what: str) -> list[str]:
    """Lines for the grants (or delegations) given, renewed and taken back between two lists."""
    old = {g.key: g.expires_at for g in before}
    new = {g.key: g.expires_at for g in after}
    out = [f"{what} for {_short(k)} {'renewed' if k in old else 'given'}, "
           f"{'without end' if t == 0 else f'until {t}'}" for k, t in new.items() if old.get(k, -1) != t]
    out += [f"{what} for {_short(k)} revoked (or lapsed)" for k in old if k not in new]
    return out


def run_events(before: CoordinatorState, after: CoordinatorState, *, name: str, origin: str | None = None) -> list[str]:
    """What happened to a run between two of its states, one line per event, for the server log.

    Joins (``origin``: where the request came from), members that left, epoch starts,
    finished steps (with the witnesses' mean loss and the trainer count), pause and
    resume, and the end of the run. Pure: the host keeps the states and writes the lines.
    """
    out: list[str] = []
    total = after.settings.total_steps
    # Most changes (a witness report) leave every member and account as it was; the scans
    # of them below, most of this function's cost at hundreds of clients, run only when
    # their list changed (comparing the lists is done in C by msgspec).
    members_changed = before.clients != after.clients
    accounts_changed = before.accounts != after.accounts
    members = {c.id: c for c in before.clients} if members_changed or accounts_changed else {}
    where = f" from {origin}" if origin else ""
    for cid in after.pending:
        if cid in before.pending:
            continue
        if after.run_state is RunState.WaitingForMembers:
            have = len(q.healthy_clients(after)) + len(after.pending)
            out.append(f"client {_short(cid)} joined{where} for epoch {after.epoch} "
                       f"({have} joined, {after.settings.init_min_clients} needed to start)")
        else:
            out.append(f"client {_short(cid)} joined{where}; it waits for epoch {after.epoch} to end")
    started = after.run_state is RunState.Warmup and (before.run_state is not RunState.Warmup or before.epoch != after.epoch)
    gone = [cid for cid in before.pending if cid not in after.pending]
    if started:
        left_out = sum(1 for cid in gone if q.member(after, cid) is None)
        if left_out:
            out.append(f"{left_out} waiting client(s) not admitted to epoch {after.epoch} (fresh keys enter in "
                       "bounded numbers); they join again for the next")
    elif len(before.pending) >= access.MAX_PENDING and len(gone) == 1 and len(after.pending) == len(before.pending):
        out.append(f"client {_short(gone[0])} left the full waiting list to a newer join")
    else:
        for cid in gone:
            revoked = any(g.key == cid for g in before.grants) and not any(g.key == cid for g in after.grants)
            out.append(f"client {_short(cid)} {'lost its join right' if revoked else 'withdrew'} before its epoch started")
    if before.grants != after.grants or before.authorizers != after.authorizers:
        out.extend(_grant_events(before.grants, after.grants, "join right"))
        out.extend(_grant_events(before.authorizers, after.authorizers, "delegation to grant"))
    if accounts_changed:
        before_addr = {a.id: a.p2p_address for a in before.accounts}
        after_addr = {a.id: a.p2p_address for a in after.accounts}
        for c in after.clients:
            old = members.get(c.id)
            if old is not None and old.state is ClientState.Healthy and c.state is ClientState.Healthy \
                    and before_addr.get(c.id) != after_addr.get(c.id):
                out.append(f"client {_short(c.id)} re-registered its P2P address{where}")
    paused = after.run_state is RunState.Paused and before.run_state is not RunState.Paused
    if members_changed and not paused:
        for c in after.clients:
            old = members.get(c.id)
            if old is not None and old.state is ClientState.Healthy and c.state is not ClientState.Healthy:
                what = {ClientState.Withdrawn: "withdrew", ClientState.Dropped: "was dropped",
                        ClientState.Ejected: "was ejected (its join right revoked)"}.get(c.state, c.state.value)
                out.append(f"client {_short(c.id)} {what} in epoch {after.epoch} "
                           f"({len(q.healthy_clients(after))} healthy members left)")
    last_before = (before.stats[-1].epoch, before.stats[-1].step) if before.stats else None
    for st in after.stats:
        if last_before is not None and (st.epoch, st.step) <= last_before:
            continue
        loss = f", loss {st.loss:.4f}" if st.loss is not None else ""
        out.append(f"step {st.step}/{total} finished{loss}, {st.trainers} trainers")
    if started:
        out.append(f"epoch {after.epoch} started with {len(after.clients)} members: "
                   + ", ".join(_short(c.id) for c in after.clients))
    if before.run_state is RunState.Warmup and after.run_state is RunState.WaitingForMembers:
        out.append(f"epoch {after.epoch} did not start: fewer than min_clients = {after.settings.min_clients} "
                   "members were ready; waiting for members again")
    if after.pause_pending and not before.pause_pending:
        out.append("pause requested: the run pauses at the end of the current round")
    if paused:
        out.append(f"run {name} paused after step {q.steps_completed(after)}; every member withdrew")
    if before.run_state is RunState.Paused and after.run_state is not RunState.Paused:
        out.append(f"run {name} resumed after step {q.steps_completed(after)}; waiting for members to join again")
    if after.run_state is RunState.Finished and before.run_state is not RunState.Finished:
        out.append(f"run {name} finished at step {q.steps_completed(after)}")
    return out
