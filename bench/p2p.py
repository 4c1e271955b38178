"""Benchmark: result distribution and model sharing over psyche.p2p (iroh QUIC), against plain TCP.

**Results**: N peers (4 and 8), each a separate process, publish one result blob
each and fetch every other peer's blob from its publisher, verifying the hash.
Sizes: 300 KB (what the DisTrO codec emits per step for a ~100M-parameter model,
~0.003 bytes/param) and 3 MB (a ~1B model). The same processes then repeat the
pattern over plain asyncio TCP sockets (no encryption, no framing beyond a
length): ``ratio_vs_tcp`` = iroh per-peer MB/s ÷ TCP per-peer MB/s (1.0 = parity);
and over bare iroh streams from a second endpoint in each process (request = the
hash, reply = the blob, through the same transport adapter but none of the node's
framing, checks or bookkeeping): ``ratio_vs_bare_iroh`` = bare seconds ÷ node
seconds (1.0: the node adds nothing to what the transport costs). The headline
is 8 peers × 3 MB.

**Model sharing**: 3 processes serve a ~106M-parameter LLaMA (float32, 423 MB);
a 4th joins as a client does: it builds the model and fetches the weights from
all three into the model's own memory. ``model_share_MBps`` is the manifest's
bytes over the fetch time; ``joiner_peak_rss_over_model`` is the joiner's peak
RSS growth (model built + fetched) over the model's bytes. The same joiner then
fetches into separate buffers and loads them (the path before sinks).

**Before**: the headline results pattern and a smaller model share are run
again with ``PSYCHE_IROH_FAST_COPY=0``, i.e. with the iroh bindings' own per-byte
copy, in the same run.

Prints one JSON line. ``--quick`` (or CI set) runs 4 peers, 300 KB and a ~13M model, no before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from psyche.p2p.iroh_transport import FAST_BUFFER_COPY, FAST_COPY_ENV
from psyche.testing.p2p_worker import close_all, connect_all, start_workers

RESULT_BYTES_100M = 300_000
RESULT_BYTES_1B = 3_000_000
# ~106M parameters untied (423 MB in float32); the quick one ~13M, the "before" one ~30M
LLAMA_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=12)
LLAMA_SMALL = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=6, num_key_value_heads=6)
LLAMA_BEFORE = dict(LLAMA_SMALL, vocab_size=32000)


def _all_to_all(workers, size: int, seed_base: int) -> tuple[float, float, float]:
    """Publish one blob per worker, then every worker fetches all others over psyche.p2p, plain TCP
    and bare iroh streams. Returns (p2p seconds, tcp seconds, bare iroh seconds), each from start to
    the last completion."""
    hashes = [w.call("publish", seed=seed_base + i, size=size)["hash"] for i, w in enumerate(workers)]

    def timed(cmd: str, item, ok, what: str, **args) -> float:
        """Every worker runs ``cmd`` over ``item(publisher, hash)`` for all others' blobs at once."""
        t0 = time.perf_counter()
        rids = [w.send(cmd, items=[item(p, h) for p, h in zip(workers, hashes) if p is not w], **args) for w in workers]
        for w, rid in zip(workers, rids):
            reply = w.result(rid, 600)
            if not ok(reply):
                raise RuntimeError(f"{what} failed: {reply}"[:300])
        return time.perf_counter() - t0

    t_iroh = timed("fetch_many", lambda p, h: {"hash": h, "size": size, "providers": [p.id.hex()]},
                   lambda r: all(x["fetched"] for x in r["results"]), "iroh fetch", timeout=300)
    t_tcp = timed("tcp_fetch", lambda p, h: {"port": p.tcp_port, "hash": h, "size": size}, lambda r: r["ok"], "tcp fetch")
    t_raw = timed("raw_fetch", lambda p, h: {"raw_id": p.raw_id, "raw_address": p.raw_address, "hash": h, "size": size},
                  lambda r: r["ok"], "bare iroh fetch")
    return t_iroh, t_tcp, t_raw


