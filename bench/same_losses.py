#!/usr/bin/env python3
"""Whether a change to train_gpt.py left training alone: the same short runs with this checkout's train_gpt.py and
with another revision's, every logged loss compared exactly.

    python bench/same_losses.py REV [--data data/shakespeare_char]

Each case is a 30-step run of a small model (2 layers, width 64, context 32, batch 8, eager, one thread) on the
given char-level shards, with a recipe, optimizer or feature switched: the speedrun (Muon), classic (AdamW),
speedrun with MTP and GQA, classic with Adafactor, speedrun with AdamSN, classic in bf16.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.cli import OneLineParser, UsageError, run_tool  # noqa: E402

SMALL = ["--device", "cpu", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--block_size", "32",
         "--batch_size", "8", "--max_iters", "30", "--eval_interval", "10", "--log_interval", "5",
         "--val_tokens", "4096", "--timing_warmup_steps", "1", "--compile", "False"]
CASES = {"speedrun": [], "classic": ["--recipe", "classic", "--warmup_iters", "5"],
         "speedrun, MTP 3, 2 kv heads": ["--mtp_steps", "3", "--n_kv_head", "2", "--mtp_rampup_steps", "10"],
         "classic, Adafactor": ["--recipe", "classic", "--warmup_iters", "5", "--optimizer", "adafactor"],
         "speedrun, AdamSN": ["--optimizer", "adamsn"],
         "classic, bf16": ["--recipe", "classic", "--warmup_iters", "5", "--precision", "bf16"]}


def losses(script, data, flags, which):
    """(step, train loss, val loss) of every metrics row of one run; `which` train_gpt.py it is, for an error."""
    with tempfile.TemporaryDirectory() as logs:
        run = subprocess.run([sys.executable, script, "--input_bin", os.path.join(data, "train_*.bin"),
                              "--input_val_bin", os.path.join(data, "val_*.bin"), *SMALL, *flags, "--log_dir", logs,
                              "--run_id", "same"], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        if run.returncode:
            last = next((line for line in reversed(run.stderr.splitlines()) if line.strip()), "no message")
            message = f"{which} train_gpt.py failed (exit {run.returncode}): {last.strip().removeprefix('error: ')}"
            if run.returncode == 2:  # train_gpt.py refused its input: the data (or that revision's flags)
                raise UsageError(message)
            sys.exit(f"error: {message}")
        with open(os.path.join(logs, "same", "metrics.jsonl")) as f:
            return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in map(json.loads, f)]


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "shakespeare_char"),
                        help="a folder of char-level shards (default data/shakespeare_char)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.data, "meta.json")):
        raise UsageError(f"--data {args.data}: no meta.json and shards there; run python data/shakespeare.py first, "
                         "or pass --data")
    old = None if args.rev.startswith("-") else \
        subprocess.run(["git", "show", f"{args.rev}:train_gpt.py"], cwd=ROOT, capture_output=True, text=True)
    if old is None or old.returncode:
        reason = ((old.stderr.strip().splitlines() if old else []) or ["not a revision"])[-1]
        reason = reason.removeprefix("fatal: ").rstrip(".")
        raise UsageError(f"{args.rev}: {reason}; give a revision of {ROOT} that has train_gpt.py (e.g. HEAD~1)")
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "train_gpt.py")
        with open(script, "w") as f:
            f.write(old.stdout)
        same = True
        for name, flags in CASES.items():
            a = losses(script, args.data, flags, f"{name}: {args.rev}'s")
            b = losses(os.path.join(ROOT, "train_gpt.py"), args.data, flags, f"{name}: this checkout's")
            same &= a == b
            print(f"{name}: {'identical' if a == b else 'DIFFERENT'}, {len(b)} rows, last val loss {b[-1][2]!r}"
                  + ("" if a == b else f" (was {a[-1][2]!r})"), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    run_tool(main)
