"""Unequal shares of the global batch: combine DisTrO results with equal votes or by tokens?

At equal total tokens (the same samples each step, only divided differently among
3 simulated peers, :mod:`psyche.testing.distro_sim`), three DisTrO runs per seed:

- ``equal_split``: every peer trains the same share (4 + 4 + 4 sequences a step); the
  combine rule makes no difference here (token votes are then equal, bit-identical runs);
- ``unequal_equal``: the shares ``--shares`` (default 5 + 5 + 2), every peer one vote;
- ``unequal_tokens``: the same shares, each peer's vote its tokens (``DisTrO.apply``'s ``weights``).

Prints one JSON line: ``val_loss`` (final validation loss of each run, one per seed),
``ratio_equal`` and ``ratio_tokens`` (``unequal_*`` over ``equal_split``, per seed, and
their means), ``tokens`` (the same for every run), ``peers_bit_identical`` (all runs) and
``distro_config`` (of the last run; the others differ only in ``shares`` and ``combine``).
Each run takes about a minute on one core at the default 150 steps.

    python bench/combine.py                     # seed 0, shares 5,5,2
    python bench/combine.py --seeds 0,1 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: distro_sim's quick size)")
    ap.add_argument("--shares", default="5,5,2", help="sequences each peer trains a step, comma-separated; "
                    "their sum is the global batch, split equally for the baseline")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (model init and data order)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from psyche.testing.distro_sim import QUICK_STEPS, config_from, run_distro

    shares = tuple(int(n) for n in args.shares.split(","))
    peers, total = len(shares), sum(shares)
    if total % peers:
        ap.error(f"--shares: their sum ({total}) must split equally among {peers} peers for the baseline")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps or QUICK_STEPS
    variants = {
        "equal_split": dict(batch_per_peer=total // peers),
        "unequal_equal": dict(shares=shares, combine="equal"),
        "unequal_tokens": dict(shares=shares, combine="tokens"),
    }
    t0 = time.perf_counter()
    val: dict[str, list[float]] = {name: [] for name in variants}
    tokens: set[int] = set()
    identical = True
    for seed in seeds:
        for name, split in variants.items():
            # Evaluate only at the start and the end (eval_every past the run), on the
            # validation set convergence_matrix uses (8 batches of 16 sequences).
            cfg = config_from(peers=peers, steps=steps, seed=seed, eval_every=10**9, eval_batches=8,
                              eval_batch_size=16, **split)
            run = run_distro(cfg)
            val[name].append(round(run.curve.final, 4))
            tokens.add(run.curve.tokens[-1])
            identical &= run.peers_bit_identical
            print(f"seed {seed} {name:>14} val {run.curve.final:.4f}", file=sys.stderr)
    if len(tokens) != 1:
        raise SystemExit(f"the runs trained different token counts: {sorted(tokens)}")

    def ratios(name: str) -> list[float]:
        return [round(u / e, 4) for u, e in zip(val[name], val["equal_split"])]

    ratio_equal, ratio_tokens = ratios("unequal_equal"), ratios("unequal_tokens")
    report = {
        "val_loss": val,
        "ratio_equal": ratio_equal,
        "ratio_tokens": ratio_tokens,
        "ratio_equal_mean": round(statistics.fmean(ratio_equal), 4),
        "ratio_tokens_mean": round(statistics.fmean(ratio_tokens), 4),
        "shares": list(shares),
        "equal_share": total // peers,
        "seeds": seeds,
        "steps": steps,
        "tokens": tokens.pop(),
        "peers_bit_identical": identical,
        "distro_config": cfg.distro_config(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
