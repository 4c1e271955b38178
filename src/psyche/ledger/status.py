"""The JSON status of a run: what ``GET /api/runs/{run_id}``, the dashboard and ``psyche demo`` read.

Built from the coordinator state (the truth everyone agrees on) plus what the
server alone knows: when each step started, and the metrics clients reported.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

from psyche.coordinator import queries as q
from psyche.coordinator.state import ClientState, CoordinatorState, RunState

if TYPE_CHECKING:
    from psyche.config import RunConfig
    from psyche.coordinator import Coordinator
    from psyche.ledger.host import RunHost
    from psyche.ledger.store import Store


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


def run_summary(coord: Coordinator, cfg: RunConfig) -> dict:
    """One line of the runs list.

    ``clients``: members of the current epoch still Healthy (the ones training);
    ``waiting``: clients that joined and wait for the next epoch to start (ids in
    the full status's ``pending``); ``init_min_clients``: members needed to start
    the first epoch.
    """
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
        "tokens_trained": tokens,
        "tokens_per_sec": last.tokens_per_sec if last else None,
    }


def round_seconds(spans: dict[int, tuple[float, float | None]], step: int) -> float | None:
    """Wall seconds of ``step``'s round from :meth:`Store.step_times` spans (None if unfinished or unknown)."""
    started, ended = spans.get(step, (None, None))
    return ended - started if started is not None and ended is not None and ended > started else None


def history_rows(coord: Coordinator, store: Store | None, cfg: RunConfig, *, since_step: int = 0) -> list[dict]:
    """Per finished step from ``since_step`` on: loss, val_loss, tokens/s, bytes per step, clients.

    A caller that keeps older rows asks only for the recent ones (the dashboard
    does, so a long run's status is not rebuilt from every report each time).
    """
    if store is None:
        return []
    run_id = coord.state.run_id
    spans = store.step_times(run_id, since_step=since_step)
    by_step: dict[int, list[dict]] = defaultdict(list)
    for _, step, report, _ in store.reports(run_id, since_step=since_step):
        by_step[step].append(report)
    out = []
    last_step = coord.state.step - 1 if coord.state.run_state is not RunState.Finished else coord.state.settings.total_steps
    for step in sorted(by_step):
        if step > last_step:
            continue
        reports = by_step[step]
        tokens = sum(r.get("tokens", 0) for r in reports)
        losses = [(r["loss"], r.get("tokens", 1)) for r in reports if "loss" in r]
        loss = sum(l * w for l, w in losses) / max(1, sum(w for _, w in losses)) if losses else None
        vals = [r["val_loss"] for r in reports if "val_loss" in r]
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
            "val_loss": sum(vals) / len(vals) if vals else None,
            "tokens": tokens,
            "tokens_per_sec": tps,
            "bytes_per_step": sent,
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in reports),
            "clients": len(reports),
            "compression_ratio": (fp32_bytes_per_step(cfg) * len(reports) / sent) if sent else None,
        })
    return out


