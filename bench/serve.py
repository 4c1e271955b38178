"""``psyche serve`` throughput: streamed completions, 1 and 8 at a time, against ``model.generate``.

Starts a real ``psyche serve --checkpoint DIR --device cpu`` process on the demo's model
(the LLaMA ``psyche demo`` trains, ``config/tiny-fortunes.toml``: 1.85M parameters,
context 128) and speaks to it over HTTP as an OpenAI client does (streamed
``/v1/completions``, server-sent events). With ``--checkpoint DIR`` it serves that folder
(e.g. ``runs/demo/checkpoint``: ``"weights": "trained"``, unless it records step 0); without, it writes a checkpoint
of the demo's shape into a temporary folder: fresh weights from the demo config
(``build_model``, seed ``init_seed``) saved with ``save_checkpoint`` and the demo's
tokenizer (the fortunes token folder's, built on first use as ``psyche demo`` builds it),
``"weights": "fresh"``. Throughput does not depend on what the weights learned.

Every completion generates exactly ``max_tokens`` tokens: the server's requests carry
``logit_bias`` {<|endoftext|>: -100}, the baseline's ``generate`` ``min_new_tokens =
max_new_tokens`` (both checked on every completion: ``exact_length``). Both sides sample
the same way: temperature 1.0, top-p 1.0, no top-k; the prompt after an ``<|endoftext|>``
as the server encodes it. The prompts are short English openings, cycled.

Each round, in one process and one after the other (the server idles while the baseline
runs, and the phases interleave so a change of load on the machine falls on all of them):

1. ``generate_1``: the same checkpoint loaded here with Transformers, ``model.generate`` one
   request at a time, ``--per-round`` requests: the baseline.
2. ``generate_8_batched`` (for reference): one ``model.generate`` call on 8 left-padded prompts,
   what a batch of 8 costs the model alone.
3. ``serve_1``: ``--per-round`` streamed requests to the server, one at a time.
4. ``serve_8``: 8 streamed requests sent at once.

Figures are tokens over the phase's wall time, summed over the rounds; time to first token
(TTFT) is from sending a request to its first piece of text (in serve_8 it includes the
steps of the requests ahead of it: a request that arrives while a batch runs joins it
between two steps). ``batching_speedup`` =
serve_8 / generate_1, ``concurrency_speedup`` = serve_8 / serve_1, ``serve_overhead_ratio``
= serve_1 / generate_1 (below 1: what HTTP, SSE and the engine's per-token work cost).
The server's ``/healthz`` counters around the serve_8 phases give the batches it decoded
(``serve_8_batches``; 1 per round when all 8 requests shared one batch; ``serve_8_mean_batch``),
and the CPU the server and this process (the clients) used during them, in % of one core.

Torch uses ``--threads`` threads on both sides (the server through ``OMP_NUM_THREADS``,
this process through ``torch.set_num_threads``); the default, 1, leaves a 2-core machine's other
core to the HTTP clients (2 threads for the model would fight them; ``--threads 2`` makes
generate_1 faster and serve_8 slower here).

Prints one JSON line.

    python bench/serve.py [--checkpoint DIR] [--rounds 10] [--per-round 8] [--max-tokens 64] [--threads 1]
    python bench/serve.py --quick        # 2 rounds of 2, 48 tokens: under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from psyche.localports import free_port  # noqa: E402
from psyche.testing.network import wait_serving  # noqa: E402

PROMPTS = ["The best way to", "A fool and his money", "When I was young, I", "Never trust a man who",
           "It is a truth universally", "Life is what happens", "The secret of success is", "You will meet"]
CONCURRENT = 8
"""Requests sent at once in the serve_8 phase (``psyche serve``'s default ``--max-batch``)."""
EOT = "<|endoftext|>"


def pct(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``xs``, rounded to 0.1; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 1)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the client side) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the checkpoint ----------------------------------------------------------------------------


def demo_checkpoint(out: Path) -> Path:
    """A checkpoint of the demo's model with fresh weights, written the way a run's
    checkpointer writes one (weights, the run's tokenizer, step and config in its state)."""
    from psyche.data import ensure_default_dataset
    from psyche.demo import DEFAULT_CONFIG
    from psyche.config import load_config
    from psyche.train import build_model, save_checkpoint

    cfg = load_config(DEFAULT_CONFIG)
    data = ensure_default_dataset(ROOT / "data" / "fortunes", progress=False)
    model = build_model(cfg.model)
    return save_checkpoint(model, out, tokenizer_path=data / "tokenizer.json",
                           extra={"step": 0, "config": cfg.model_dump(mode="json")})


# --- the baseline: model.generate in this process ----------------------------------------------


