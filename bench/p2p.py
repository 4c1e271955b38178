"""Benchmark: all-to-all result distribution over psyche.p2p (iroh QUIC) vs plain asyncio TCP.

N peers (4 and 8), each a separate process, publish one result blob each and
fetch every other peer's blob from its publisher, verifying the hash. Sizes:
300 KB (what the DisTrO codec emits per step for a ~100M-parameter model,
~0.003 bytes/param) and 3 MB (a ~1B model). The same processes then repeat the
pattern over plain asyncio TCP sockets (no encryption, no framing beyond a
length): ``ratio_vs_tcp`` = iroh per-peer MB/s ÷ TCP per-peer MB/s (1.0 = parity).

Prints one JSON line. ``--quick`` (or CI set) runs 4 peers and 300 KB only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from psyche.p2p.worker import close_all, connect_all, start_workers

RESULT_BYTES_100M = 300_000


def _all_to_all(workers, size: int, seed_base: int) -> tuple[float, float]:
    """Publish one blob per worker, then every worker fetches all others over iroh and TCP.
    Returns (iroh seconds, tcp seconds) from start to the last completion."""
    hashes = [w.call("publish", seed=seed_base + i, size=size)["hash"] for i, w in enumerate(workers)]
    items = lambda i: [(j, hashes[j]) for j in range(len(workers)) if j != i]  # noqa: E731

    t0 = time.perf_counter()
    rids = [w.send("fetch_many", timeout=300, items=[{"hash": h, "size": size, "providers": [workers[j].id.hex()]} for j, h in items(i)])
            for i, w in enumerate(workers)]
    for w, rid in zip(workers, rids):
        res = w.result(rid, 600)["results"]
        if not all(r["fetched"] for r in res):
            raise RuntimeError(f"iroh fetch failed: {[r for r in res if not r['fetched']][:1]}")
    t_iroh = time.perf_counter() - t0

    t0 = time.perf_counter()
    rids = [w.send("tcp_fetch", items=[{"port": workers[j].tcp_port, "hash": h, "size": size} for j, h in items(i)])
            for i, w in enumerate(workers)]
    for w, rid in zip(workers, rids):
        if not w.result(rid, 600)["ok"]:
            raise RuntimeError("tcp fetch returned wrong bytes")
    t_tcp = time.perf_counter() - t0
    return t_iroh, t_tcp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 peers, 300 KB only")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per configuration (best is kept)")
    args = ap.parse_args()
    quick = args.quick or bool(os.environ.get("CI"))
    peer_counts = [4] if quick else [4, 8]
    sizes = [RESULT_BYTES_100M] if quick else [RESULT_BYTES_100M, 3_000_000]

    results = []
    seed = 1
    for n in peer_counts:
        workers = start_workers(n, "bench-p2p", stall_timeout=10.0, connect_timeout=10.0)
        try:
            connect_all(workers)
            for w in workers:
                w.tcp_port = w.call("tcp_serve")["port"]
            for size in sizes:
                best_i, best_t = math.inf, math.inf
                for _ in range(args.reps):
                    ti, tt = _all_to_all(workers, size, seed)
                    seed += 100
                    best_i, best_t = min(best_i, ti), min(best_t, tt)
                per_peer = (n - 1) * size / 1e6
                results.append({
                    "peers": n,
                    "blob_bytes": size,
                    "iroh_s": round(best_i, 4),
                    "tcp_s": round(best_t, 4),
                    "iroh_MBps_per_peer": round(per_peer / best_i, 2),
                    "tcp_MBps_per_peer": round(per_peer / best_t, 2),
                    "ratio_vs_tcp": round(best_t / best_i, 3),
                })
        finally:
            close_all(workers)
    headline = next(r for r in results if r["blob_bytes"] == RESULT_BYTES_100M and r["peers"] == max(peer_counts))
    print(json.dumps({
        "bench": "p2p",
        "pattern": "each peer publishes one blob and fetches every other peer's from its publisher; hashes verified",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time_to_full_distribution_s": headline["iroh_s"],
        "MBps_per_peer": headline["iroh_MBps_per_peer"],
        "ratio_vs_tcp": headline["ratio_vs_tcp"],
        "headline": {"peers": headline["peers"], "blob_bytes": headline["blob_bytes"]},
        "results": results,
    }))


if __name__ == "__main__":
    sys.exit(main())
