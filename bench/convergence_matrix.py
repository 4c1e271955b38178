"""DisTrO out of the box vs the best AdamW, over a matrix of corpora, models, seeds and horizons.

Each cell is one (corpus, model shape, seed, horizon). In every cell, 4 simulated
DisTrO peers (:mod:`psyche.testing.distro_sim`, DisTrO built by
:meth:`psyche.distro.DisTrO.from_config` with its defaults, at ``DisTrO.DEFAULT_LR``)
train on exactly the tokens that each AdamW run trains on; the baseline is the best
final validation loss of two AdamW sweeps over ``ADAMW_LRS``: plain (one LR) and
per-kind (embeddings ×2, matrices ×0.25). A cell's ratio is DisTrO's loss over
that best one (lower is better; 1.0 means as good as the best AdamW).

Cells are split once, before any tuning, into the ones the defaults were tuned on
(``tuning``: seed 0, short horizon, the small model) and the ones they are judged
on (``held_out``: the rest). ``worst_ratio`` is the worst held-out cell.

Corpora (built on first use under ``data/``):

- ``fortunes``: Debian's fortunes, the project's BPE (4096);
- ``pydocs``: the reStructuredText sources of Python's documentation (Debian's
  ``python3-doc``), byte-level (257 tokens);
- ``code``: the Python sources of the installed PyTorch, a BPE (4096) trained on them.

Prints one JSON line (every cell's figures, ``worst_ratio``, ``mean_ratio``, bytes
per parameter per step) and writes ``bench/out/convergence_matrix.png``. AdamW runs
are cached in ``bench/out/matrix_runs.jsonl`` (they do not depend on DisTrO);
``--fresh`` recomputes them.

    python bench/convergence_matrix.py                 # the whole matrix (about an hour on 2 cores)
    python bench/convergence_matrix.py --quick         # tuning cells only, short horizon
    python bench/convergence_matrix.py --variant no_topk --variant no_one_bit   # ablations
    python bench/convergence_matrix.py --quick --frontier   # what more bytes buy, up to the matrices sent whole
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

SHORT, LONG = 200, 1000
ADAMW_LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
"""Peak LRs of each AdamW sweep at the short horizon; the long one leaves out 5e-4 (no sweep's
best was that low) to save time."""
ADAMW_KIND_SCALES = {"embedding_lr_scale": 2.0, "matrix_lr_scale": 0.25, "vector_lr_scale": 1.0}
SHAPES = {
    # name: hidden, intermediate, layers, heads, tied embeddings
    "small": dict(hidden_size=128, intermediate_size=384, layers=2, heads=4, tie_embeddings=True),
    "deep": dict(hidden_size=128, intermediate_size=352, layers=4, heads=4, tie_embeddings=False),
}
CORPORA = ("fortunes", "pydocs", "code")
VARIANTS: dict[str, dict] = {
    # DisTrO options on top of the defaults, for the ablations.
    "default": {},
    "sign": {"matrix_update": "sign"},              # DeMo's sign step for matrices too (before this matrix)
    "embedding_rows": {"embedding_update": "row_rms"},  # embeddings step row by row (each token's row at RMS lr)
    "uncompressed": {"topk": 4096, "one_bit": False},  # every coefficient, full values: no compression
    "no_one_bit": {"one_bit": False},               # top-k, values sent in full
    "no_topk": {"topk": 4096},                      # every coefficient, signs only
    # Compression's cost by kind of tensor: every DCT coefficient (signs) of one kind, top-2 of the rest.
    "matrices_whole": {"kinds": {"matrix": {"topk": 1024}}},
    "embeddings_whole": {"kinds": {"embedding": {"topk": 1024}}},
    # What more bytes buy: the matrices at a higher top-k of each 32x32 tile, the rest at the default top-2.
    "matrices_top8": {"kinds": {"matrix": {"topk": 8}}},
    "matrices_top32": {"kinds": {"matrix": {"topk": 32}}},
    "matrices_top128": {"kinds": {"matrix": {"topk": 128}}},
    "overlapped": {"overlapped": True, "lookahead": True},   # step t applies step t-1's results (the network's default)
    "overlapped_stale": {"overlapped": True, "lookahead": False},  # ... with gradients one update behind (before)
}
ABLATIONS = ("sign", "embedding_rows", "uncompressed", "no_one_bit", "no_topk", "matrices_whole", "embeddings_whole",
             "overlapped", "overlapped_stale")
"""Run with ``--ablations`` on the short-horizon cells of the small model."""
FRONTIER = ("default", "matrices_top8", "matrices_top32", "matrices_top128", "matrices_whole")
"""Run with ``--frontier``: ratio against bytes, from today's payload to the matrices sent whole."""


@dataclass(frozen=True)
class Cell:
    corpus: str
    shape: str
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.corpus}/{self.shape}/s{self.seed}/{self.steps}"

    @property
    def split(self) -> str:
        return "tuning" if (self.seed == 0 and self.steps == SHORT and self.shape == "small") else "held_out"


def adamw_lrs(cell: Cell) -> tuple[float, ...]:
    """The LRs each AdamW sweep of ``cell`` tries."""
    return ADAMW_LRS if cell.steps == SHORT else ADAMW_LRS[1:]