def run_status(host: RunHost, cfg: RunConfig, store: Store | None, *, now: float | None = None,
               history: list[dict] | None = None) -> dict:
    """The full status of a run (documented in the README under "Status API").

    ``history``, if given, is used instead of reading every report again."""
    coord = host.coordinator
    s = coord.state
    now_i = int(now if now is not None else time.time())
    pts = q.points(s)
    cur = q.current_round(s)
    trainers = set(q.round_trainers(s)) if cur else set()
    witnesses = set(q.round_witnesses(s)) if cur else set()
    last_reports: dict[bytes, dict] = {}
    busy: dict[bytes, float] = {}
    if store is not None:
        since = max(0, s.step - 3)
        spans = store.step_times(s.run_id, since_step=since)
        for signer, step, report, received in store.reports(s.run_id, since_step=since):
            last_reports[signer] = dict(report, received=received)
            seconds = round_seconds(spans, step)
            if "forward_backward_seconds" in report and seconds:
                # The share of the client's last finished round it spent in forward/backward.
                busy[signer] = report["forward_backward_seconds"] / seconds
    clients = []
    for c in s.clients:
        rep = last_reports.get(c.id, {})
        clients.append({
            "id": client_id(c.id),
            "state": c.state.value,
            "points": pts.get(c.id, 0),
            "role": "witness" if c.id in witnesses else ("trainer" if c.id in trainers else None),
            "bytes_sent": rep.get("bytes_sent_total"),
            "bytes_received": rep.get("bytes_received_total"),
            "upload_limit": rep.get("upload_limit"),
            "download_limit": rep.get("download_limit"),
            "last_seen": rep.get("received"),
            "utilization": busy.get(c.id),
        })
    if history is None:
        history = history_rows(coord, store, cfg)
    return {
        **run_summary(coord, cfg),
        "phase_time_left": q.time_left(s, now_i),
        "round": {"height": cur.height, "step": cur.step, "data_index": cur.data_index,
                  "batch_size": cur.batch_size, "witnesses": cur.witnesses} if cur else None,
        "clients": clients,
        "pending": [client_id(p) for p in s.pending],
        "accounts": [{"id": client_id(a.id), "points": a.points} for a in s.accounts],
        "witness_rounds": [
            {"epoch": r.epoch, "step": r.step, "trainers": r.trainers, "witnesses": r.witnesses,
             "reports": r.reports, "loss": r.loss, "tokens_per_sec": r.tokens_per_sec,
             "bandwidth_bytes": r.bandwidth_bytes}
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
        "rounds": round_outcomes(s),
    }


def round_outcomes(s: CoordinatorState) -> list[dict]:
    """Per stored round of this epoch (oldest first): its trainers and witnesses, and which
    trainers a witness quorum saw so far (final once ``closed``)."""
    out = []
    for r in s.rounds:
        batches = {b.client for b in q.round_batches(s, r.step)}
        out.append({
            "epoch": s.epoch,
            "step": r.step,
            "height": r.height,
            "trainers": [client_id(s.clients[i].id) for i in r.trainers if s.clients[i].id in batches],
            "witnesses": [client_id(w) for w in q.round_witnesses(s, r.step)],
            "reports": len(r.reports),
            "quorum": q.quorum(max(1, r.witnesses)),
            "seen": [client_id(c) for c in q.witnessed_trainers(s, r.step)],
            "closed": q.round_closed(s, r.step),
        })
    return out


def _short(raw: bytes) -> str:
    return raw.hex()[:8]


def run_events(before: CoordinatorState, after: CoordinatorState, *, name: str, origin: str | None = None) -> list[str]:
    """What happened to a run between two of its states, one line per event, for the server log.

    Joins (``origin``: where the request came from), members that left, epoch starts,
    finished steps (with the witnesses' mean loss and the trainer count), pause and
    resume, and the end of the run. Pure: the host keeps the states and writes the lines.
    """
    out: list[str] = []
    total = after.settings.total_steps
    members = {c.id: c for c in before.clients}
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
    for cid in before.pending:
        if cid not in after.pending and not (started and q.member(after, cid) is not None):
            out.append(f"client {_short(cid)} withdrew before its epoch started")
    before_addr = {a.id: a.p2p_address for a in before.accounts}
    after_addr = {a.id: a.p2p_address for a in after.accounts}
    for c in after.clients:
        old = members.get(c.id)
        if old is not None and old.state is ClientState.Healthy and c.state is ClientState.Healthy \
                and before_addr.get(c.id) != after_addr.get(c.id):
            out.append(f"client {_short(c.id)} re-registered its P2P address{where}")
    paused = after.run_state is RunState.Paused and before.run_state is not RunState.Paused
    if not paused:
        for c in after.clients:
            old = members.get(c.id)
            if old is not None and old.state is ClientState.Healthy and c.state is not ClientState.Healthy:
                what = {ClientState.Withdrawn: "withdrew", ClientState.Dropped: "was dropped"}.get(c.state, c.state.value)
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
