"""Untrusted peers: does verification keep cheats' results out of the model?

Eight peers train one small LLaMA on the fortunes corpus in one process, through
the real verification path: a real :class:`~psyche.coordinator.Coordinator` cuts
each round's batch and picks each result's verifiers; every witness computes its
references and scores with :mod:`psyche.distro.verify` exactly as a client does
(:class:`~psyche.client.trainer.LocalTrainer` calls the same functions) and sends
them in its witness report; the coordinator condemns, and every peer applies only
``applied_trainers`` of each closed round. Only the P2P transfer is left out.

Runs, all at the same tokens: all honest; with 1 and with 2 adversaries of each kind
(:mod:`psyche.testing.adversaries`: negate, random, other_data, copy, stale, adaptive),
who turn bad from step ``--bad-from`` on; one lying verifier (it scores every result it
checks as low as it can) among honest trainers; and 2 negating adversaries with
verification off, for the harm it prevents.

Prints one JSON line: per run the final validation loss, its ``penalty`` (over the
all-honest run's, minus 1), the step each adversary was excluded at and how many steps
after its first bad result, and how many honest peers were excluded; ``worst_penalty_1``
and ``worst_penalty_2`` (the worst over kinds, with 1 and with 2 adversaries),
``max_steps_to_exclusion``, ``honest_excluded`` (over every run), and the verification
cost: the seconds the honest peers spent verifying over those they spent training,
with the share of forward-pass work it stands for.

    python bench/adversary.py                 # every run (about 45 minutes on 2 cores)
    python bench/adversary.py --quick         # all honest, 2 negate, 2 other_data, the liar (60 steps)
    python bench/adversary.py --only "liar,2x copy"   # the all-honest run and those
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Setup:
    peers: int = 8
    per_peer: int = 32
    seq_len: int = 64
    steps: int = 120
    bad_from: int = 30
    verifiers: int = 3
    seed: int = 0


@dataclass
class Outcome:
    name: str
    val_loss: float
    excluded_at: dict[int, int] = field(default_factory=dict)
    """peer -> the step its result was condemned at."""
    honest_excluded: int = 0
    train_seconds: float = 0.0
    verify_seconds: float = 0.0
    forward_share: list[float] = field(default_factory=list)


def run_name(*, kind: str | None = None, bad: int = 0, liar: bool = False, name: str = "", **_: object) -> str:
    """What a run is called in the report: ``name``, or e.g. ``2x negate``, ``liar``, ``honest``."""
    return name or (f"{bad}x {kind}" if kind else ("liar" if liar else "honest"))


def run(setup: Setup, *, kind: str | None = None, bad: int = 0, liar: bool = False,
        verify: bool = True, name: str = "") -> Outcome:
    """One run; peers ``0 .. bad-1`` are the adversaries (``kind``), peer ``peers-1`` the liar."""
    from psyche.client.trainer import LocalTrainer
    from psyche.coordinator import Coordinator, CoordinatorSettings, RunState
    from psyche.coordinator import queries as q
    from psyche.coordinator.verification import draw_sequences, wire_scores
    from psyche.distro import decode_payload, encode_payload
    from psyche.distro.verify import output_parameter, output_references, score_checks
    from psyche.testing import adversaries
    from psyche.testing.coordinator_swarm import Swarm, client_key
    from psyche.testing.distro_sim import SimConfig, _data, _lr_cfg, _model_cfg, build_distro
    from psyche.train import build_model
    from psyche.train.schedule import lr_at
    from psyche.train.step import compute_gradients, evaluate

    torch.manual_seed(setup.seed)
    cfg = SimConfig(peers=setup.peers, batch_per_peer=setup.per_peer, seq_len=setup.seq_len, steps=setup.steps,
                    seed=setup.seed)
    train, val, vocab = _data(cfg)
    model = build_model(_model_cfg(cfg, vocab))
    # One copy of the weights (every honest peer holds the same), one DisTrO momentum per peer.
    opts = [build_distro(cfg, model) for _ in range(setup.peers)]
    params = [(p, g["chunk"]) for g in opts[0].param_groups for p in g["params"]]
    layouts = opts[0].result_layouts()
    out_index = output_parameter(model, [p for p, _ in params])
    out_chunk = params[out_index][1]
    lr_cfg = _lr_cfg(cfg, cfg.lr_of_distro)
    settings = CoordinatorSettings(
        total_steps=setup.steps, init_min_clients=setup.peers, min_clients=2, epoch_time=10**9,
        global_batch_size_start=setup.peers * setup.per_peer, global_batch_size_end=setup.peers * setup.per_peer,
        seq_len=setup.seq_len, shares="even", verifiers=setup.verifiers if verify else 0,
        max_round_train_time=60, round_witness_time=5, warmup_time=10, cooldown_time=1)
    swarm = Swarm(Coordinator.new("adversary", settings, authority=bytes(32), now=0))
    swarm.join(range(setup.peers))
    if liar:
        swarm.liars.add(setup.peers - 1)
    keys = {client_key(i): i for i in range(setup.peers)}
    draw = random.Random(setup.seed)
    noise = torch.Generator().manual_seed(setup.seed)
    outcome = Outcome(run_name(kind=kind, bad=bad, liar=liar, name=name), 0.0)
    kept: dict[int, list] = {}  # stale: the result each adversary keeps republishing
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain)
    while swarm.coord.state.run_state is not RunState.Finished:
        s = swarm.coord.state
        rnd = q.current_round(s)
        if rnd is None or s.run_state is not RunState.RoundTrain:
            swarm.act()
            swarm.advance(1)
            continue
        step = rnd.step
        lr = lr_at(step - 1, lr_cfg, setup.steps)
        batches = {keys[b.client]: b for b in q.round_batches(s)}
        results: dict[int, list] = {}
        for peer, b in batches.items():
            cheating = peer < bad and step >= setup.bad_from
            t0 = time.perf_counter()
            first = b.start + (adversaries.OTHER_DATA_OFFSET if cheating and kind == "other_data" else 0)
            compute_gradients(model, train.batch(range(first, first + b.end - b.start)),
                              micro_batch_size=setup.per_peer, grad_clip=cfg.grad_clip)
            for g in opts[peer].param_groups:
                g["lr"] = lr
            results[peer] = decode_payload(encode_payload(opts[peer].generate(steps_done=step - 1)), layouts)
            model.zero_grad(set_to_none=True)
            if peer >= bad:
                outcome.train_seconds += time.perf_counter() - t0
        honest_now = [p for p in results if not (p < bad and step >= setup.bad_from)]
        for peer in list(results):
            if not (peer < bad and step >= setup.bad_from):
                kept[peer] = results[peer]
                continue
            if kind == "negate":
                results[peer] = adversaries.negate(results[peer])
            elif kind == "random":
                results[peer] = adversaries.random_signs(results[peer], noise)
            elif kind == "copy":
                results[peer] = results[honest_now[0]]
            elif kind == "stale":
                results[peer] = kept[peer]
            elif kind == "adaptive":
                results[peer] = adversaries.adaptive(results[peer], [results[p] for p in honest_now], out_index)
        # Every witness verifies what the coordinator assigned it, on the weights the round trained on.
        scores: dict[int, dict[int, int]] = {}
        for w in batches:
            checks = q.verification_checks(s, client_key(w))
            if not checks:
                continue
            t0 = time.perf_counter()
            own = batches[w].end - batches[w].start
            per_check = LocalTrainer.check_sequences(own, len(checks))
            picks = draw_sequences(checks, per_check, draw)
            refs = output_references(model, [train.batch(ix) for _, ix in picks], out_index, out_chunk)
            todo = [(ref, keys[c.trainer]) for ref, (c, _) in zip(refs, picks)]
            z = dict(zip([c.trainer for c, _ in picks], score_checks(todo, results)))
            scores[w] = dict(zip([c.position for c in checks], wire_scores(checks, z)))
            if w >= bad:
                outcome.verify_seconds += time.perf_counter() - t0
                outcome.forward_share.append(per_check * len(todo) / 3 / own)
        swarm.scorer = lambda w, c: scores[w][c.position]
        swarm.run_until(lambda c: c.state.step > step or c.state.run_state is RunState.Finished)
        s = swarm.coord.state
        applied = set(q.applied_trainers(s, step))
        for cid in q.condemned_trainers(s, step):
            peer = keys[cid]
            outcome.excluded_at[peer] = step
            if not (peer < bad):
                outcome.honest_excluded += 1
        order = sorted((b for b in q.round_batches(s, step) if b.client in applied), key=lambda b: b.start)
        for g in opts[0].param_groups:
            g["lr"] = lr
        opts[0].apply([results[keys[b.client]] for b in order])
    outcome.val_loss = evaluate(model, val, batches=cfg.eval_batches, batch_size=cfg.eval_batch_size)
    return outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 60 steps, a few runs")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--only", default="", help="comma-separated run names to keep (e.g. 'honest,1x adaptive')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from psyche.testing.adversaries import KINDS

    setup = Setup(steps=args.steps or (60 if args.quick else 120))
    if args.quick:
        setup.bad_from = 20
    plan: list[dict] = [dict()]
    kinds = ("negate", "other_data") if args.quick else KINDS
    for kind in kinds:
        for bad in ((2,) if args.quick else (1, 2)):
            plan.append(dict(kind=kind, bad=bad))
    plan.append(dict(liar=True))
    plan.append(dict(kind="negate", bad=2, verify=False, name="2x negate, unverified"))
    names = [run_name(**p) for p in plan]
    if args.only:
        keep = set(args.only.split(","))
        plan = [p for p, n in zip(plan, names) if n in keep or n == "honest"]
    t0 = time.perf_counter()
    outcomes = []
    for p in plan:
        o = run(setup, **p)
        outcomes.append((p, o))
        print(f"{o.name}: val {o.val_loss:.4f} excluded {o.excluded_at} honest excluded {o.honest_excluded} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    base = outcomes[0][1].val_loss
    runs = {}
    worst = {1: 0.0, 2: 0.0}
    steps_to: list[int] = []
    honest_excluded = 0
    train_s = verify_s = 0.0
    shares: list[float] = []
    for p, o in outcomes:
        penalty = o.val_loss / base - 1
        bad = p.get("bad", 0)
        row: dict = {"val_loss": round(o.val_loss, 4), "penalty": round(penalty, 4),
                     "honest_excluded": o.honest_excluded}
        if p.get("kind") and p.get("verify", True):
            after = {peer: o.excluded_at.get(peer) for peer in range(bad)}
            row["excluded_at_step"] = [after[i] for i in range(bad)]
            row["steps_after_first_bad"] = [None if v is None else v - setup.bad_from for v in after.values()]
            steps_to += [setup.steps if v is None else v - setup.bad_from for v in after.values()]
            worst[bad] = max(worst[bad], penalty)
        honest_excluded += o.honest_excluded
        train_s += o.train_seconds
        verify_s += o.verify_seconds
        shares += o.forward_share
        runs[o.name] = row
    print(json.dumps({
        "bench": "adversary",
        "peers": setup.peers, "sequences_per_peer": setup.per_peer, "seq_len": setup.seq_len, "steps": setup.steps,
        "bad_from_step": setup.bad_from, "verifiers_per_result": setup.verifiers,
        "honest_val_loss": round(base, 4),
        "runs": runs,
        "worst_penalty_1": round(worst[1], 4) if not args.quick else None,
        "worst_penalty_2": round(worst[2], 4),
        "max_steps_to_exclusion": max(steps_to) if steps_to else None,
        "honest_excluded": honest_excluded,
        "verify_seconds_over_train_seconds": round(verify_s / max(train_s, 1e-9), 4),
        "verify_forward_share_of_training": round(sum(shares) / max(len(shares), 1), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
