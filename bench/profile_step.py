#!/usr/bin/env python3
"""Profile training steps of train_gpt.py on the CPU with torch.profiler and print a table by operator.

The trainer is built from the same flags as a run (default: the shakespeare_char preset on tinyshakespeare), a few
untimed steps warm it up (and compile it with --compile True), then --steps steps run under the profiler. The
table lists the operators with the most self CPU time; its total is the profiled steps' CPU time.

Usage:
  python bench/profile_step.py [--steps 20] [--rows 15] [--sort self_cpu_time_total] [-- TRAIN_GPT_FLAGS ...]
  python bench/profile_step.py -- --recipe classic
  python bench/profile_step.py -- --batch_size 48 --compile True
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_gpt  # noqa: E402
from bench.cli import OneLineParser, positive_int, run_tool  # noqa: E402

DEFAULT_DATA = "data/tinyshakespeare_char"
# the CPU columns of the profiler's table that --sort may order it by
SORT_KEYS = ("self_cpu_time_total", "cpu_time_total", "cpu_time", "self_cpu_memory_usage", "cpu_memory_usage",
             "count", "flops")


def build_trainer(flags):
    base = ["--preset", "shakespeare_char", "--device", "cpu",
            "--input_bin", str(ROOT / DEFAULT_DATA / "train_*.bin"),
            "--input_val_bin", str(ROOT / DEFAULT_DATA / "val_*.bin")]
    cfg = train_gpt.resolve_config(base + list(flags))
    trainer = train_gpt.Trainer(cfg, log=lambda *a, **k: None)
    trainer.setup()
    return trainer


def profile_steps(trainer, steps, warmup):
    """Runs `warmup` untimed steps, then `steps` steps under the profiler. Returns (profiler, ms per step)."""
    for step in range(warmup):
        trainer.train_step(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(step)
        elapsed = time.perf_counter() - start
    return prof, 1000 * elapsed / steps


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--rows", type=int, default=15, help="table rows (default 15)")
    parser.add_argument("--sort", default="self_cpu_time_total", choices=SORT_KEYS, help="profiler sort key")
    parser.add_argument("flags", nargs="*", help="train_gpt.py flags, after --")
    args = parser.parse_args(argv)
    positive_int("steps", args.steps)
    positive_int("rows", args.rows)
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: give 0 or more untimed steps")
    trainer = build_trainer(args.flags)
    cfg = trainer.cfg
    prof, ms = profile_steps(trainer, args.steps, args.warmup)
    print(f"machine: {train_gpt.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"recipe {cfg.recipe}, batch {cfg.batch_size} x context {cfg.block_size}, compile {cfg.compile}, "
          f"flags {' '.join(args.flags) or '(none)'}")
    print(f"{args.steps} profiled steps: {ms:.1f} ms/step under the profiler, "
          f"{cfg.tokens_per_step * 1000 / ms:,.0f} tokens/s")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    run_tool(main)