class Baseline:
    """The checkpoint loaded here, generating as the server is asked to."""

    def __init__(self, path: Path, max_tokens: int):
        from transformers import AutoTokenizer

        from psyche.train import load_pretrained

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = load_pretrained(path).eval()
        eot = self.tokenizer.convert_tokens_to_ids(EOT)
        self.eot = eot if isinstance(eot, int) and eot >= 0 else 0
        self.max_tokens = max_tokens
        self.exact = True

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens after an ``<|endoftext|>``, as the server encodes it."""
        return [self.eot] + self.tokenizer.encode(prompt, add_special_tokens=False)

    def generate(self, prompts: list[str], seed: int) -> int:
        """Complete ``prompts`` in one ``generate`` call (left-padded); the tokens generated."""
        import torch

        rows = [self.encode(p) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.eot] * (width - len(r)) + r for r in rows])  # (B, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_tokens,
                                      min_new_tokens=self.max_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                      top_k=0, eos_token_id=self.eot, pad_token_id=self.eot)
        new = out.shape[1] - width
        self.exact &= new == self.max_tokens
        return new * len(rows)


# --- the server, over HTTP ---------------------------------------------------------------------


@dataclass
class Phase:
    """Tokens and wall time of a phase, over the rounds, and each request's TTFT (ms)."""

    tokens: int = 0
    seconds: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return round(self.tokens / self.seconds, 1) if self.seconds else 0.0