def cells(quick: bool) -> list[Cell]:
    out = [Cell(c, s, seed, SHORT) for c in CORPORA for s in SHAPES for seed in (0, 1)]
    out += [Cell(c, "small", 1, LONG) for c in CORPORA]
    return [c for c in out if c.split == "tuning"] if quick else out


# -- corpora -------------------------------------------------------------------

def corpus_dir(name: str) -> str:
    """The token folder of corpus ``name``, built on first use."""
    from psyche.data import ensure_default_dataset
    from psyche.data.tokenize import tokenize_corpus

    if name == "fortunes":
        return str(ensure_default_dataset("data/fortunes"))
    out = Path(f"data/{name}")
    if (out / "meta.json").is_file():
        return str(out)
    if name == "pydocs":
        files = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True))
        if not files:
            sys.exit("corpus pydocs: no Python documentation sources found (install the Debian package python3-doc)")
        tokenize_corpus(corpus=files, vocab_size=257, out_dir=out, progress=False)  # 256 bytes + <|endoftext|>
    elif name == "code":
        import torch

        files = sorted(glob.glob(str(Path(torch.__file__).parent / "**" / "*.py"), recursive=True))
        tokenize_corpus(corpus=files, vocab_size=4096, out_dir=out, progress=False)
    else:
        raise ValueError(f"unknown corpus {name!r}")
    return str(out)


# -- one run -------------------------------------------------------------------

def sim_config(cell: Cell, **overrides):
    from psyche.testing.distro_sim import config_from

    return config_from(data_dir=corpus_dir(cell.corpus), steps=cell.steps, seed=cell.seed, seq_len=64,
                       batch_per_peer=4, peers=4, eval_every=10**9, eval_batches=8, eval_batch_size=16,
                       **SHAPES[cell.shape], **overrides)


def run_one(job: tuple) -> dict:
    """One AdamW or DisTrO run in a worker process; returns its key and final validation loss."""
    import torch

    torch.set_num_threads(1)
    kind, cell, arg, options = job
    t0 = time.perf_counter()
    from psyche.testing.distro_sim import run_adamw, run_distro

    if kind == "adamw":
        lr, grouped = arg
        cfg = sim_config(cell, adamw_kind_scales=tuple(ADAMW_KIND_SCALES.values()))
        val = run_adamw(cfg, lr, grouped=grouped).final
        out = {"val": val}
    else:
        options = dict(options)
        lr, overlapped = options.pop("lr", None), options.pop("overlapped", False)
        lookahead = options.pop("lookahead", True)
        cfg = sim_config(cell, distro_lr=lr, overlapped=overlapped, lookahead=lookahead,
                         distro_options=tuple(sorted(options.items())))
        run = run_distro(cfg)
        out = {"val": run.curve.final, "bytes_per_param_step": run.payload_bytes_per_peer_step / run.params,
               "bit_identical": run.peers_bit_identical, "curve": [run.curve.tokens, run.curve.val_loss]}
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def _key(job: tuple) -> str:
    kind, cell, arg = job[:3]
    return json.dumps([kind, asdict(cell), arg])


def _cache_key(job: tuple) -> str:
    # A DisTrO run is named by its options too, so a variant redefined is run again.
    return _key(job) if job[0] == "adamw" else json.dumps([job[0], asdict(job[1]), job[2], job[3]])


def _cost(job: tuple) -> float:
    kind, cell = job[:2]
    return cell.steps * (2.0 if cell.shape == "deep" else 1.0) * (1.6 if kind == "distro" else 1.0)


