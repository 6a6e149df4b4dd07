#!/usr/bin/env python3
"""Whether a change to train_gpt.py left training alone: the same short runs with this checkout's train_gpt.py and
with another revision's, every logged loss compared exactly.

    python bench/same_losses.py REV [--data data/shakespeare_char]

Each case is a 30-step run of a small model (2 layers, width 64, context 32, batch 8, eager, one thread) on the
given char-level shards, with a recipe, optimizer or feature switched: the speedrun (Muon), classic (AdamW),
speedrun with MTP and GQA, classic with Adafactor, speedrun with AdamSN, classic in bf16.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--device", "cpu", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--block_size", "32",
         "--batch_size", "8", "--max_iters", "30", "--eval_interval", "10", "--log_interval", "5",
         "--val_tokens", "4096", "--timing_warmup_steps", "1", "--compile", "False"]
CASES = {"speedrun": [], "classic": ["--recipe", "classic", "--warmup_iters", "5"],
         "speedrun, MTP 3, 2 kv heads": ["--mtp_steps", "3", "--n_kv_head", "2", "--mtp_rampup_steps", "10"],
         "classic, Adafactor": ["--recipe", "classic", "--warmup_iters", "5", "--optimizer", "adafactor"],
         "speedrun, AdamSN": ["--optimizer", "adamsn"],
         "classic, bf16": ["--recipe", "classic", "--warmup_iters", "5", "--precision", "bf16"]}


def losses(script, data, flags):
    """(step, train loss, val loss) of every metrics row of one run."""
    with tempfile.TemporaryDirectory() as logs:
        subprocess.run([sys.executable, script, "--input_bin", os.path.join(data, "train_*.bin"),
                        "--input_val_bin", os.path.join(data, "val_*.bin"), *SMALL, *flags, "--log_dir", logs,
                        "--run_id", "same"], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(os.path.join(logs, "same", "metrics.jsonl")) as f:
            return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in map(json.loads, f)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "shakespeare_char"),
                        help="a folder of char-level shards (default data/shakespeare_char)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.data, "meta.json")):
        sys.exit(f"error: no shards in {args.data}: run python data/shakespeare.py first, or pass --data")
    old = subprocess.run(["git", "show", f"{args.rev}:train_gpt.py"], cwd=ROOT, capture_output=True, text=True)
    if old.returncode:
        sys.exit(f"error: {args.rev}: {old.stderr.strip().splitlines()[-1]}")
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "train_gpt.py")
        with open(script, "w") as f:
            f.write(old.stdout)
        same = True
        for name, flags in CASES.items():
            a, b = losses(script, args.data, flags), losses(os.path.join(ROOT, "train_gpt.py"), args.data, flags)
            same &= a == b
            print(f"{name}: {'identical' if a == b else 'DIFFERENT'}, {len(b)} rows, last val loss {b[-1][2]!r}"
                  + ("" if a == b else f" (was {a[-1][2]!r})"), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