class Client:
    """Streamed completions from the server at ``url``."""

    def __init__(self, url: str, model: str, max_tokens: int, eot: int):
        self.http = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64))
        self.model = model
        self.max_tokens = max_tokens
        self.bias = {str(eot): -100}
        self.exact = True

    async def complete(self, prompt: str, seed: int) -> tuple[int, float]:
        """One streamed completion: (completion tokens, ms to its first piece of text)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 1.0,
                "top_p": 1.0, "seed": seed, "logit_bias": self.bias, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first: float | None = None
        tokens = 0
        reason = None
        async with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"psyche serve answered {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"psyche serve failed a completion: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    if first is None and choice.get("text"):
                        first = time.perf_counter()
                    reason = choice.get("finish_reason") or reason
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        self.exact &= tokens == self.max_tokens and reason == "length"
        return tokens, ((first or time.perf_counter()) - t0) * 1000

    async def health(self) -> dict:
        return (await self.http.get("/healthz")).json()


# --- the bench ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, ckpt: Path, weights: str) -> dict:
    import torch

    from psyche.train import count_parameters

    torch.set_num_threads(args.threads)
    base = Baseline(ckpt, args.max_tokens)
    context = int(getattr(base.model.config, "max_position_embeddings", 2048))
    prompt_tokens = [len(base.encode(p)) for p in PROMPTS]
    if max(prompt_tokens) + args.max_tokens > context:
        raise SystemExit(f"--max-tokens {args.max_tokens}: the prompts ({max(prompt_tokens)} tokens) and the "
                         f"completion do not fit the model's context of {context} tokens")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkstemp(prefix="psyche-bench-serve-", suffix=".log")[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with log_path.open("w") as log:
        # --engine transformers: the engine this bench measures, even where vLLM is installed.
        proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", "serve", "--checkpoint", str(ckpt), "--port",
                                 str(port), "--device", "cpu", "--engine", "transformers"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        if not wait_serving(url, proc, timeout=120):
            raise SystemExit(f"psyche serve did not start:\n{log_path.read_text()[-3000:]}")
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        client = Client(url, model, args.max_tokens, base.eot)
        seed = 0

        def next_seed() -> int:
            nonlocal seed
            seed += 1
            return seed

        async def burst(n: int) -> tuple[int, list[float]]:
            got = await asyncio.gather(*(client.complete(PROMPTS[i % len(PROMPTS)], next_seed()) for i in range(n)))
            return sum(t for t, _ in got), [ms for _, ms in got]

        # Warm up both sides: the first calls pay for lazy imports, allocations, connections.
        for i in range(2):
            base.generate([PROMPTS[i]], next_seed())
            await client.complete(PROMPTS[i], next_seed())
        base.generate(PROMPTS[:CONCURRENT], next_seed())
        await burst(CONCURRENT)

        gen1, gen8, serve1, serve8 = Phase(), Phase(), Phase(), Phase()
        batches = completions = 0
        speedups = []
        server_cpu_8 = bench_cpu_8 = 0.0
        k = 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            r_gen = 0
            for _ in range(args.per_round):
                r_gen += base.generate([PROMPTS[k % len(PROMPTS)]], next_seed())
                k += 1
            dt_gen = time.perf_counter() - t0
            gen1.tokens += r_gen
            gen1.seconds += dt_gen

            t0 = time.perf_counter()
            gen8.tokens += base.generate([PROMPTS[i % len(PROMPTS)] for i in range(CONCURRENT)], next_seed())
            gen8.seconds += time.perf_counter() - t0

            t0 = time.perf_counter()
            for _ in range(args.per_round):
                tokens, ms = await client.complete(PROMPTS[k % len(PROMPTS)], next_seed())
                k += 1
                serve1.tokens += tokens
                serve1.ttft_ms.append(ms)
            serve1.seconds += time.perf_counter() - t0

            before = await client.health()
            cpu0, own0 = cpu_seconds(proc.pid), own_cpu_seconds()
            t0 = time.perf_counter()
            tokens, ttfts = await burst(CONCURRENT)
            dt8 = time.perf_counter() - t0
            server_cpu_8 += cpu_seconds(proc.pid) - cpu0
            bench_cpu_8 += own_cpu_seconds() - own0
            after = await client.health()
            serve8.tokens += tokens
            serve8.seconds += dt8
            serve8.ttft_ms += ttfts
            batches += after["batches"] - before["batches"]
            completions += after["batched_completions"] - before["batched_completions"]
            speedups.append((tokens / dt8) / (r_gen / dt_gen))
        await client.http.aclose()
    except BaseException:
        print(f"bench/serve.py: psyche serve's log is {log_path}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    crashed = "Traceback" in log_path.read_text()
    log_path.unlink(missing_ok=True)

    return {
        "bench": "serve",
        "pattern": "streamed /v1/completions to a psyche serve process, 1 at a time and 8 at once, against "
                   "model.generate one request at a time in this process; rounds interleave the phases",
        "model": "the demo's (config/tiny-fortunes.toml)" if args.checkpoint is None else str(ckpt),
        "weights": weights,
        "checkpoint_step": _step(ckpt),
        "parameters": count_parameters(base.model),
        "context": context,
        "max_tokens": args.max_tokens,
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
        "sampling": "temperature 1.0, top_p 1.0, no top-k; <|endoftext|> banned (logit_bias -100 / min_new_tokens)",
        "exact_length": client.exact and base.exact,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "concurrent": CONCURRENT,
        "torch_threads": args.threads,
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": args.load_at_start,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "serve_1_tokens_per_s": serve1.tokens_per_s,
        "serve_8_tokens_per_s": serve8.tokens_per_s,
        "generate_1_tokens_per_s": gen1.tokens_per_s,
        "generate_8_batched_tokens_per_s": gen8.tokens_per_s,
        "batching_speedup": ratio(serve8.tokens_per_s, gen1.tokens_per_s),
        "batching_speedup_per_round": [round(s, 2) for s in speedups],
        "concurrency_speedup": ratio(serve8.tokens_per_s, serve1.tokens_per_s),
        "serve_overhead_ratio": ratio(serve1.tokens_per_s, gen1.tokens_per_s),
        "serve_8_over_generate_8": ratio(serve8.tokens_per_s, gen8.tokens_per_s),
        "ttft_1_p50_ms": pct(serve1.ttft_ms, 50),
        "ttft_8_p50_ms": pct(serve8.ttft_ms, 50),
        "ttft_8_p99_ms": pct(serve8.ttft_ms, 99),
        "serve_8_batches": batches,
        "serve_8_batched_completions": completions,
        "serve_8_mean_batch": round(completions / batches, 2) if batches else None,
        "serve_8_server_cpu_pct": round(100 * server_cpu_8 / serve8.seconds, 1) if serve8.seconds else None,
        "serve_8_bench_cpu_pct": round(100 * bench_cpu_8 / serve8.seconds, 1) if serve8.seconds else None,
        "server_log_traceback": crashed,
    }


def _step(ckpt: Path) -> int | None:
    from psyche.serve.engine import recorded

    return recorded(ckpt)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="serve this checkpoint folder (default: the demo's shape, fresh)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the four phases")
    ap.add_argument("--per-round", type=int, default=8, help="one-at-a-time requests per round, on each side")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens every completion generates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, on both sides")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2, 48 tokens: under a minute")
    args = ap.parse_args()
    if args.quick or os.environ.get("CI"):
        args.rounds, args.per_round, args.max_tokens = 2, 2, 48
    args.load_at_start = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="psyche-bench-serve-"))
    try:
        if args.checkpoint is not None:
            from psyche.serve.engine import recorded

            ckpt = args.checkpoint.resolve()
            weights = "fresh" if recorded(ckpt)[1] == 0 else "trained"  # a run's checkpoint records its step
            if not (ckpt / "config.json").is_file():
                raise SystemExit(f"--checkpoint {ckpt}: not a checkpoint folder (no config.json)")
        else:
            ckpt, weights = demo_checkpoint(tmp / "checkpoint"), "fresh"
        print(json.dumps(asyncio.run(bench(args, ckpt, weights))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