def _results_rows(n: int, sizes: list[int], reps: int, seed: int, env: dict | None = None) -> list[dict]:
    rows = []
    workers = start_workers(n, "bench-p2p", stall_timeout=30.0, connect_timeout=10.0, env=env)
    try:
        connect_all(workers)
        for w in workers:
            w.tcp_port = w.call("tcp_serve")["port"]
            raw = w.call("raw_serve")
            w.raw_id, w.raw_address = raw["raw_id"], raw["raw_address"]
        _all_to_all(workers, 1000, seed - 1)  # dial every bare-iroh connection once (the node's are up)
        for size in sizes:
            best_i, best_t, best_r = math.inf, math.inf, math.inf
            for _ in range(reps):
                ti, tt, tr = _all_to_all(workers, size, seed)
                seed += 100
                best_i, best_t, best_r = min(best_i, ti), min(best_t, tt), min(best_r, tr)
            per_peer = (n - 1) * size / 1e6
            rows.append({
                "peers": n,
                "blob_bytes": size,
                "iroh_s": round(best_i, 4),
                "tcp_s": round(best_t, 4),
                "iroh_MBps_per_peer": round(per_peer / best_i, 2),
                "tcp_MBps_per_peer": round(per_peer / best_t, 2),
                "ratio_vs_tcp": round(best_t / best_i, 3),
                "bare_iroh_s": round(best_r, 4),
                "ratio_vs_bare_iroh": round(best_r / best_i, 3),
            })
    finally:
        close_all(workers)
    return rows


def _model_share(llama: dict, *, env: dict | None = None, buffered_too: bool = True) -> dict:
    """3 providers serve the same LLaMA; a 4th fetches it into its model (and, if asked, into buffers)."""
    workers = start_workers(4, "bench-p2p-model", stall_timeout=30.0, connect_timeout=10.0, env=env)
    try:
        connect_all(workers)
        providers, joiner = workers[:3], workers[3]
        rids = [w.send("serve_model", llama=llama, seed=7) for w in providers]
        served = [w.result(rid, 600) for w, rid in zip(providers, rids)]
        ids = [w.id.hex() for w in providers]
        row: dict = {"params_M": round(served[0]["model_bytes"] / 4 / 1e6, 1), "providers": 3}
        for into in ("model", "buffers") if buffered_too else ("model",):
            r = joiner.call("fetch_model", llama=llama, providers=ids, into=into, reply_timeout=900)
            if r["state_hash"] != served[0]["state_hash"]:
                raise RuntimeError("the joiner's weights differ from the providers'")
            suffix = "" if into == "model" else "_buffered"
            row["model_bytes"] = r["model_bytes"]
            row[f"model_share_s{suffix}"] = round(r["seconds"], 3)
            row[f"model_share_MBps{suffix}"] = round(r["model_bytes"] / 1e6 / r["seconds"], 1)
            row[f"joiner_peak_rss_over_model{suffix}"] = round((r["peak_rss"] - r["rss_before"]) / r["model_bytes"], 3)
            row[f"bytes_per_provider{suffix}"] = sorted(r["sources"].values())
        return row
    finally:
        close_all(workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 peers, 300 KB and a ~13M model only; no before")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per configuration (best is kept)")
    args = ap.parse_args()
    quick = args.quick or bool(os.environ.get("CI"))
    peer_counts = [4] if quick else [4, 8]
    sizes = [RESULT_BYTES_100M] if quick else [RESULT_BYTES_100M, RESULT_BYTES_1B]

    results = []
    for i, n in enumerate(peer_counts):
        results += _results_rows(n, sizes, args.reps, seed=1 + 10_000 * i)
    model = _model_share(LLAMA_SMALL if quick else LLAMA_100M)
    before = None
    if not quick:
        slow = {FAST_COPY_ENV: "0"}
        before = {"iroh_fast_copy": False,
                  "results": _results_rows(max(peer_counts), [RESULT_BYTES_1B], 1, seed=50_000, env=slow),
                  "model": _model_share(LLAMA_BEFORE, env=slow, buffered_too=False)}
    headline = next(r for r in results if r["blob_bytes"] == max(sizes) and r["peers"] == max(peer_counts))
    print(json.dumps({
        "bench": "p2p",
        "pattern": "each peer publishes one blob and fetches every other peer's from its publisher; hashes verified; "
                   "a joiner fetches a LLaMA from 3 providers into its model",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "iroh_fast_copy": FAST_BUFFER_COPY,
        "time_to_full_distribution_s": headline["iroh_s"],
        "MBps_per_peer": headline["iroh_MBps_per_peer"],
        "ratio_vs_tcp": headline["ratio_vs_tcp"],
        "ratio_vs_bare_iroh": headline["ratio_vs_bare_iroh"],
        "bare_iroh_ratio_vs_tcp": round(headline["tcp_s"] / headline["bare_iroh_s"], 3),
        "headline": {"peers": headline["peers"], "blob_bytes": headline["blob_bytes"]},
        "model_share_MBps": model["model_share_MBps"],
        "joiner_peak_rss_over_model": model["joiner_peak_rss_over_model"],
        "results": results,
        "model": model,
        "before": before,
    }))


if __name__ == "__main__":
    sys.exit(main())
