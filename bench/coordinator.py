"""Coordinator cost per instruction: a round's witness reports and the tick that closes it.

For 8, 64 and 256 clients (witness_nodes = 0: every client up to 32 witnesses),
plays rounds on one coordinator and times only ``Coordinator.apply``: each
round is ``W`` Witness instructions (the quorum-th moves the run to
RoundWitness) plus the Tick that closes the round and starts the next (a
swap-or-not shuffle of all members). Witness Bloom filters are built outside
the timed region (that is client work). Prints one JSON line with µs per
instruction (mean over the round's instructions, and per kind), the ratio to
the 8-client figure, and each figure in units of one sha256 of 64 bytes timed
in the same run (a machine-independent yardstick).

Also timed, separately: what ``psyche server`` adds to each applied instruction to
log what changed (``CoordinatorServer.log_changes``: a copy of the new state and
``run_events`` against the previous one), as ``log_us_per_instruction`` and its
ratio to ``us_per_instruction`` in the same run (``log_over_apply``).

    python bench/coordinator.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

from psyche.coordinator import (
    BloomFilter,
    Coordinator,
    CoordinatorSettings,
    RunState,
    Tick,
    Witness,
    current_round,
    round_batches,
    round_witnesses,
)
from psyche.ledger.status import run_events
from psyche.testing.coordinator_swarm import Swarm, result_commitment


def sha256_us() -> float:
    data = bytes(64)
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(data).digest()
    return (time.perf_counter() - t0) / n * 1e6


def bench_clients(n: int, rounds: int) -> dict:
    settings = CoordinatorSettings(init_min_clients=n, min_clients=1, witness_nodes=0, epoch_time=10**9,
                                   max_round_train_time=60, round_witness_time=5, total_steps=10**6,
                                   global_batch_size_start=4 * n, global_batch_size_end=4 * n,
                                   waiting_for_members_extra_time=0, checkpointers=1, seq_len=2048)
    coord = Coordinator.new("bench", settings, authority=bytes(32), now=0)
    swarm = Swarm(coord)
    swarm.join(range(n))
    swarm.run_until(lambda c: c.state.run_state is RunState.RoundTrain)
    witness_ns: list[int] = []
    tick_ns: list[int] = []
    log_ns: list[int] = []
    logged = coord.copy()

    def log_changes() -> None:
        """What CoordinatorServer.log_changes does after each applied instruction."""
        nonlocal logged
        t0 = time.perf_counter_ns()
        after = coord.copy()
        run_events(logged.state, after.state, name="bench")
        logged = after
        log_ns.append(time.perf_counter_ns() - t0)

    now = swarm.now
    seed = hashlib.sha256(b"bench").digest()
    for _ in range(rounds):
        s = coord.state
        r = current_round(s)
        batches = round_batches(s)
        part = BloomFilter.for_items([b.client for b in batches]).to_bytes()
        bcast = BloomFilter.for_items([result_commitment(r.step, b.client, b.start, b.end) for b in batches]).to_bytes()
        reports = [(w, Witness(step=r.step, participant_bloom=part, broadcast_bloom=bcast,
                               broadcast_merkle=bytes(32), loss=2.0, tokens_per_sec=1e4, bandwidth_bytes=1 << 20))
                   for w in round_witnesses(s)]
        for signer, instr in reports:
            t0 = time.perf_counter_ns()
            err = coord.apply(instr, signer, now, seed)
            witness_ns.append(time.perf_counter_ns() - t0)
            assert err is None, err
            log_changes()
        now += settings.round_witness_time
        seed = hashlib.sha256(seed).digest()
        t0 = time.perf_counter_ns()
        err = coord.apply(Tick(), bytes(32), now, seed)
        tick_ns.append(time.perf_counter_ns() - t0)
        assert err is None and coord.state.run_state is RunState.RoundTrain, (err, coord.state.run_state)
        log_changes()
    per_round_ns = (sum(witness_ns) + sum(tick_ns)) / rounds
    instr_per_round = len(witness_ns) / rounds + 1
    return {
        "clients": n,
        "witnesses": len(witness_ns) // rounds,
        "us_per_instruction": round(per_round_ns / instr_per_round / 1e3, 2),
        "witness_us": round(statistics.median(witness_ns) / 1e3, 2),
        "tick_us": round(statistics.median(tick_ns) / 1e3, 2),
        "us_per_round": round(per_round_ns / 1e3, 1),
        "log_us_per_instruction": round(statistics.mean(log_ns) / 1e3, 2),
        "log_over_apply": round(statistics.mean(log_ns) / (per_round_ns / instr_per_round), 2),
        "state_bytes": len(coord.to_bytes()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    yardstick = sha256_us()
    results = [bench_clients(n, args.rounds) for n in (8, 64, 256)]
    base = results[0]["us_per_instruction"]
    out: dict = {"bench": "coordinator", "rounds": args.rounds, "sha256_64B_us": round(yardstick, 3)}
    for r in results:
        n = r.pop("clients")
        for k, v in r.items():
            out[f"c{n}_{k}"] = v
        out[f"c{n}_ratio_vs_c8"] = round(r["us_per_instruction"] / base, 2)
        out[f"c{n}_sha256_equiv"] = round(r["us_per_instruction"] / yardstick, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
