"""DisTrO (W peers, 1-bit, top-k) vs the best of an AdamW LR sweep at equal tokens.

Prints one JSON line (``distro_val_loss``, ``adamw_val_loss``, ``loss_ratio``,
``tokens``, ``peers``, ``distro_config``, ``adamw_lrs``, ...) and writes the
validation-loss curves to ``bench/out/convergence[_quick].png``. The simulation
itself is :mod:`psyche.testing.distro_sim`.

    python bench/convergence.py            # the full run (several minutes on 2 cores)
    python bench/convergence.py --quick    # CI-sized (about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--topk", type=int, default=None, help="DCT coefficients kept per chunk² (default: DisTrO's)")
    ap.add_argument("--full-precision", action="store_true", help="send values, not signs")
    ap.add_argument("--overlapped", action="store_true", help="apply step t-1's results at step t")
    ap.add_argument("--lr", type=float, default=None, help="DisTrO peak LR (default: DisTrO.DEFAULT_LR)")
    ap.add_argument("--decay", type=float, default=None, help="DisTrO momentum decay β")
    ap.add_argument("--matrix-update", choices=("orthogonal", "sign"), default=None,
                    help="how DisTrO steps weight matrices (default: orthogonal)")
    ap.add_argument("--embedding-lr-scale", type=float, default=None, help="DisTrO LR multiplier of the embeddings")
    ap.add_argument("--matrix-lr-scale", type=float, default=None, help="DisTrO LR multiplier of the matrices")
    ap.add_argument("--no-momentum-warmup", action="store_true", help="keep β fixed during the LR warmup")
    ap.add_argument("--grouped-adamw", action="store_true",
                    help="also sweep AdamW with a per-kind LR split, embeddings x2 and matrices x0.25 "
                         "(adamw_grouped_* fields)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from psyche.testing.distro_sim import FULL_STEPS, QUICK_STEPS, bench, config_from

    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    overrides = dict(steps=steps, peers=args.peers, one_bit=not args.full_precision, overlapped=args.overlapped)
    for key, value in (("topk", args.topk), ("distro_lr", args.lr), ("compression_decay", args.decay), ("matrix_update", args.matrix_update),
                       ("embedding_lr_scale", args.embedding_lr_scale), ("matrix_lr_scale", args.matrix_lr_scale)):
        if value is not None:
            overrides[key] = value
    if args.grouped_adamw:
        overrides["adamw_grouped"] = True
    if args.no_momentum_warmup:
        overrides["momentum_warmup"] = False
    cfg = config_from(**overrides)
    report = bench(cfg, out_dir=args.out, name="convergence_quick" if args.quick else "convergence",
                   on_eval=lambda name, step, loss: print(f"{name:>16} step {step:>5} val {loss:.4f}", file=sys.stderr))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
