"""What coordinating a run on Solana costs: transactions, bytes on chain, compute units.

For 3 and 32 clients, simulated participants (:class:`ChainSwarm`) drive one run
through whole rounds, every instruction a real signed transaction executed by
LiteSVM with our on-chain program, the state being the replay of the chain.
Ticks are sent only when a phase deadline passed. Prints one JSON line:

- ``tx_per_round_per_client``: transactions sent during rounds (RoundTrain and
  RoundWitness), per round, per client;
- ``bytes_per_round``: serialized transaction bytes those rounds put on chain,
  and ``payload_bytes_per_round``: the coordinator instructions' compact
  encodings alone (what the SQLite server host stores) — the baseline measured
  in the same run; ``bytes_overhead_ratio`` is their ratio (signature, account
  keys, blockhash, envelope);
- ``cu``: mean compute units the program used per instruction kind (from the
  transaction metadata), and ``max_tx_bytes`` against Solana's 1232-byte limit;
- ``scaling_32_vs_3``: the per-client transaction rate at 32 clients over 3.

    python bench/solana.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from psyche.coordinator import CoordinatorSettings, RunState
from psyche.ledger.solana.chain import ChainTx
from psyche.ledger.solana.validator import LocalValidator
from psyche.ledger.solana.wire import parse_envelope
from psyche.testing.solana_swarm import ChainSwarm

SOLANA_TX_LIMIT = 1232
ROUND_STATES = (RunState.RoundTrain, RunState.RoundWitness)


class MeasuredSwarm(ChainSwarm):
    """Remembers the run state each transaction was sent in."""

    def _send(self, ix, kp) -> tuple[ChainTx, bytes]:
        coord = getattr(self, "coord", None)
        state = coord.state.run_state if coord is not None else RunState.Uninitialized
        rec, block_hash = super()._send(ix, kp)
        self.sent.append((state, rec))
        return rec, block_hash

    def __init__(self, *args, **kwargs):
        self.sent: list[tuple[RunState, ChainTx]] = []
        super().__init__(*args, **kwargs)


def measure(clients: int, rounds: int, validator: LocalValidator) -> dict:
    settings = CoordinatorSettings(warmup_time=2, cooldown_time=1, max_round_train_time=3, round_witness_time=1,
                                   epoch_time=100_000, total_steps=rounds, init_min_clients=clients,
                                   min_clients=clients, waiting_for_members_extra_time=1,
                                   global_batch_size_start=2 * clients, global_batch_size_end=2 * clients)
    t0 = time.perf_counter()
    swarm = MeasuredSwarm(f"bench-{clients}", settings, clients=clients, validator=validator)
    swarm.join(range(clients))
    swarm.run_until(lambda c: c.state.run_state is RunState.Finished, max_seconds=100_000)
    wall = time.perf_counter() - t0
    in_rounds = [rec for state, rec in swarm.sent if state in ROUND_STATES]
    played = swarm.coord.state.step - 1
    cu: dict[str, list[int]] = defaultdict(list)
    for rec in swarm.fetched:
        for o in swarm.replay.outcomes[rec.signature]:
            if o.instruction is not None and rec.compute_units is not None:
                cu[o.instruction].append(rec.compute_units)
    payload = sum(len(parse_envelope(r.instructions[0].data).payload) for r in in_rounds)
    size = sum(r.size for r in in_rounds)
    return {
        "clients": clients,
        "rounds": played,
        "transactions": len(swarm.fetched),
        "failed_or_refused": sum(1 for outs in swarm.replay.outcomes.values() for o in outs if o.error),
        "tx_per_round_per_client": round(len(in_rounds) / played / clients, 3),
        "bytes_per_round": round(size / played),
        "payload_bytes_per_round": round(payload / played),
        "bytes_overhead_ratio": round(size / payload, 2),
        "max_tx_bytes": max(r.size for r in swarm.fetched),
        "cu": {k: round(statistics.mean(v)) for k, v in sorted(cu.items())},
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="optimizer steps (rounds) per run")
    args = parser.parse_args()
    validator = LocalValidator()  # one chain, both runs: the program is built and loaded once
    small, large = measure(3, args.rounds, validator), measure(32, args.rounds, validator)
    out = {
        "bench": "solana",
        "per_clients": {"3": small, "32": large},
        "scaling_32_vs_3": round(large["tx_per_round_per_client"] / small["tx_per_round_per_client"], 3),
        "solana_tx_limit": SOLANA_TX_LIMIT,
    }
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
