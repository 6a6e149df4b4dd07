#!/usr/bin/env python3
"""What torch.compile costs the shakespeare_char speedrun on the CPU, and what two other ways to compile it would cost.

    python bench/compile_cost.py [--rounds 3] [--steps 30] [--variants one_graph regional blocks_shared]

Variants (the last two are experiments, applied by this script only):
  one_graph      the model as train_gpt.py compiles it: one graph, the n-gram tables in it and the blocks unrolled
  regional       the n-gram tables' forward outside the graph (torch.compiler.disable): dynamo then runs
                 GPT.hidden, the glue between the blocks, eagerly and compiles the frames it calls on their own, so
                 the blocks share one graph; the head and the losses are a graph of their own
  blocks_shared  one graph, with Block.forward as a nested compile region (torch.compiler.nested_compile_region):
                 the block's code compiled once and called by each block
Each variant has its own compile cache, empty at first: a first process per variant measures the cold warm-up and
counts the C++ kernels it built. Then --rounds rounds run each variant once more, in turn, with its warm cache, and
time the warm-up, --steps train steps and one validation (131,072 val tokens); each warm process also compares one
step's gradients with the uncompiled model's, the parameters moved off their initial values first (the largest
difference over the largest gradient). Medians of the warm rounds are printed. Data: data/tinyshakespeare_char.
"""
import argparse
import copy
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from profile_step import DEFAULT_DATA, build_trainer  # the speedrun's trainer on the CPU, on tinyshakespeare
from bench.cli import OneLineParser, UsageError, run_tool  # the root is on the path since profile_step's import

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / DEFAULT_DATA
VARIANTS = ("one_graph", "regional", "blocks_shared")


def worker(variant, steps):
    """In a process of its own: build the speedrun's trainer compiled the variant's way and measure it."""
    import torch
    import train_gpt  # on the path since profile_step's import
    if variant == "regional":
        train_gpt.NgramEmbedding.forward = torch.compiler.disable(train_gpt.NgramEmbedding.forward)
    elif variant == "blocks_shared":
        train_gpt.Block.forward = torch.compiler.nested_compile_region(train_gpt.Block.forward)
    trainer = build_trainer(["--compile", "True"])
    figures = {}
    started = time.perf_counter()
    trainer.warm_up()
    figures["warm_up"] = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(steps):
        trainer.train_step(step)
    figures["steps"] = time.perf_counter() - started
    started = time.perf_counter()
    trainer.score(None)
    figures["validation"] = time.perf_counter() - started
    # Gradients of one batch, compiled against eager, with every parameter moved (zero-initialised ones included)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.raw_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = copy.deepcopy(trainer.raw_model)
    x, y = trainer.train_loader.next_batch()
    for model in (trainer.model, reference):
        model.zero_grad()
        model(x, y)[0].backward()
    pairs = list(zip(trainer.raw_model.parameters(), reference.parameters(), strict=True))
    largest = max(r.grad.abs().max().item() for _, r in pairs)
    figures["grad_diff"] = max((c.grad - r.grad).abs().max().item() for c, r in pairs) / largest
    print("figures:" + json.dumps(figures), flush=True)


def run_worker(variant, steps, cache):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps)], env=env,
                         capture_output=True, text=True)
    line = next((line for line in out.stdout.splitlines() if line.startswith("figures:")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"error: the {variant} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("figures:"):])


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds (each runs every variant once)")
    parser.add_argument("--steps", type=int, default=30, help="timed train steps per warm process")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if args.worker:
        return worker(args.worker, args.steps)
    if not (DATA / "meta.json").exists():
        raise UsageError(f"no data in {DATA}: prepare it with `python data/shakespeare.py --source tinyshakespeare "
                         f"--input ../shared/data/tinyshakespeare.txt --out_dir data/tinyshakespeare_char`")
    with tempfile.TemporaryDirectory(prefix="compile_cost_") as folder:
        caches = {v: os.path.join(folder, v) for v in args.variants}
        cold, warm = {}, {v: [] for v in args.variants}
        for v in args.variants:
            print(f"{v}: cold cache", flush=True)
            cold[v] = run_worker(v, args.steps, caches[v])
            cold[v]["kernels"] = len(glob.glob(os.path.join(caches[v], "**", "*.so"), recursive=True))
        for r in range(args.rounds):
            for v in args.variants:
                print(f"{v}: warm round {r + 1}", flush=True)
                warm[v].append(run_worker(v, args.steps, caches[v]))
    print(f"{os.cpu_count()} cores; medians of {args.rounds} warm rounds; {args.steps} steps of batch 48 x 64")
    print(f"| variant | C++ kernels | cold warm-up | warm warm-up | {args.steps} steps | validation | "
          "gradient difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in args.variants:
        med = {k: statistics.median(w[k] for w in warm[v]) for k in ("warm_up", "steps", "validation", "grad_diff")}
        print(f"| {v} | {cold[v]['kernels']} | {cold[v]['warm_up']:.1f} s | {med['warm_up']:.1f} s "
              f"| {med['steps']:.2f} s | {med['validation']:.2f} s | {med['grad_diff']:.1e} |")
    for v in args.variants:
        print(f"{v}: steps " + " ".join(f"{w['steps']:.2f}" for w in warm[v]))
    return 0


if __name__ == "__main__":
    run_tool(main)
