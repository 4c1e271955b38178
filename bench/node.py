"""A node of several ranks (``psyche client --nproc-per-node``) against one rank, on the same share.

Both are the client's real trainers: a :class:`~psyche.client.trainer.LocalTrainer` (one
rank) and a :class:`~psyche.client.ranks.NodeTrainer` (``--ranks`` ranks: this process and
its children, a gloo process group on CPU, NCCL on CUDA), on the demo's model
(``config/tiny-fortunes.toml``: a 1.85M-parameter LLaMA, context 128) and the fortunes
token data. Each step, one after the other (the other idles, so a change of load on the
machine falls on both), each trains the same ``--share`` sequences and applies its own
result, as a node alone in a run would; the two-rank node's next step then begins by
sending rank 0's new weights to its ranks, so that cost is in its figure.

- ``tokens_per_s_1_rank`` / ``tokens_per_s_N_ranks``: the share's target tokens over the
  seconds of :meth:`train` (data, forward and backward, the node's gradient sum, clipping,
  DisTrO's compression: what the run measures of a node), summed over the measured steps
  (the first step of each, which builds the DDP replica, is left out);
- ``speedup``: the ratio of the two (the baseline, one rank, in the same run); ``step_s_*``:
  the mean seconds of a measured step; ``sync_s_per_step_N_ranks``: of a step of the N-rank
  node, the seconds rank 0 spent giving its ranks the step's order and its new weights;
- ``bytes_per_step_*``: the result each publishes per step (what it sends each peer that
  fetches it): the network cost of a node, equal whatever its ranks.

That the two produce the same results is what ``tests/test_client_ranks.py`` checks (bit for
bit where each rank's part is one micro-batch and the thread counts match); here the thread
counts differ, so their forward passes may round differently.

Threads: on CPU the one-rank trainer uses every core (``torch.set_num_threads(cores)``),
each of the N ranks ``cores // N``: the same cores, so on a 2-core machine the speed-up is
bounded by what two processes gain over two threads, not by the number of ranks.

Prints one JSON line.

    python bench/node.py [--ranks 2] [--share 16] [--steps 8] [--device cpu|cuda]
    python bench/node.py --quick        # 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank node (default 2)")
    ap.add_argument("--share", type=int, default=16, help="sequences each node trains per step (default 16)")
    ap.add_argument("--steps", type=int, default=8, help="measured steps (default 8; one more warms up)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (ranks on cuda:0 .. cuda:N-1)")
    ap.add_argument("--quick", action="store_true", help="3 measured steps")
    a = ap.parse_args()
    if a.quick:
        a.steps = 3
    if a.ranks < 2 or a.share < 1 or a.steps < 1:
        ap.error("--ranks must be >= 2, --share and --steps >= 1")

    from psyche.client.ranks import NodeTrainer
    from psyche.client.trainer import LocalTrainer
    from psyche.config import load_config
    from psyche.data import ensure_default_dataset
    from psyche.demo import DEFAULT_CONFIG, demo_config
    from psyche.train.device import node_devices

    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    cfg = demo_config(load_config(DEFAULT_CONFIG), clients=1, steps=a.steps + 1, data_location=str(data))
    devices = node_devices(a.device, a.ranks)
    cores = os.cpu_count() or 1
    node = NodeTrainer(cfg, devices=devices)
    one = LocalTrainer(cfg, device=devices[0])
    threads = {"one": cores, "node": node.threads} if a.device == "cpu" else {"one": 1, "node": 1}
    try:
        for t in (one, node):
            t.init_model()
        seconds = {"one": 0.0, "node": 0.0}
        payload_bytes = {"one": 0, "node": 0}
        tokens = 0
        for step in range(1, a.steps + 2):
            start = (step - 1) * a.share
            outs = {}
            for name, trainer in (("one", one), ("node", node)):
                torch.set_num_threads(threads[name])
                out = trainer.train(step, start, start + a.share)
                trainer.apply(step, [out.payload])
                outs[name] = out
                if step > 1:  # step 1 builds the DDP replica and warms the allocators
                    seconds[name] += out.seconds
                    payload_bytes[name] += len(out.payload)
            if step > 1:
                tokens += outs["one"].tokens
            else:
                node.timer.reset()  # step 1 built the replicas: measured steps only from here
        rate = {k: tokens / v for k, v in seconds.items()}
        sync = node.timer.totals().get("ranks_sync", 0.0)
        n = a.ranks
        print(json.dumps({
            "bench": "node", "device": a.device, "machine": platform.machine(), "cores": cores,
            "params": one.parameters(), "seq_len": cfg.model.seq_len, "share_sequences": a.share,
            "micro_batch": cfg.optimizer.micro_batch_size, "steps": a.steps, "ranks": n,
            "threads_1_rank": threads["one"], f"threads_per_rank_{n}_ranks": threads["node"],
            "tokens_per_s_1_rank": round(rate["one"], 1), f"tokens_per_s_{n}_ranks": round(rate["node"], 1),
            "speedup": round(rate["node"] / rate["one"], 3),
            # Rank 0's seconds per measured step giving the ranks the order and its new weights.
            f"sync_s_per_step_{n}_ranks": round(sync / a.steps, 4),
            "step_s_1_rank": round(seconds["one"] / a.steps, 4), f"step_s_{n}_ranks": round(seconds["node"] / a.steps, 4),
            "bytes_per_step_1_rank": payload_bytes["one"] // a.steps,
            f"bytes_per_step_{n}_ranks": payload_bytes["node"] // a.steps,
            "bytes_per_param_step": round(payload_bytes["node"] / a.steps / one.parameters(), 5),
        }))
    finally:
        node.close()


if __name__ == "__main__":
    main()
