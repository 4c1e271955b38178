"""DisTrO codec cost and size on a LLaMA-shaped model, against an AdamW step in the same run.

Prints one JSON line: bytes per parameter per step (chunk 32, top-2, 1-bit by
default), the ratio to fp32 (4 bytes), and the CPU time of encode, decode,
serialisation and a full generate/apply, each per million parameters, next to a
``torch.optim.AdamW`` step on the same parameters (``*_over_adamw`` ratios).

    python bench/distro_codec.py [--layers 8 --hidden 512 --chunk 32 --topk 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm caches (DCT matrices, index tables, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--full-precision", action="store_true", help="send values, not signs")
    ap.add_argument("--peers", type=int, default=4, help="results decoded together in decode_peers_ms")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from psyche.distro import DCTCodec, DisTrO, SparseResult, decode_payload, encode_payload

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    mparams = n_params / 1e6
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    one_bit = not args.full_precision
    codec = DCTCodec(args.chunk)
    grads = [p.grad for p in params]

    results: list[SparseResult] = []

    def encode():
        results[:] = [codec.encode(g, args.topk, one_bit=one_bit) for g in grads]

    encode_ms = _median_ms(encode, args.repeats)
    decode_ms = _median_ms(lambda: [codec.decode([r], r.shape) for r in results], args.repeats)
    peers = [results] * args.peers
    decode_peers_ms = _median_ms(
        lambda: [codec.decode([peer[i] for peer in peers], r.shape) for i, r in enumerate(results)], args.repeats
    )
    blob = encode_payload(results)
    layouts = [r.layout for r in results]
    to_bytes_ms = _median_ms(lambda: encode_payload(results), args.repeats)
    from_bytes_ms = _median_ms(lambda: decode_payload(blob, layouts), args.repeats)

    adamw = torch.optim.AdamW(params, lr=1e-4)
    adamw_ms = _median_ms(adamw.step, args.repeats)

    distro = DisTrO(params, lr=1e-4, chunk=args.chunk, topk=args.topk, one_bit=one_bit)
    mine: list[SparseResult] = []
    generate_ms = _median_ms(lambda: mine.__setitem__(slice(None), distro.generate()), args.repeats)
    apply_ms = _median_ms(lambda: distro.apply([mine] * args.peers), args.repeats)

    bpp = len(blob) / n_params
    per = lambda ms: round(ms / mparams, 4)
    out = {
        "bench": "distro_codec",
        "params": n_params,
        "chunk": args.chunk,
        "topk": args.topk,
        "one_bit": one_bit,
        "payload_bytes": len(blob),
        "bytes_per_param_per_step": round(bpp, 6),
        "fp32_bytes_ratio": round(4.0 / bpp, 1),
        "psyche_u16_bytes_per_param_estimate": round(_psyche_estimate(results, one_bit) / n_params, 6),
        "encode_ms_per_mparam": per(encode_ms),
        "decode_ms_per_mparam": per(decode_ms),
        f"decode_{args.peers}_peers_ms_per_mparam": per(decode_peers_ms),
        "to_bytes_ms_per_mparam": per(to_bytes_ms),
        "from_bytes_ms_per_mparam": per(from_bytes_ms),
        "generate_ms_per_mparam": per(generate_ms),
        f"apply_{args.peers}_peers_ms_per_mparam": per(apply_ms),
        "adamw_step_ms_per_mparam": per(adamw_ms),
        "encode_plus_decode_over_adamw": round((encode_ms + decode_ms) / adamw_ms, 2),
        "generate_plus_apply_over_adamw": round((generate_ms + apply_ms) / adamw_ms, 2),
        "threads": args.threads,
    }
    print(json.dumps(out))


def _psyche_estimate(results, one_bit: bool) -> int:
    """Bytes the original's layout would need: u8/u16/u32 per index by tile size, 1 bit or 4 bytes per value."""
    total = 0
    for r in results:
        n = r.grid.tile_numel
        width = 1 if n <= 256 else 2 if n <= 65536 else 4
        kept = r.indices.numel()
        total += kept * width + (kept + 7) // 8 if one_bit else kept * (width + 4)
    return total


if __name__ == "__main__":
    main()