# -- the matrix ----------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tuning cells only")
    ap.add_argument("--cells", default="", help="only cells whose name contains this text")
    ap.add_argument("--variant", action="append", help=f"DisTrO variants: {', '.join(VARIANTS)} (default: default), "
                    "or NAME=JSON for options of your own, e.g. 'lr2={\"lr\": 0.02}'")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--fresh", action="store_true", help="recompute cached AdamW runs")
    ap.add_argument("--adamw-only", action="store_true", help="only compute (and cache) the AdamW baselines")
    ap.add_argument("--ablations", action="store_true",
                    help=f"also run {', '.join(ABLATIONS)} on the small model's short-horizon cells")
    ap.add_argument("--frontier", action="store_true",
                    help=f"run the variants {', '.join(FRONTIER)}: what each multiple of the bytes buys")
    ap.add_argument("--reuse-distro", action="store_true",
                    help="reuse DisTrO runs cached by earlier calls (same cell, name and options)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    variants = []
    for v in args.variant or ([] if args.frontier else ["default"]):
        name, _, options = v.partition("=")
        if options:
            VARIANTS[name] = json.loads(options)
        elif name not in VARIANTS:
            sys.exit(f"--variant {name}: unknown (known: {', '.join(VARIANTS)}; or NAME=JSON)")
        variants.append(name)
    if args.frontier:
        variants += [v for v in FRONTIER if v not in variants]
    todo = [c for c in cells(args.quick) if args.cells in c.name]
    for corpus in sorted({c.corpus for c in todo}):
        corpus_dir(corpus)  # build once, before the workers start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "matrix_runs.jsonl"
    cache: dict[str, dict] = {}
    if cache_path.is_file() and not args.fresh:
        for line in cache_path.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["job"]] = rec
    jobs = [("adamw", c, (lr, g), None) for c in todo for g in (False, True) for lr in adamw_lrs(c)]
    if not args.adamw_only:
        jobs += [("distro", c, v, VARIANTS[v]) for c in todo for v in variants]
        if args.ablations:
            jobs += [("distro", c, v, VARIANTS[v]) for c in todo for v in ABLATIONS
                     if c.shape == "small" and c.steps == SHORT and v not in variants]
    distro_cache_path = out / "matrix_distro_runs.jsonl"
    if args.reuse_distro and distro_cache_path.is_file():
        for line in distro_cache_path.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["job"]] = rec
    pending = sorted((j for j in jobs if _cache_key(j) not in cache), key=_cost, reverse=True)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for j in jobs:
        if _cache_key(j) in cache:
            results[_key(j)] = cache[_cache_key(j)]
    with (ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool, cache_path.open("a") as log,
          distro_cache_path.open("a") as distro_log):
        futures = {pool.submit(run_one, j): j for j in pending}
        for done in as_completed(futures):
            job = futures[done]
            rec = done.result()
            results[_key(job)] = rec
            sink = log if job[0] == "adamw" else distro_log
            sink.write(json.dumps({**rec, "job": _cache_key(job)}) + "\n")
            sink.flush()  # a run stopped midway keeps every finished one
            print(f"{_key(job)}: {rec['val']:.4f} ({rec['seconds']} s)", file=sys.stderr, flush=True)
    if args.adamw_only:
        return
    if args.ablations:
        variants += [v for v in ABLATIONS if v not in variants]
    report = summarize(todo, variants, results)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["plot"] = str(plot(report["cells"], variants, out / "convergence_matrix.png"))
    print(json.dumps(report))


def summarize(todo: list[Cell], variants: list[str], results: dict[str, dict]) -> dict:
    """Per cell: the AdamW sweeps, the best of them, each variant's loss and ratio; then the worst ratios."""
    rows = []
    for cell in todo:
        row = {"cell": cell.name, "split": cell.split}
        for grouped, label in ((False, "adamw"), (True, "adamw_per_kind")):
            lrs = adamw_lrs(cell)
            losses = [results[_key(("adamw", cell, (lr, grouped)))]["val"] for lr in lrs]
            best = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
            row[label] = {"best_lr": lrs[best], "val": round(losses[best], 4),
                          "at_edge": best in (0, len(losses) - 1)}
        row["best_adamw"] = min(row["adamw"]["val"], row["adamw_per_kind"]["val"])
        for v in variants:
            rec = results.get(_key(("distro", cell, v)))
            if rec is None:
                continue  # an ablation not run on this cell
            row[v] = {"val": round(rec["val"], 4), "ratio": round(rec["val"] / row["best_adamw"], 4),
                      "bytes_per_param_step": round(rec["bytes_per_param_step"], 6),
                      "bit_identical": rec["bit_identical"]}
        rows.append(row)
    report: dict = {"cells": rows, "adamw_lrs": {"short": list(ADAMW_LRS), "long": list(adamw_lrs(Cell("", "", 0, LONG)))},
                    "adamw_per_kind_scales": ADAMW_KIND_SCALES}
    for v in variants:
        mine = [r for r in rows if v in r]
        held = [r[v]["ratio"] for r in mine if r["split"] == "held_out"]
        tuned = [r[v]["ratio"] for r in mine if r["split"] == "tuning"]
        report[v] = {
            "cells": len(mine),
            "worst_ratio": max(held) if held else None,
            "mean_ratio": round(sum(held) / len(held), 4) if held else None,
            "tuning_worst_ratio": max(tuned) if tuned else None,
            "worst_ratio_all": max(r[v]["ratio"] for r in mine),
            "mean_ratio_all": round(sum(r[v]["ratio"] for r in mine) / len(mine), 4),
            "max_bytes_per_param_step": max(r[v]["bytes_per_param_step"] for r in mine),
            "bit_identical": all(r[v]["bit_identical"] for r in mine),
        }
    report["worst_ratio"] = report[variants[0]]["worst_ratio"]
    return report


def plot(rows: list[dict], variants: list[str], path: Path) -> Path:
    """One bar per cell and variant of :func:`summarize`'s rows: DisTrO's loss over the best AdamW's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(rows) + 2), 5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        mine = [(i, r[v]["ratio"]) for i, r in enumerate(rows) if v in r]
        ax.bar([i + j * width for i, _ in mine], [ratio for _, ratio in mine], width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.03, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['cell']}{'*' if r['split'] == 'tuning' else ''}" for r in rows], rotation=60,
                       ha="right", fontsize=7)
    ax.set_ylabel("DisTrO val loss / best AdamW")
    ax.set_ylim(0.9, max(1.2, ax.get_ylim()[1]))
    ax.set_title("DisTrO vs the best AdamW at equal tokens (* = tuning cell)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
